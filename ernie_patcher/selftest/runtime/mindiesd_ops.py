"""MindIE-SD's own Python on a CPU: the real `mindiesd` package, with a stand-in only for its device operator.

`mindiesd` 3.1.0 (installed with --no-deps) imports torch_npu at import time and asks it for the chip when it
dispatches; `load()` puts the torch_npu stand-in (torch_npu_ref) in sys.modules first, so MindIE-SD's own
`attention_forward` dispatch, its operator registries per chip (`register_op_800`: A2/A3, `register_op_a5`,
`register_op_duo`), `FlashAttentionScore`, `PromptFlashAttention` and `AscendLaserAttention` (la_preprocess_input's
casts and padding to 256, pre_tokens, la_postprocess_output) all run as published.

Below them, only what needs the device stands in: torch_npu's kernels (torch_npu_ref) and MindIE-SD's custom
operator `mindiesd::la`, which `mindiesd.layers._custom_ops.laser_attention` calls and which MindIE-SD's
libPTAExtensionOPS.so registers on a device. It is registered here with the schema that library declares
(LA_SCHEMA, read back from the wheel's .so by tests/numerics/test_kernel_contract.py) and a CPU implementation:

- query, key, value: BNSD, one dtype, float16 or bfloat16 (the two dtype combinations of LaserAttention in
  MindIE-SD's ops-info), sequence a multiple of 256 and head_dim a multiple of 128, as la_preprocess_input pads them.
- pre_tokens: MindIE-SD's caller passes the number of zero keys it appended (or 2**31 - 1 when it appended none)
  and next_tokens=1; the stand-in excludes those trailing keys and takes no other use of the two.
- atten_mask, alibi_mask, drop_mask: MindIE-SD always passes None (a mask given to attention_forward is dropped
  before this call); the stand-in refuses anything else, and keep_prob != 1.
- Output (softmax_log_max_sum [B, N, S] float32, attention_out in the input dtype), computed in float32.

Spies (pass-through) on MindIE-SD's operator classes count, per operator, the calls MindIE-SD dispatched to them
and how many of those carried a mask (`operator_calls`), so a test sees which operator MindIE-SD chose.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import sys
import types
from typing import Any, Callable

import torch

from . import torch_npu_ref

LA_SCHEMA = ("la(Tensor query, Tensor key, Tensor value, Tensor? atten_mask=None, Tensor? alibi_mask=None, "
             "Tensor? drop_mask=None, float scale_value=1.0, int head_num=2, str input_layout='BNSD', "
             "float keep_prob=1.0, int pre_tokens=2147483647, int next_tokens=1, bool is_highPrecision=True) "
             "-> (Tensor, Tensor)")
SEQ_BASE, DIM_BASE = 256, 128
LASER_DTYPES = (torch.float16, torch.bfloat16)
OPERATORS = {"fused_attn_score": ("fused_attn_score", "FlashAttentionScore"),
             "prompt_flash_attn": ("prompt_flash_attn", "PromptFlashAttention"),
             "ascend_laser_attention": ("ascend_laser_attention", "AscendLaserAttention")}
LAYOUT_METHODS = ("forward_attn_bnsd", "forward_attn_bsnd", "forward_attn_bsh")
FA_TYPES = tuple(OPERATORS)
"""The values MINDIE_SD_FA_TYPE takes (attention_forward's supported_fa_types)."""

calls: collections.Counter = collections.Counter()
"""Calls of the `mindiesd::la` stand-in ("la") and of MindIE-SD's operators (see module docstring)."""
_library: list[torch.library.Library] = []


def _check_laser_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masks: tuple,
                        input_layout: str, keep_prob: float, next_tokens: int) -> None:
    if input_layout != "BNSD":
        raise NotImplementedError(f"mindiesd::la stand-in: input_layout {input_layout!r} (MindIE-SD passes BNSD)")
    if any(mask is not None for mask in masks) or keep_prob != 1.0 or next_tokens != 1:
        raise NotImplementedError("mindiesd::la stand-in: masks, dropout or next_tokens != 1 (MindIE-SD passes none)")
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or query.dtype not in LASER_DTYPES:
        raise TypeError(f"mindiesd::la: query, key and value must all be float16 or all bfloat16, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    for tensor in (query, key, value):
        if tensor.shape[-2] % SEQ_BASE or tensor.shape[-1] % DIM_BASE:
            raise ValueError(f"mindiesd::la: shape {tuple(tensor.shape)} is not padded to sequence % {SEQ_BASE}, "
                             f"head_dim % {DIM_BASE} (la_preprocess_input pads it)")


def laser_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, atten_mask: torch.Tensor | None = None,
                    alibi_mask: torch.Tensor | None = None, drop_mask: torch.Tensor | None = None,
                    scale_value: float = 1.0, head_num: int = 2, input_layout: str = "BNSD", keep_prob: float = 1.0,
                    pre_tokens: int = torch_npu_ref.MAX_TOKENS, next_tokens: int = 1,
                    is_highPrecision: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The stand-in of MindIE-SD's `mindiesd::la` kernel (LA_SCHEMA)."""
    calls["la"] += 1
    _check_laser_inputs(query, key, value, (atten_mask, alibi_mask, drop_mask), input_layout, keep_prob, next_tokens)
    if query.shape[1] != head_num:
        raise ValueError(f"mindiesd::la: head_num={head_num} but the BNSD query has {query.shape[1]} heads")
    seq_kv = key.shape[-2]
    padded_keys = 0 if pre_tokens >= seq_kv else pre_tokens
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale_value
    if padded_keys:
        scores[..., seq_kv - padded_keys:] = float("-inf")
    log_sum = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return log_sum, out


def register_laser_op() -> None:
    """Define `torch.ops.mindiesd.la` with LA_SCHEMA and the CPU stand-in, once per process."""
    if _library or hasattr(torch.ops.mindiesd, "la"):
        return
    library = torch.library.Library("mindiesd", "DEF")
    library.define(LA_SCHEMA)
    library.impl("la", laser_attention, "CompositeExplicitAutograd")
    _library.append(library)


def _spy(method: Callable, operator: str) -> classmethod:
    """METHOD (a bound classmethod of a MindIE-SD operator) that also counts its calls and masked calls."""

    def counted(cls: type, attn_param: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None, scale: Any = None) -> torch.Tensor:
        calls[operator] += 1
        if mask is not None:
            calls[f"{operator} with a mask"] += 1
        return method(attn_param, query, key, value, mask, scale)

    return classmethod(counted)


def _install_spies() -> None:
    for operator, (module_name, class_name) in OPERATORS.items():
        owner = getattr(importlib.import_module(f"mindiesd.layers.flash_attn.{module_name}"), class_name)
        if getattr(owner, "_ernie_patcher_spied", False):
            continue
        for method in LAYOUT_METHODS:
            setattr(owner, method, _spy(getattr(owner, method), operator))
        owner._ernie_patcher_spied = True


def torch_npu_module(strict_device: bool, chip: str) -> types.ModuleType:
    """The torch_npu stand-in of this process (put in sys.modules, and torch.npu when torch has none), made once."""
    module = sys.modules.get("torch_npu")
    if module is None or not hasattr(module, "calls"):
        module = torch_npu_ref.build_module(strict_device=strict_device, chip=chip)
        sys.modules["torch_npu"] = module
    if not hasattr(torch, "npu"):
        torch.npu = module.npu  # as importing torch_npu does
    return module


def load(chip: str = "A2", strict_device: bool = True) -> types.ModuleType:
    """The real `mindiesd` package, imported over the torch_npu stand-in, with the laser op stand-in and spies."""
    torch_npu_module(strict_device, chip)
    mindiesd = importlib.import_module("mindiesd")
    register_laser_op()
    _install_spies()
    set_chip(chip)
    return mindiesd


def set_chip(chip: str) -> None:
    """The chip torch_npu reports from now on; MindIE-SD's cached answer (get_platform.PLATFORM) is forgotten."""
    sys.modules["torch_npu"].npu.set_chip(chip)
    importlib.import_module("mindiesd.utils.get_platform").PLATFORM = None


def routes(torch_npu: types.ModuleType) -> dict[str, int]:
    """Calls by route since the counters were last cleared: torch_npu's kernels (called by the patch or by
    MindIE-SD) and MindIE-SD's operators ("... with a mask" when a mask reached one); the `mindiesd::la` kernel
    itself is left out (one per ascend_laser_attention call)."""
    return dict(torch_npu.calls) | {name: count for name, count in calls.items() if name != "la" and count}


def clear(torch_npu: types.ModuleType) -> None:
    """Forget the calls counted so far (torch_npu's and MindIE-SD's)."""
    torch_npu.calls.clear()
    calls.clear()


def available() -> bool:
    """Whether mindiesd is installed in this interpreter (it is never imported to answer this)."""
    return importlib.util.find_spec("mindiesd") is not None

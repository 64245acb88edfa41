"""CPU reference of MindIE-SD's `mindiesd.attention_forward`, from its documentation.

MindIE-SD API reference, "attention_forward" (docs/en/features/core_layers.md; MindIE 2.1.RC1
"def attention_forward", path mindiesd/layers/flash_attn/attention_forward.py):
    attention_forward(query, key, value, attn_mask=None, scale=None, fused=True, head_first=False, **kwargs)
    - query, key, value: 4-D tensors, [batch, seq_len, num_heads, head_dim] (BSND); [B, N, S, D] when
      head_first=True. The output has the input's layout and shape.
    - scale: a float or None; None means head_dim ** -0.5.
    - fused=False computes plain scaled dot-product attention.
    - kwargs: opt_mode in {"runtime" (default), "static", "manual"}; op_type in {"prompt_flash_attn",
      "fused_attn_score", "ascend_laser_attention"} and layout in {"BNSD", "BSND", "BSH"} take effect only
      with opt_mode="manual"; layout is the operator's internal layout and does not change the input or
      output layout. (The environment variable MINDIE_SD_FA_TYPE can override op_type; not modelled.)
    - ascend_laser_attention takes no mask: MindIE-SD hands the laser kernel no attention mask, so a
      mask given with it would be silently dropped. The reference refuses a mask with that op_type so a
      caller relying on it is caught. Its supported shapes are head_dim <= 128 and, for
      self-attention, seq_len >= 4000 (MindIE-SD's AscendLaserAttention.is_supported_shape).
    - ascend_laser_attention takes float16 and bfloat16 only: the operator class MindIE-SD registers
      under that name (AscendLaserAttention, mindiesd/layers/flash_attn/) declares
      `supported_dtype = [torch.float16, torch.bfloat16]`, and a float32 call raises MindIE-SD's
      ParametersInvalid (mindiesd.utils.exception) instead of falling back to another operator (issue #10).
      The reference raises ParametersInvalid (a ValueError here) for a float32 or any other query, key or
      value.

Numerics: softmax(scale * q @ k^T) @ v in float32, returned in the input dtype. On the laser route the
inputs first go through `AscendLaserAttention.la_preprocess_input`: query, key and value are cast to
float16 when they are not float16, then zero-padded (sequence to a multiple of 256, head_dim to 128;
the padded keys are excluded through pre_tokens, so the padding does not change the result and is not
modelled). The output goes through `la_postprocess_output`: cast to float16, then to the input dtype,
and cropped back. The reference models both casts: bfloat16 inputs are rounded to float16 (values
beyond float16's range, |x| > 65504, become inf as they would on the NPU) and the float16 output is
cast back to bfloat16. The kernel's own accumulation order is not modelled (float32 here).
"""
from __future__ import annotations

import collections
import importlib.machinery
import types

import torch

from .torch_npu_ref import require_npu

OPT_MODES = ("runtime", "static", "manual")
OP_TYPES = ("prompt_flash_attn", "fused_attn_score", "ascend_laser_attention")
LAYOUTS = ("BNSD", "BSND", "BSH")
LASER_DTYPES = (torch.float16, torch.bfloat16)


class ParametersInvalid(ValueError):
    """MindIE-SD's mindiesd.utils.exception.ParametersInvalid: arguments the chosen operator does not take."""


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
              scale: float | None, head_first: bool) -> torch.Tensor:
    """Scaled dot-product attention in the documented layouts; a boolean attn_mask is True where attended."""
    if not head_first:
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask.to(torch.bool), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return out if head_first else out.transpose(1, 2)


def _check_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: object,
                     fused: object, kwargs: dict[str, object]) -> str | None:
    if any(t.ndim != 4 for t in (query, key, value)):
        raise ValueError("attention_forward: query, key and value must be 4-D")
    if scale is not None and not isinstance(scale, float):
        raise TypeError(f"attention_forward: scale must be a float, got {type(scale).__name__}")
    if not isinstance(fused, bool):
        raise TypeError("attention_forward: fused must be a bool")
    opt_mode = kwargs.get("opt_mode", "runtime")
    if opt_mode not in OPT_MODES:
        raise ValueError(f"attention_forward: opt_mode {opt_mode!r} not in {OPT_MODES}")
    if opt_mode != "manual":
        return None
    op_type = kwargs.get("op_type", "fused_attn_score")
    if op_type not in OP_TYPES:
        raise ValueError(f"attention_forward: op_type {op_type!r} not in {OP_TYPES}")
    if kwargs.get("layout", "BNSD") not in LAYOUTS:
        raise ValueError(f"attention_forward: layout {kwargs.get('layout')!r} not in {LAYOUTS}")
    return str(op_type)


def laser_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                    head_first: bool) -> torch.Tensor:
    """The laser route: float16 / bfloat16 only; computed on float16 copies, the output cast back to the input dtype."""
    refused = sorted({str(t.dtype) for t in (query, key, value) if t.dtype not in LASER_DTYPES})
    if refused:
        raise ParametersInvalid(
            f"attention_forward: ascend_laser_attention supports float16 and bfloat16 only, got {', '.join(refused)}"
        )
    half = [t.to(torch.float16) for t in (query, key, value)]  # la_preprocess_input
    out = attention(*half, None, scale, head_first)
    return out.to(torch.float16).to(query.dtype)  # la_postprocess_output


def build_module(strict_device: bool = True) -> types.ModuleType:
    """A fresh module to put at sys.modules["mindiesd"]; `calls` counts calls by the op_type used
    ("runtime" / "static" when no manual op_type applies)."""
    module = types.ModuleType("mindiesd", "CPU reference of mindiesd.attention_forward (tests and the selftest on CPU).")
    module.__spec__ = importlib.machinery.ModuleSpec("mindiesd", loader=None)  # found by importlib.util.find_spec
    module.calls = collections.Counter()
    module.ParametersInvalid = ParametersInvalid

    def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None, fused: bool = True,
                          head_first: bool = False, **kwargs: object) -> torch.Tensor:
        op_type = _check_arguments(query, key, value, scale, fused, kwargs)
        module.calls[op_type or str(kwargs.get("opt_mode", "runtime"))] += 1
        if strict_device:
            require_npu("mindiesd.attention_forward", query, key, value, attn_mask)
        if op_type == "ascend_laser_attention" and attn_mask is not None:
            raise ValueError("attention_forward: ascend_laser_attention takes no attn_mask (it would be dropped)")
        if op_type == "ascend_laser_attention":
            return laser_attention(query, key, value, scale, head_first)
        return attention(query, key, value, attn_mask, scale, head_first)

    module.attention_forward = attention_forward
    return module

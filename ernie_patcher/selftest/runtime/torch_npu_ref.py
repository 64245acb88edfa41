"""A stand-in `torch_npu` for CPU processes: its kernels as CPU references, held to torch_npu 2.14.0's declared signatures.

Hand-written because torch_npu itself cannot load here (it needs torch 2.14 and CANN): only what needs the device
stands in, and each kernel takes exactly the parameters of its schema in torch_npu 2.14.0's
`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml` (names, order, defaults; `Tensor self` is `input` in
Python, as PyTorch's codegen binds it). An undeclared keyword is a TypeError, as on the device.
tests/numerics/test_kernel_contract.py reads the schema out of the torch-npu 2.14.0 wheel and compares.

torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None)
    torch_npu's own decomposition (torch_npu/_inductor/decomposition.py): t * cos + rotate_half(t) * sin, with
    rotate_half(x) = cat(-x2, x1) of the two halves of the last dimension. "interleave" pairs even and odd channels.
    r1 / r2 are 1S1D, BS1D or BSND for a BSND input (Ascend API reference, torch_npu-npu_rotary_mul.md).

torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, ..., atten_mask=None, scale=1., ...)
    Dropout(Softmax(Mask(scale * query @ key^T, atten_mask)), keep_prob) @ value. atten_mask is boolean and True
    means the position does NOT take part (the opposite of SDPA's boolean mask); its shape is BNSS, B1SS, 11SS or
    SS, never [B, 1, 1, Skv]. pre_tockens / next_tockens bound the band of keys each query sees (sparse_mode 0).
    Seven outputs; the first is the attention output in input_layout.

torch_npu.npu_prompt_flash_attention(query, key, value, *, ..., atten_mask=None, ..., num_heads=1, scale_value=1.0,
        pre_tokens=2147483647, next_tokens=0, input_layout="BSH", ...)
    The same attention (MindIE-SD's `prompt_flash_attn` operator calls it), one output.

Only what the code under test uses is implemented; anything else (pse, dropout, varlen, `rotate`) raises.

`torch_npu.npu` answers what MindIE-SD asks at import and dispatch: `device_count()`, `get_soc_version()` (the
chip, a test parameter: A2, A3, A5 or Duo, MindIE-SD's own classes in mindiesd/utils/get_platform.py), and
`is_available()`, which answers False so MindIE-SD does not load its device operator library (built against
torch_npu and CANN). In fake-NPU processes the same object is the "npu" backend's device module, as torch_npu's
own `torch_npu.npu` is `torch.npu`.
"""
from __future__ import annotations

import collections
import importlib.machinery
import types
from typing import Any

import torch

FUSION_ATTENTION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")
MAX_TOKENS = 2147483647
# The SoC version torch_npu reports for each chip class MindIE-SD distinguishes (mindiesd/utils/get_platform.py:
# 200-205 Duo, 220-225 A2, 250-255 A3, 260 A5). Duo (Atlas 300I Duo) registers no laser attention operator.
CHIP_SOC_VERSIONS = {"A2": 220, "A3": 250, "A5": 260, "Duo": 202}
CHIPS = tuple(CHIP_SOC_VERSIONS)


class NotOnNpuError(RuntimeError):
    """A tensor that is not on an NPU reached an NPU kernel."""


def require_npu(kernel: str, *tensors: torch.Tensor | None) -> None:
    """Refuse tensors that are not on an NPU, as the real kernels do."""
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "npu":
            raise NotOnNpuError(f"{kernel} got a tensor on {tensor.device}, not on an NPU")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) of the two halves of the last dimension (torch_npu's decomposition `_rotate_half`)."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """What npu_rotary_mul computes: input * r1 + rotated(input) * r2."""
    if input.ndim != 4 or r1.ndim != 4 or r2.ndim != 4:
        raise ValueError("npu_rotary_mul takes 4-D input, r1 and r2")
    if input.shape[-1] % 2:
        raise ValueError("npu_rotary_mul needs an even last dimension")
    if rotary_mode == "half":
        rotated = rotate_half(input)
    elif rotary_mode == "interleave":
        x1, x2 = input[..., ::2], input[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        raise ValueError(f"npu_rotary_mul: unknown rotary_mode {rotary_mode!r}")
    return input * r1 + rotated * r2


def _to_bnsd(tensor: torch.Tensor, layout: str, head_num: int) -> torch.Tensor:
    if layout == "BNSD":
        return tensor
    if layout == "BSND":
        return tensor.transpose(1, 2)
    if layout == "BSH":
        return tensor.unflatten(-1, (head_num, -1)).transpose(1, 2)
    return tensor.unflatten(-1, (head_num, -1)).permute(1, 2, 0, 3)  # SBH


def _from_bnsd(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return tensor
    if layout == "BSND":
        return tensor.transpose(1, 2)
    if layout == "BSH":
        return tensor.transpose(1, 2).flatten(-2)
    return tensor.permute(2, 0, 1, 3).flatten(-2)  # SBH


def _check_mask_shape(kernel: str, atten_mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_kv: int) -> None:
    accepted = {(batch, heads, seq_q, seq_kv), (batch, 1, seq_q, seq_kv), (1, 1, seq_q, seq_kv), (seq_q, seq_kv)}
    if tuple(atten_mask.shape) not in accepted:
        raise ValueError(
            f"{kernel}: atten_mask shape {tuple(atten_mask.shape)} is none of BNSS, B1SS, 11SS, SS "
            f"for B={batch} N={heads} Sq={seq_q} Skv={seq_kv}"
        )
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"{kernel}: atten_mask must be bool or uint8, got {atten_mask.dtype}")


def masked_attention(kernel: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int,
                     layout: str, atten_mask: torch.Tensor | None, scale: float, pre_tokens: int,
                     next_tokens: int) -> torch.Tensor:
    """softmax(scale * q k^T) v in float32 with the kernels' conventions (mask True = excluded, token band)."""
    if layout not in FUSION_ATTENTION_LAYOUTS:
        raise ValueError(f"{kernel}: input_layout {layout!r} not in {FUSION_ATTENTION_LAYOUTS}")
    if len({query.dtype, key.dtype, value.dtype}) != 1:
        raise TypeError(f"{kernel}: query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    q, k, v = (_to_bnsd(t, layout, head_num) for t in (query, key, value))
    if q.shape[1] != head_num:
        raise ValueError(f"{kernel}: head_num={head_num} but the {layout} query has {q.shape[1]} heads")
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    positions_q = torch.arange(seq_q, device=scores.device).view(-1, 1)
    positions_kv = torch.arange(seq_kv, device=scores.device).view(1, -1)
    excluded = (positions_kv - positions_q > next_tokens) | (positions_q - positions_kv > pre_tokens)
    if atten_mask is not None:
        _check_mask_shape(kernel, atten_mask, batch, heads, seq_q, seq_kv)
        excluded = excluded | atten_mask.to(torch.bool)
    scores = scores.masked_fill(excluded, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(query.dtype)
    return _from_bnsd(out, layout)


class NpuDeviceModule:
    """`torch_npu.npu` (and `torch.npu`): the device queries MindIE-SD and PyTorch make, for one chip."""

    def __init__(self, chip: str) -> None:
        self.chip = chip
        self.config = types.SimpleNamespace(allow_internal_format=False)  # MindIE-SD's MoE module sets it at import

    def set_chip(self, chip: str) -> None:
        if chip not in CHIP_SOC_VERSIONS:
            raise ValueError(f"unknown chip {chip!r}: one of {CHIPS}")
        self.chip = chip

    def get_soc_version(self) -> int:
        return CHIP_SOC_VERSIONS[self.chip]

    def is_available(self) -> bool:
        return False  # MindIE-SD then does not load libPTAExtensionOPS.so (it needs torch_npu and CANN)

    def device_count(self) -> int:
        return 1

    def is_initialized(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        return None

    def synchronize(self, device: Any = None) -> None:
        return None

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        """As torch_npu's torch.npu on a bf16-capable device: diffusers >= 0.41 enters torch.autocast("npu")."""
        return [torch.float16, torch.bfloat16, torch.float32]


def build_module(strict_device: bool = True, chip: str = "A2") -> types.ModuleType:
    """A fresh module to put at sys.modules["torch_npu"]; `calls` counts kernel calls by name.

    strict_device=True refuses tensors that do not report an NPU device (the real kernels' behaviour).
    """
    module = types.ModuleType("torch_npu", "CPU stand-in of torch_npu (tests and the selftest on CPU).")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)  # found by importlib.util.find_spec
    module.__version__ = "2.14.0 (CPU stand-in)"
    module.calls = collections.Counter()
    module.npu = NpuDeviceModule(chip)

    def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                       rotate: torch.Tensor | None = None) -> torch.Tensor:
        module.calls["npu_rotary_mul"] += 1
        if strict_device:
            require_npu("npu_rotary_mul", input, r1, r2)
        if rotate is not None:
            raise NotImplementedError("npu_rotary_mul stand-in: rotate")
        return rotary_mul(input, r1, r2, rotary_mode)

    def npu_fusion_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int, input_layout: str,
        pse: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
        atten_mask: torch.Tensor | None = None, scale: float = 1.0, keep_prob: float = 1.0,
        pre_tockens: int = MAX_TOKENS, next_tockens: int = MAX_TOKENS, inner_precise: int = 0,
        prefix: list[int] | None = None, actual_seq_qlen: list[int] | None = None,
        actual_seq_kvlen: list[int] | None = None, sparse_mode: int = 0, gen_mask_parallel: bool = True,
        sync: bool = False, softmax_layout: str = "", sink: torch.Tensor | None = None,
        dropout_mask: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
        module.calls["npu_fusion_attention"] += 1
        if strict_device:
            require_npu("npu_fusion_attention", query, key, value, atten_mask)
        unsupported = (pse, padding_mask, prefix, actual_seq_qlen, actual_seq_kvlen, sink, dropout_mask)
        if any(value is not None for value in unsupported) or softmax_layout:
            raise NotImplementedError("npu_fusion_attention stand-in: pse / padding_mask / varlen / sink / softmax_layout")
        if keep_prob != 1.0 or sparse_mode != 0:
            raise NotImplementedError("npu_fusion_attention stand-in: dropout and sparse_mode != 0")
        out = masked_attention("npu_fusion_attention", query, key, value, head_num, input_layout, atten_mask,
                               scale, pre_tockens, next_tockens)
        empty = out.new_empty(0)
        return out, empty, empty, empty, 0, 0, 0

    def npu_prompt_flash_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, padding_mask: torch.Tensor | None = None,
        atten_mask: torch.Tensor | None = None, pse_shift: torch.Tensor | None = None,
        actual_seq_lengths: list[int] | None = None, deq_scale1: torch.Tensor | None = None,
        quant_scale1: torch.Tensor | None = None, deq_scale2: torch.Tensor | None = None,
        quant_scale2: torch.Tensor | None = None, quant_offset2: torch.Tensor | None = None, num_heads: int = 1,
        scale_value: float = 1.0, pre_tokens: int = MAX_TOKENS, next_tokens: int = 0, input_layout: str = "BSH",
        num_key_value_heads: int = 0, actual_seq_lengths_kv: list[int] | None = None, sparse_mode: int = 0,
    ) -> torch.Tensor:
        module.calls["npu_prompt_flash_attention"] += 1
        if strict_device:
            require_npu("npu_prompt_flash_attention", query, key, value, atten_mask)
        unsupported = (padding_mask, pse_shift, actual_seq_lengths, deq_scale1, quant_scale1, deq_scale2,
                       quant_scale2, quant_offset2, actual_seq_lengths_kv)
        if any(value is not None for value in unsupported) or sparse_mode != 0 or num_key_value_heads not in (0, num_heads):
            raise NotImplementedError("npu_prompt_flash_attention stand-in: quantisation / varlen / GQA / sparse")
        return masked_attention("npu_prompt_flash_attention", query, key, value, num_heads, input_layout, atten_mask,
                                scale_value, pre_tokens, next_tokens)

    module.npu_rotary_mul = npu_rotary_mul
    module.npu_fusion_attention = npu_fusion_attention
    module.npu_prompt_flash_attention = npu_prompt_flash_attention
    return module


KERNELS = ("npu_rotary_mul", "npu_fusion_attention", "npu_prompt_flash_attention")

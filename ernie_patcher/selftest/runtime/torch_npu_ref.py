"""CPU reference of the two torch_npu kernels the diffusers patches use, from Ascend's documentation.

torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode="half") -> Tensor
    Ascend PyTorch API reference, "torch_npu.npu_rotary_mul" (op-plugin docs/context/torch_npu-npu_rotary_mul.md):
    "half" mode: x1, x2 = torch.chunk(input, 2, -1); x_new = torch.cat((-x2, x1), dim=-1);
    output = r1 * input + r2 * x_new. "interleave" mode: x1 = input[..., ::2], x2 = input[..., 1::2],
    x_new = (-x2, x1) interleaved back. input, r1, r2 are 4-D; for a BSND input r1/r2 are 1S1D, BS1D or
    BSND; the output has the shape and dtype of input.

torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
        atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
        inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
        gen_mask_parallel=True, sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)
    Ascend PyTorch API reference, "torch_npu.npu_fusion_attention":
    attention_out = Dropout(Softmax(Mask(scale * (pse + query @ key^T), atten_mask)), keep_prob) @ value.
    input_layout is one of BSH, SBH, BSND, BNSD; head_num is N. atten_mask is BOOL and "1 means the
    position does NOT take part in the computation, 0 means it does" (the opposite of
    torch.nn.functional.scaled_dot_product_attention's boolean mask); its shape is BNSS, B1SS, 11SS or
    SS (Sq x Skv) -- a [B, 1, 1, Skv] mask is not accepted, which is why diffusers broadcasts it.
    scale multiplies query @ key^T (1/sqrt(D) in practice; the kernel's default is 1). With
    sparse_mode=0, pre_tockens / next_tockens bound the band of keys each query sees. Seven outputs;
    the first is attention_out in input_layout.

Only what the patches use is implemented; anything else (pse, dropout, other sparse modes, TND) raises.
"""
from __future__ import annotations

import collections
import importlib.machinery
import types

import torch

FUSION_ATTENTION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD")


class NotOnNpuError(RuntimeError):
    """A tensor that is not on an NPU reached an NPU kernel."""


def require_npu(kernel: str, *tensors: torch.Tensor | None) -> None:
    """Refuse tensors that are not on an NPU, as the real kernels do."""
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "npu":
            raise NotOnNpuError(f"{kernel} got a tensor on {tensor.device}, not on an NPU")


def rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
    """The documented formula of npu_rotary_mul."""
    if input.ndim != 4 or r1.ndim != 4 or r2.ndim != 4:
        raise ValueError("npu_rotary_mul takes 4-D input, r1 and r2")
    if input.shape[-1] % 2:
        raise ValueError("npu_rotary_mul needs an even last dimension")
    if rotary_mode == "half":
        x1, x2 = torch.chunk(input, 2, -1)
        x_new = torch.cat((-x2, x1), dim=-1)
    elif rotary_mode == "interleave":
        x1, x2 = input[..., ::2], input[..., 1::2]
        x_new = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        raise ValueError(f"npu_rotary_mul: unknown rotary_mode {rotary_mode!r}")
    return r1 * input + r2 * x_new


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


def _check_mask_shape(atten_mask: torch.Tensor, batch: int, heads: int, seq_q: int, seq_kv: int) -> None:
    accepted = {(batch, heads, seq_q, seq_kv), (batch, 1, seq_q, seq_kv), (1, 1, seq_q, seq_kv), (seq_q, seq_kv)}
    if tuple(atten_mask.shape) not in accepted:
        raise ValueError(
            f"npu_fusion_attention: atten_mask shape {tuple(atten_mask.shape)} is none of BNSS, B1SS, 11SS, SS "
            f"for B={batch} N={heads} Sq={seq_q} Skv={seq_kv}"
        )
    if atten_mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"npu_fusion_attention: atten_mask must be bool or uint8, got {atten_mask.dtype}")


def fusion_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    head_num: int,
    input_layout: str,
    pse: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    scale: float = 1.0,
    keep_prob: float = 1.0,
    pre_tockens: int = 2147483647,
    next_tockens: int = 2147483647,
    inner_precise: int = 0,
    prefix: list[int] | None = None,
    actual_seq_qlen: list[int] | None = None,
    actual_seq_kvlen: list[int] | None = None,
    sparse_mode: int = 0,
    gen_mask_parallel: bool = True,
    sync: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """The documented forward of npu_fusion_attention, computed in float32."""
    if input_layout not in FUSION_ATTENTION_LAYOUTS:
        raise ValueError(f"npu_fusion_attention: input_layout {input_layout!r} not in {FUSION_ATTENTION_LAYOUTS}")
    if pse is not None or padding_mask is not None or prefix is not None or actual_seq_qlen is not None:
        raise NotImplementedError("reference npu_fusion_attention: pse / padding_mask / prefix / varlen")
    if keep_prob != 1.0 or sparse_mode != 0:
        raise NotImplementedError("reference npu_fusion_attention: dropout and sparse_mode != 0")
    q, k, v = (_to_bnsd(t, input_layout, head_num) for t in (query, key, value))
    if q.shape[1] != head_num:
        raise ValueError(f"npu_fusion_attention: head_num={head_num} but the {input_layout} query has {q.shape[1]} heads")
    batch, heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    positions_q = torch.arange(seq_q, device=scores.device).view(-1, 1)
    positions_kv = torch.arange(seq_kv, device=scores.device).view(1, -1)
    masked_out = (positions_kv - positions_q > next_tockens) | (positions_q - positions_kv > pre_tockens)
    if atten_mask is not None:
        _check_mask_shape(atten_mask, batch, heads, seq_q, seq_kv)
        masked_out = masked_out | atten_mask.to(torch.bool)
    scores = scores.masked_fill(masked_out, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(query.dtype)
    empty = out.new_empty(0)
    return _from_bnsd(out, input_layout), empty, empty, empty, 0, 0, 0


def build_module(strict_device: bool = True) -> types.ModuleType:
    """A fresh module to put at sys.modules["torch_npu"]; `calls` counts kernel calls by name.

    strict_device=True refuses tensors that do not report an NPU device (the real kernels' behaviour).
    """
    module = types.ModuleType("torch_npu", "CPU reference of torch_npu kernels (tests and the selftest on CPU).")
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)  # found by importlib.util.find_spec
    module.calls = collections.Counter()

    def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half") -> torch.Tensor:
        module.calls["npu_rotary_mul"] += 1
        if strict_device:
            require_npu("npu_rotary_mul", input, r1, r2)
        return rotary_mul(input, r1, r2, rotary_mode)

    def npu_fusion_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, head_num: int,
                             input_layout: str, **kwargs: object) -> tuple:
        module.calls["npu_fusion_attention"] += 1
        if strict_device:
            require_npu("npu_fusion_attention", query, key, value, kwargs.get("atten_mask"))
        return fusion_attention(query, key, value, head_num, input_layout, **kwargs)

    module.npu_rotary_mul = npu_rotary_mul
    module.npu_fusion_attention = npu_fusion_attention
    return module

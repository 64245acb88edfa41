"""MindIE-SD's own code under vllm-omni's NPU attention backend in the SP tier, over the kernel stand-ins.

vllm-omni's FlashAttentionBackend.forward_npu (every release 0.20.0-0.30.0; `forward_fa_npu` from 0.22.0 on) calls
`mindiesd.attention_forward(q, k, v, attn_mask=..., opt_mode="manual", op_type="fused_attn_score", layout="BNSD")`
on [B, S, N, D] tensors. Here that is the real mindiesd 3.1.0 (the tier's overlay), imported over the torch_npu
stand-in (ernie_patcher/selftest/runtime/torch_npu_ref.py; mindiesd_ops.py), so MindIE-SD itself resolves the
operator for the chip (a parameter: A2 by default), applies MINDIE_SD_FA_TYPE, falls back from laser attention to
fused_attn_score below 2048 tokens, and runs its FlashAttentionScore (keep-mask inverted) down to the stand-in
`npu_fusion_attention`, which refuses every atten_mask shape the real kernel refuses (only BNSS, B1SS, 11SS, SS)
and non-boolean masks. The stand-ins and MindIE-SD's operators count their calls, so a test sees what ran.

The device check of the stand-ins is off (strict_device=False): the SP workers exchange tensors with gloo, which
moves CPU tensors only, so these tensors stay plain CPU tensors while the platform reports NPU. The torch_npu
stand-in stays in sys.modules once installed: MindIE-SD's modules keep the torch_npu they imported.
"""
from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

from ernie_patcher.selftest.runtime import mindiesd_ops


@contextmanager
def installed(chip: str = "A2") -> Iterator[types.ModuleType]:
    """The real mindiesd over the torch_npu stand-in, reporting CHIP; yields the torch_npu stand-in, its counters
    and MindIE-SD's cleared."""
    torch_npu = mindiesd_ops.torch_npu_module(strict_device=False, chip=chip)
    mindiesd_ops.load(chip, strict_device=False)
    mindiesd_ops.clear(torch_npu)
    try:
        yield torch_npu
    finally:
        mindiesd_ops.set_chip("A2")


def kernel_calls(torch_npu: types.ModuleType) -> dict[str, int]:
    """What ran since `installed()`: torch_npu's kernels and MindIE-SD's operators (see mindiesd_ops.routes)."""
    return mindiesd_ops.routes(torch_npu)

"""The Ascend kernels vllm-omni's NPU attention backend reaches, as CPU references, for the SP tier.

vllm-omni's FlashAttentionBackend.forward_npu (every release 0.20.0-0.30.0; `forward_fa_npu` from
0.22.0 on) calls `mindiesd.attention_forward(q, k, v, attn_mask=..., opt_mode="manual",
op_type="fused_attn_score", layout="BNSD")` on [B, S, N, D] tensors. MindIE-SD resolves the
operator (the environment variable MINDIE_SD_FA_TYPE overrides op_type, in
mindiesd/layers/flash_attn/attention_forward.py) and its `fused_attn_score` operator
(FlashAttentionScore, mindiesd/layers/flash_attn/fused_attn_score.py) inverts the keep-mask and calls
`torch_npu.npu_fusion_attention(..., atten_mask=~mask, input_layout="BNSD", scale=scale,
pre_tockens=2147483647, next_tockens=2147483647, head_num=N)`. Here that chain runs on the CPU
references in ernie_patcher/selftest/runtime: `mindiesd_ref` for argument checks and the laser route, and
`torch_npu_ref.fusion_attention`, which refuses every atten_mask shape the real kernel refuses
(only BNSS, B1SS, 11SS and SS; no [B, 1, 1, S]) and non-boolean masks. Both count their calls, so a
test can tell the NPU path really ran.

The device check of the references is off (strict_device=False): the SP workers exchange tensors
with gloo, which moves CPU tensors only, so these tensors stay plain CPU tensors while the platform
reports NPU.
"""
from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ernie_patcher.selftest.runtime import mindiesd_ref, torch_npu_ref

MAX_TOKENS = 2147483647


def build() -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh (mindiesd, torch_npu) reference modules, mindiesd's fused_attn_score going through
    torch_npu's npu_fusion_attention as MindIE-SD's FlashAttentionScore does."""
    torch_npu = torch_npu_ref.build_module(strict_device=False)
    mindiesd = mindiesd_ref.build_module(strict_device=False)
    reference_forward = mindiesd.attention_forward

    def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attn_mask: torch.Tensor | None = None, scale: float | None = None, fused: bool = True,
                          head_first: bool = False, **kwargs: object) -> torch.Tensor:
        if kwargs.get("opt_mode") == "manual" and os.environ.get("MINDIE_SD_FA_TYPE"):
            kwargs["op_type"] = os.environ["MINDIE_SD_FA_TYPE"]
        op_type = mindiesd_ref._check_arguments(query, key, value, scale, fused, kwargs)
        if op_type != "fused_attn_score":
            return reference_forward(query, key, value, attn_mask, scale, fused, head_first, **kwargs)
        mindiesd.calls["fused_attn_score"] += 1
        if not head_first:
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        out = torch_npu.npu_fusion_attention(
            query, key, value, query.shape[1], "BNSD",
            atten_mask=None if attn_mask is None else ~attn_mask.to(torch.bool),
            scale=query.shape[-1] ** -0.5 if scale is None else scale,
            pre_tockens=MAX_TOKENS, next_tockens=MAX_TOKENS,
        )[0]
        return out if head_first else out.transpose(1, 2)

    mindiesd.attention_forward = attention_forward
    return mindiesd, torch_npu


@contextmanager
def installed() -> Iterator[tuple[types.ModuleType, types.ModuleType]]:
    """Fresh references, mindiesd importable (sys.modules["mindiesd"]) while the context lasts.

    torch_npu is not put in sys.modules: the backend reaches it only through MindIE-SD here, and an
    importable torch_npu would change what other libraries in the process detect.
    """
    mindiesd, torch_npu = build()
    sys.modules["mindiesd"] = mindiesd
    try:
        yield mindiesd, torch_npu
    finally:
        del sys.modules["mindiesd"]

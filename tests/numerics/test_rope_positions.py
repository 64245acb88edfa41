"""diffusers-rope at ERNIE-Image's real positions: the patched apply_rotary_emb_npu on torch_npu's npu_rotary_mul.

The tiny models of test_model_numerics.py see positions below 64. A real ERNIE-Image request has 1024² or 2048²
pixels (a 64x64 or 128x128 latent grid) and 256 or 512 text tokens; its RoPE (theta 256, axes 32/48/48 of head_dim
128) turns an image token at (T, row, column) into angles of up to max(T, grid - 1) radians. There, rounding the
angles to bfloat16 before cos/sin is off by up to 1 rad: these checks fail it. The angles come from the release's
own ErnieImageEmbedND3 (checks.real_rope_angles); the reference is computed here in float64.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ernie_patcher.selftest.runtime import checks, mindiesd_ops

CASES = {"1024x1024+256": (1024, 256), "2048x2048+512": (2048, 512)}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture
def patched_transformer(patched_dispatch: ModuleType, patched_site: Path) -> ModuleType:
    """The patched transformer_ernie_image module (imported while patched_dispatch has the tree on sys.path),
    with the torch_npu stand-in importable (device check off: CPU tensors)."""
    mindiesd_ops.torch_npu_module(strict_device=False, chip="A2")
    module = importlib.import_module("diffusers.models.transformers.transformer_ernie_image")
    assert Path(module.__file__).is_relative_to(patched_site), module.__file__
    return module


def reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float64, cos and sin of the float32 angles rounded to x's dtype."""
    cos, sin = (f(angles.double()).to(x.dtype).double() for f in (torch.cos, torch.sin))
    x64 = x.double()
    x1, x2 = x64.chunk(2, dim=-1)
    return x64 * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_rope_at_real_positions(patched_transformer: ModuleType, case: str, dtype: torch.dtype,
                                capsys: pytest.CaptureFixture[str]) -> None:
    side, text_len = CASES[case]
    angles = checks.real_rope_angles(patched_transformer, side, text_len)
    assert angles.shape == (1, (side // 16) ** 2 + text_len, 1, 128)
    assert angles.abs().max().item() >= text_len - 1, "real positions reach the text length in radians"
    x = torch.randn(1, angles.shape[1], 2, 128, generator=torch.Generator().manual_seed(side)).to(dtype)
    torch_npu = sys.modules["torch_npu"]
    torch_npu.calls.clear()
    out = patched_transformer.apply_rotary_emb_npu(x, angles)
    assert torch_npu.calls == {"npu_rotary_mul": 1}
    error = (out.double() - reference(x, angles)).abs().max().item()
    bar = 8 * UNIT_ROUNDOFF[dtype] * x.abs().max().item()  # the selftest's bar (checks.check_rope)
    with capsys.disabled():
        print(f"\n[rope] {case} {dtype}: max abs {error:.3g} (bar {bar:.3g}, angles up to "
              f"{angles.abs().max().item():.0f} rad)")
    assert error <= bar

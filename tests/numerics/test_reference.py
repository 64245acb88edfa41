"""The CPU references themselves agree with the documented formulas and refuse what the kernels refuse.

They are the yardstick of the NPU-branch tests, so they are checked against torch's own attention and an
independent reading of the rotate-half formula, not against the code under test.
"""
from __future__ import annotations

import pytest
import torch

from ernie_patcher.selftest.runtime import mindiesd_ref, torch_npu_ref

FP32_TOLERANCE = 1e-6


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sdpa_bsnd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep, scale=scale
    )
    return out.transpose(1, 2)


def test_rotary_mul_half_rotates_pairs_of_halves() -> None:
    """Each channel i of the first half pairs with i + D/2: (a, b) -> (a cos - b sin, b cos + a sin)."""
    x, angles = _randn(2, 3, 2, 8), _randn(2, 3, 1, 8, seed=1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch_npu_ref.rotary_mul(x, cos, sin, rotary_mode="half")
    a, b = x[..., :4], x[..., 4:]
    assert torch.allclose(out[..., :4], a * cos[..., :4] - b * sin[..., :4], atol=FP32_TOLERANCE)
    assert torch.allclose(out[..., 4:], b * cos[..., 4:] + a * sin[..., 4:], atol=FP32_TOLERANCE)


def test_rotary_mul_interleave_differs_from_half() -> None:
    x, angles = _randn(1, 2, 1, 8), _randn(1, 2, 1, 8, seed=1)
    half = torch_npu_ref.rotary_mul(x, torch.cos(angles), torch.sin(angles), "half")
    interleave = torch_npu_ref.rotary_mul(x, torch.cos(angles), torch.sin(angles), "interleave")
    assert not torch.allclose(half, interleave)


def test_rotary_mul_needs_four_dims() -> None:
    with pytest.raises(ValueError):
        torch_npu_ref.rotary_mul(_randn(3, 8), _randn(3, 8), _randn(3, 8))


def test_fusion_attention_mask_true_means_masked_out() -> None:
    q, k, v = _randn(2, 6, 2, 8), _randn(2, 6, 2, 8, seed=1), _randn(2, 6, 2, 8, seed=2)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[1, :, :, 4:] = False
    out = torch_npu_ref.fusion_attention(q, k, v, 2, "BSND", atten_mask=~keep, scale=8**-0.5)
    assert isinstance(out, tuple) and len(out) == 7
    assert (out[0] - _sdpa_bsnd(q, k, v, keep)).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.parametrize("shape", [(2, 1, 1, 6), (2, 6)], ids=["B11S", "BS"])
def test_fusion_attention_refuses_unbroadcast_masks(shape: tuple[int, ...]) -> None:
    q = _randn(2, 4, 2, 8)
    k = v = _randn(2, 6, 2, 8, seed=1)
    with pytest.raises(ValueError, match="atten_mask shape"):
        torch_npu_ref.fusion_attention(q, k, v, 2, "BSND", atten_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["BNSD", "BSH", "SBH"])
def test_fusion_attention_layouts_agree(layout: str) -> None:
    q, k, v = _randn(2, 5, 3, 4), _randn(2, 5, 3, 4, seed=1), _randn(2, 5, 3, 4, seed=2)
    expected = torch_npu_ref.fusion_attention(q, k, v, 3, "BSND", scale=0.5)[0]
    convert = {
        "BNSD": lambda t: t.transpose(1, 2),
        "BSH": lambda t: t.flatten(-2),
        "SBH": lambda t: t.flatten(-2).transpose(0, 1),
    }[layout]
    out = torch_npu_ref.fusion_attention(convert(q), convert(k), convert(v), 3, layout, scale=0.5)[0]
    assert torch.allclose(out, convert(expected), atol=FP32_TOLERANCE)


def test_fusion_attention_checks_head_num() -> None:
    q = _randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="head_num"):
        torch_npu_ref.fusion_attention(q, q, q, 4, "BSND")


def test_strict_module_refuses_cpu_tensors_and_counts() -> None:
    module = torch_npu_ref.build_module(strict_device=True)
    x = _randn(1, 2, 1, 8)
    with pytest.raises(torch_npu_ref.NotOnNpuError):
        module.npu_rotary_mul(x, x, x, rotary_mode="half")
    with pytest.raises(torch_npu_ref.NotOnNpuError):
        module.npu_fusion_attention(x, x, x, 1, "BSND")
    assert module.calls == {"npu_rotary_mul": 1, "npu_fusion_attention": 1}


def test_attention_forward_bsnd_in_bsnd_out() -> None:
    module = mindiesd_ref.build_module(strict_device=False)
    q, k, v = _randn(1, 7, 2, 8), _randn(1, 9, 2, 8, seed=1), _randn(1, 9, 2, 8, seed=2)
    out = module.attention_forward(q, k, v, scale=0.3, opt_mode="manual", op_type="prompt_flash_attn", layout="BNSD")
    assert out.shape == q.shape
    assert (out - _sdpa_bsnd(q, k, v, scale=0.3)).abs().max().item() <= FP32_TOLERANCE
    assert module.calls == {"prompt_flash_attn": 1}


def _laser(module: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return module.attention_forward(q, k, v, scale=0.3, opt_mode="manual", op_type="ascend_laser_attention", layout="BNSD")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_laser_attention_refuses_other_than_half(dtype: torch.dtype) -> None:
    """MindIE-SD's laser attention takes float16 / bfloat16 only and raises ParametersInvalid otherwise."""
    module = mindiesd_ref.build_module(strict_device=False)
    q = _randn(1, 7, 2, 8).to(dtype)
    with pytest.raises(module.ParametersInvalid, match="float16 and bfloat16 only"):
        _laser(module, q, q, q)
    with pytest.raises(mindiesd_ref.ParametersInvalid):
        _laser(module, q.to(torch.bfloat16), q.to(torch.bfloat16), q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_laser_attention_computes_in_fp16_and_returns_the_input_dtype(dtype: torch.dtype) -> None:
    """la_preprocess_input casts to fp16, la_postprocess_output casts the fp16 output back: the result is fp32
    attention of the (exactly representable) inputs rounded to fp16, then to DTYPE (one DTYPE ulp at most)."""
    module = mindiesd_ref.build_module(strict_device=False)
    q, k, v = (_randn(1, 7, 2, 8, seed=seed).to(dtype) for seed in range(3))
    out = _laser(module, q, k, v)
    expected = _sdpa_bsnd(q.float(), k.float(), v.float(), scale=0.3).to(torch.float16).to(dtype)
    assert out.dtype == dtype and out.shape == q.shape
    ulp = torch.finfo(dtype).eps * expected.float().abs().max().item()
    assert (out.float() - expected.float()).abs().max().item() <= ulp


def test_laser_attention_models_the_fp16_overflow_of_bf16_inputs() -> None:
    """A bf16 value beyond fp16's range (65504) becomes inf in la_preprocess_input; fusion attention keeps bf16."""
    module = mindiesd_ref.build_module(strict_device=False)
    q, k, v = (_randn(1, 7, 2, 8, seed=seed).to(torch.bfloat16) for seed in range(3))
    v[0, 3, 0, 0] = 1.0e5
    laser = _laser(module, q, k, v)
    fusion = torch_npu_ref.fusion_attention(q, k, v, 2, "BSND", scale=0.3)[0]
    assert not torch.isfinite(laser[:, :, 0]).all()
    assert torch.isfinite(fusion).all()


def test_attention_forward_head_first_and_default_scale() -> None:
    module = mindiesd_ref.build_module(strict_device=False)
    q, k, v = _randn(1, 2, 7, 8), _randn(1, 2, 7, 8, seed=1), _randn(1, 2, 7, 8, seed=2)
    out = module.attention_forward(q, k, v, head_first=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - expected).abs().max().item() <= FP32_TOLERANCE
    assert module.calls == {"runtime": 1}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"scale": 1}, TypeError),
        ({"opt_mode": "fastest"}, ValueError),
        ({"opt_mode": "manual", "op_type": "laser"}, ValueError),
        ({"opt_mode": "manual", "layout": "SBH"}, ValueError),
        ({"opt_mode": "manual", "op_type": "ascend_laser_attention", "attn_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)}, ValueError),
    ],
    ids=["int-scale", "opt-mode", "op-type", "layout", "laser-with-mask"],
)
def test_attention_forward_refuses_undocumented_arguments(kwargs: dict, error: type[Exception]) -> None:
    module = mindiesd_ref.build_module(strict_device=False)
    q = _randn(1, 4, 1, 8)
    with pytest.raises(error):
        module.attention_forward(q, q, q, **kwargs)

"""The kernel stand-ins themselves agree with the documented formulas and refuse what the kernels refuse.

They are the yardstick of the NPU-branch tests, so they are checked against torch's own attention and an
independent reading of the rotate-half formula, not against the code under test. Their signatures are checked
against torch_npu's and MindIE-SD's own declarations in test_kernel_contract.py.
"""
from __future__ import annotations

import pytest
import torch

from ernie_patcher.selftest.runtime import mindiesd_ops, torch_npu_ref

FP32_TOLERANCE = 1e-6


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _fusion():
    return torch_npu_ref.build_module(strict_device=False).npu_fusion_attention


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
    out = _fusion()(q, k, v, 2, "BSND", atten_mask=~keep, scale=8**-0.5)
    assert isinstance(out, tuple) and len(out) == 7
    assert (out[0] - _sdpa_bsnd(q, k, v, keep)).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.parametrize("shape", [(2, 1, 1, 6), (2, 6)], ids=["B11S", "BS"])
def test_fusion_attention_refuses_unbroadcast_masks(shape: tuple[int, ...]) -> None:
    q = _randn(2, 4, 2, 8)
    k = v = _randn(2, 6, 2, 8, seed=1)
    with pytest.raises(ValueError, match="atten_mask shape"):
        _fusion()(q, k, v, 2, "BSND", atten_mask=torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["BNSD", "BSH", "SBH"])
def test_fusion_attention_layouts_agree(layout: str) -> None:
    q, k, v = _randn(2, 5, 3, 4), _randn(2, 5, 3, 4, seed=1), _randn(2, 5, 3, 4, seed=2)
    expected = _fusion()(q, k, v, 3, "BSND", scale=0.5)[0]
    convert = {
        "BNSD": lambda t: t.transpose(1, 2),
        "BSH": lambda t: t.flatten(-2),
        "SBH": lambda t: t.flatten(-2).transpose(0, 1),
    }[layout]
    out = _fusion()(convert(q), convert(k), convert(v), 3, layout, scale=0.5)[0]
    assert torch.allclose(out, convert(expected), atol=FP32_TOLERANCE)


def test_fusion_attention_checks_head_num() -> None:
    q = _randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="head_num"):
        _fusion()(q, q, q, 4, "BSND")


def test_strict_module_refuses_cpu_tensors_and_counts() -> None:
    module = torch_npu_ref.build_module(strict_device=True)
    x = _randn(1, 2, 1, 8)
    with pytest.raises(torch_npu_ref.NotOnNpuError):
        module.npu_rotary_mul(x, x, x, rotary_mode="half")
    with pytest.raises(torch_npu_ref.NotOnNpuError):
        module.npu_fusion_attention(x, x, x, 1, "BSND")
    assert module.calls == {"npu_rotary_mul": 1, "npu_fusion_attention": 1}


def _laser_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """The mindiesd::la stand-in on BSND tensors, padded as la_preprocess_input pads them (the seq to 256, head_dim
    to 128) and called as AscendLaserAttention calls it; the output cropped back to BSND."""
    seq, dim = q.shape[1], q.shape[-1]
    pad = -seq % 256
    padded = [torch.nn.functional.pad(t.transpose(1, 2), (0, 128 - dim, 0, pad)) for t in (q, k, v)]
    pre_tokens = pad or 2147483647
    _, out = mindiesd_ops.laser_attention(*padded, None, None, None, 0.3, q.shape[2], "BNSD", 1.0, pre_tokens, 1, True,
                                          **kwargs)
    return out[:, :, :seq, :dim].transpose(1, 2)


@pytest.mark.parametrize("seq", [256, 300], ids=["no-padding", "44-padded-keys"])
def test_laser_op_excludes_the_padded_keys(seq: int) -> None:
    q, k, v = (_randn(1, seq, 2, 8, seed=seed).to(torch.float16) for seed in range(3))
    out = _laser_op(q, k, v)
    expected = _sdpa_bsnd(q.float(), k.float(), v.float(), scale=0.3)
    assert out.dtype == torch.float16
    assert (out.float() - expected).abs().max().item() <= 2.0**-11 * expected.abs().max().item() + FP32_TOLERANCE


@pytest.mark.parametrize(
    ("dtypes", "error"),
    [((torch.float32,) * 3, TypeError), ((torch.float16, torch.bfloat16, torch.bfloat16), TypeError)],
    ids=["fp32", "mixed"],
)
def test_laser_op_takes_one_half_dtype(dtypes: tuple[torch.dtype, ...], error: type[Exception]) -> None:
    q, k, v = (_randn(1, 256, 2, 128, seed=seed).to(dtype).transpose(1, 2) for seed, dtype in enumerate(dtypes))
    with pytest.raises(error, match="float16"):
        mindiesd_ops.laser_attention(q, k, v, scale_value=0.3, head_num=2)


def test_laser_op_refuses_unpadded_shapes_and_masks() -> None:
    q = _randn(1, 2, 300, 128).to(torch.float16)
    with pytest.raises(ValueError, match="not padded"):
        mindiesd_ops.laser_attention(q, q, q, head_num=2)
    q = _randn(1, 2, 256, 128).to(torch.float16)
    with pytest.raises(NotImplementedError, match="masks"):
        mindiesd_ops.laser_attention(q, q, q, atten_mask=torch.zeros(256, 256, dtype=torch.float16), head_num=2)


def test_device_module_answers_the_chip() -> None:
    module = torch_npu_ref.build_module(chip="A5")
    assert module.npu.get_soc_version() == 260 and module.npu.device_count() == 1
    assert not module.npu.is_available(), "MindIE-SD must not load its device library here"
    module.npu.set_chip("Duo")
    assert module.npu.get_soc_version() == 202
    with pytest.raises(ValueError, match="unknown chip"):
        module.npu.set_chip("A9")

"""diffusers-attention (diffusers_attention_dispatch.patch on diffusers 0.38.0, its 0.41+ variant on 0.42.1), on
the real patched attention_dispatch.py imported in this process.

_native_npu_attention is called directly with CPU tensors. MindIE-SD is the real mindiesd 3.1.0 (the tier's
overlay), imported over the torch_npu stand-in (ernie_patcher/selftest/runtime/torch_npu_ref.py), with only its
device operator `mindiesd::la` standing in (mindiesd_ops.py): its own attention_forward dispatch, per-chip
operator registries, MINDIE_SD_FA_TYPE, FlashAttentionScore and AscendLaserAttention run. `npu_fusion_attention`
is supplied as the module global that diffusers' guarded `from torch_npu import npu_fusion_attention` sets. The
chip torch_npu reports (A2, A3, A5, or Duo: no laser operator) is a test parameter. The stand-ins' device check
is off here (routing and numerics tests on CPU tensors); test_model_numerics.py exercises it.

The laser route takes float16 / bfloat16 only (MindIE-SD raises ParametersInvalid on float32), so the tests that
exercise it, or a reason other than dtype to avoid it, run in half precision; float32 must always reach
npu_fusion_attention.
"""
from __future__ import annotations

import ast
import importlib.abc
import types
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from ernie_patcher.selftest.runtime import mindiesd_ops

FP32_TOLERANCE = 1e-6
HALF_DTYPES = [torch.bfloat16, torch.float16]
# Unit roundoff (2^-significant bits) of the half dtypes.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _half_tolerance(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """Bound for a half-precision route against fp32 attention on the same (already half) inputs.

    What is left is rounding: bf16 -> fp16 is exact in fp16's normal range (8 significant bits into 11;
    below it the absolute error is < 2^-24), so the laser route rounds the output once to fp16 (<= 2^-12
    relative) and, for bf16, once more to bf16 (<= 2^-9); fusion attention rounds once to the input dtype.
    u(dtype) * max |expected| covers each, plus the fp32 arithmetic's own 1e-6.
    """
    return UNIT_ROUNDOFF[dtype] * expected.abs().max().item() + FP32_TOLERANCE


@pytest.fixture
def kernels(patched_dispatch: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The torch_npu stand-in with the real mindiesd over it, an A2 chip, no MINDIE_SD_FA_TYPE, counters and
    the patch's MindIE-SD cache (with its refusal) cleared before and after."""
    torch_npu = mindiesd_ops.torch_npu_module(strict_device=False, chip="A2")
    mindiesd_ops.load("A2", strict_device=False)
    monkeypatch.setattr(patched_dispatch, "npu_fusion_attention", torch_npu.npu_fusion_attention)
    monkeypatch.delenv("MINDIE_SD_FA_TYPE", raising=False)
    mindiesd_ops.clear(torch_npu)
    patched_dispatch._mindiesd_attention_forward.cache_clear()
    yield torch_npu
    patched_dispatch._mindiesd_attention_forward.cache_clear()
    mindiesd_ops.set_chip("A2")


def routes(torch_npu: types.ModuleType) -> dict[str, int]:
    return mindiesd_ops.routes(torch_npu)


def _qkv(seq_q: int, seq_kv: int, heads: int = 2, head_dim: int = 8, batch: int = 1,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal query, key and value, [B, S, N, D], drawn in fp32 and cast to DTYPE."""
    generator = torch.Generator().manual_seed(seq_q * 7 + seq_kv + head_dim)
    query = torch.randn(batch, seq_q, heads, head_dim, generator=generator)
    key = torch.randn(batch, seq_kv, heads, head_dim, generator=generator)
    value = torch.randn(batch, seq_kv, heads, head_dim, generator=generator)
    return tuple(t.to(dtype) for t in (query, key, value))


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's SDPA on [B, S, N, D] tensors, in fp32; a boolean mask is True where attended."""
    q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _padding_mask(batch: int, seq_kv: int, valid: list[int]) -> torch.Tensor:
    """[B, 1, 1, Skv] boolean, True for the first valid[b] keys (the ERNIE-Image transformer's mask)."""
    return (torch.arange(seq_kv).view(1, -1) < torch.tensor(valid).view(-1, 1))[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------
# is_supported_laser_attention


@pytest.mark.parametrize(
    ("head_dim", "q_seqlen", "kv_seqlen", "supported"),
    [
        (128, 4000, 4000, True),
        (128, 3999, 3999, False),
        (128, 4001, 4001, True),
        (129, 4000, 4000, False),
        (129, 118404, 119056, False),
        (64, 1_000_000, 1_000_000, True),
        (128, 118404, 119056, True),
        (128, 119056, 118404, True),
        (128, 118500, 118900, True),
        (128, 118403, 118404, False),
        (128, 118404, 118403, False),
        (128, 119056, 119057, False),
        (128, 119057, 119056, False),
        (128, 4000, 8000, False),
        (128, 8000, 4000, False),
        (128, 118404, 4000, False),
        (1, 118403, 118403, True),
    ],
)
def test_is_supported_laser_attention(
    patched_dispatch: ModuleType, head_dim: int, q_seqlen: int, kv_seqlen: int, supported: bool
) -> None:
    assert patched_dispatch.is_supported_laser_attention(head_dim, q_seqlen, kv_seqlen) is supported


# ---------------------------------------------------------------------------------------------------------
# _broadcast_attn_mask_npu


@pytest.mark.parametrize(("seq_q", "seq_kv"), [(5, 5), (3, 7)])
def test_broadcast_batch_by_keys_mask(patched_dispatch: ModuleType, seq_q: int, seq_kv: int) -> None:
    query, key, _ = _qkv(seq_q, seq_kv, batch=2)
    mask = torch.tensor([[True] * seq_kv, [True] * 2 + [False] * (seq_kv - 2)])
    out = patched_dispatch._broadcast_attn_mask_npu(query, key, mask)
    assert out.shape == (2, 1, seq_q, seq_kv)
    assert out.is_contiguous()
    assert torch.equal(out, mask[:, None, None, :].expand(2, 1, seq_q, seq_kv))


@pytest.mark.parametrize(("seq_q", "seq_kv"), [(5, 5), (3, 7)])
def test_broadcast_four_dim_key_mask(patched_dispatch: ModuleType, seq_q: int, seq_kv: int) -> None:
    query, key, _ = _qkv(seq_q, seq_kv, batch=2)
    mask = _padding_mask(2, seq_kv, [seq_kv, 2])
    out = patched_dispatch._broadcast_attn_mask_npu(query, key, mask)
    assert out.shape == (2, 1, seq_q, seq_kv)
    assert out.is_contiguous()
    for row in range(seq_q):
        assert torch.equal(out[:, :, row, :], mask[:, :, 0, :])


def test_broadcast_keeps_dtype_and_values_of_float_masks(patched_dispatch: ModuleType) -> None:
    query, key, _ = _qkv(4, 6, batch=2)
    mask = torch.randn(2, 1, 1, 6)
    out = patched_dispatch._broadcast_attn_mask_npu(query, key, mask)
    assert out.dtype == torch.float32
    assert torch.equal(out, mask.expand(2, 1, 4, 6))


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 4, 6), (2, 2, 4, 6), (1, 1, 4, 6), (4, 6)],
    ids=["B1SS", "BNSS", "11SS", "SS"],
)
def test_broadcast_leaves_full_masks_untouched(patched_dispatch: ModuleType, shape: tuple[int, ...]) -> None:
    query, key, _ = _qkv(4, 6, batch=2)
    mask = torch.rand(shape) > 0.5
    assert patched_dispatch._broadcast_attn_mask_npu(query, key, mask) is mask


def test_broadcast_none_is_none(patched_dispatch: ModuleType) -> None:
    query, key, _ = _qkv(4, 6)
    assert patched_dispatch._broadcast_attn_mask_npu(query, key, None) is None


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq_q=st.integers(1, 9),
    seq_kv=st.integers(1, 9),
    four_dim=st.booleans(),
    data=st.data(),
)
def test_broadcast_property(
    patched_dispatch: ModuleType, batch: int, seq_q: int, seq_kv: int, four_dim: bool, data: st.DataObject
) -> None:
    query, key, _ = _qkv(seq_q, seq_kv, batch=batch)
    bits = data.draw(st.lists(st.booleans(), min_size=batch * seq_kv, max_size=batch * seq_kv))
    keys_mask = torch.tensor(bits, dtype=torch.bool).view(batch, seq_kv)
    mask = keys_mask[:, None, None, :] if four_dim else keys_mask
    out = patched_dispatch._broadcast_attn_mask_npu(query, key, mask)
    assert out.shape == (batch, 1, seq_q, seq_kv) and out.is_contiguous()
    assert torch.equal(out, keys_mask[:, None, None, :].expand(batch, 1, seq_q, seq_kv))


@pytest.fixture
def pristine_mask_npu(pristine_site: Path) -> Callable:
    """The release's own `_maybe_modify_attn_mask_npu`, compiled from the pristine file (it needs only torch)."""
    source = (pristine_site / "diffusers/models/attention_dispatch.py").read_text()
    (node,) = [n for n in ast.parse(source).body
               if isinstance(n, ast.FunctionDef) and n.name == "_maybe_modify_attn_mask_npu"]
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "pristine attention_dispatch.py", "exec"), namespace)
    return namespace["_maybe_modify_attn_mask_npu"]


@pytest.mark.parametrize(
    "shape",
    [(2, 6), (2, 1, 1, 6), (2, 2, 1, 6), (2, 3, 1, 6), (2, 1, 4, 6), (2, 2, 4, 6), (1, 1, 4, 6), (4, 6)],
    ids=["BS", "B11S", "BN1S", "B31S", "B1SS", "BNSS", "11SS", "SS"],
)
def test_npu_mask_preparation_equals_the_release(
    patched_dispatch: ModuleType, pristine_mask_npu: Callable, shape: tuple[int, ...]
) -> None:
    """The patch moves the broadcast into _broadcast_attn_mask_npu: the mask npu_fusion_attention receives is
    exactly what the pristine release gives, for every shape it handles (0.41+ also broadcasts [B, N, 1, Skv])."""
    query, key, _ = _qkv(4, 6, heads=2, batch=2)
    generator = torch.Generator().manual_seed(len(shape) * 10 + shape[1])
    mask = torch.rand(shape, generator=generator) > 0.3
    mask.view(-1)[0] = False  # never all-valid: that mask is dropped, tested below
    expected = pristine_mask_npu(query, key, mask)
    out = patched_dispatch._maybe_modify_attn_mask_npu(query, key, mask)
    assert out.shape == expected.shape and out.is_contiguous() == expected.is_contiguous()
    assert torch.equal(out, expected)


def test_per_head_key_mask_is_broadcast_from_diffusers_0_41(patched_dispatch: ModuleType, diffusers_version: str) -> None:
    """[B, N, 1, Skv]: diffusers 0.41 widened the broadcast to it, the 0.41+ variant keeps that; 0.38 leaves it as is."""
    query, key, _ = _qkv(4, 6, heads=2, batch=2)
    mask = _padding_mask(2, 6, [6, 2]).expand(2, 2, 1, 6).clone()
    out = patched_dispatch._broadcast_attn_mask_npu(query, key, mask)
    if Version(diffusers_version) >= Version("0.41.0"):
        assert out.shape == (2, 2, 4, 6) and out.is_contiguous()
        assert torch.equal(out, mask.expand(2, 2, 4, 6))
    else:
        assert out is mask


def test_npu_mask_is_broadcast_and_inverted(patched_dispatch: ModuleType) -> None:
    """What npu_fusion_attention receives: [B, 1, Sq, Skv] with True meaning masked out; an all-valid mask is dropped."""
    query, key, _ = _qkv(3, 5, batch=2)
    mask = _padding_mask(2, 5, [5, 2])
    out = patched_dispatch._maybe_modify_attn_mask_npu(query, key, mask)
    assert out.shape == (2, 1, 3, 5) and out.dtype == torch.bool
    assert torch.equal(out, ~mask.expand(2, 1, 3, 5))
    assert patched_dispatch._maybe_modify_attn_mask_npu(query, key, _padding_mask(2, 5, [5, 5])) is None


# ---------------------------------------------------------------------------------------------------------
# _native_npu_attention routing


@pytest.mark.parametrize(
    ("dtype", "kernel"),
    [(torch.float32, "npu_fusion_attention"), (torch.bfloat16, "ascend_laser_attention"),
     (torch.float16, "ascend_laser_attention")],
    ids=["fp32", "bf16", "fp16"],
)
def test_laser_route_takes_half_precision_only(
    patched_dispatch: ModuleType, kernels: types.ModuleType, dtype: torch.dtype, kernel: str
) -> None:
    """Unmasked [1, 4096, 2, 64] self-attention, laser-sized: MindIE-SD refuses fp32 on the laser route
    (ParametersInvalid), so fp32 goes to npu_fusion_attention; bf16 and fp16 take laser attention."""
    torch_npu = kernels
    query, key, value = _qkv(4096, 4096, head_dim=64, dtype=dtype)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {kernel: 1}
    assert out.shape == query.shape and out.dtype == dtype
    expected = _sdpa(query, key, value)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else _half_tolerance(expected, dtype)
    assert (out.float() - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16, torch.bfloat16),
     (torch.bfloat16, torch.float16, torch.float16), (torch.float16, torch.float16, torch.bfloat16)],
    ids=["bf16-bf16-fp32", "fp16-bf16-bf16", "bf16-fp16-fp16", "fp16-fp16-bf16"],
)
def test_mixed_dtypes_never_go_to_laser_attention(patched_dispatch: ModuleType, kernels: types.ModuleType,
                                                  dtypes: tuple[torch.dtype, ...]) -> None:
    """MindIE-SD reads the dtype off the query alone (la_preprocess_input casts key and value to float16 only when
    the query is not float16): mixed half inputs would reach the laser kernel uncast. They go to
    npu_fusion_attention, whose stand-in refuses mixed dtypes as the kernel does (the caller's error, not laser's)."""
    torch_npu = kernels
    query, key, value = (t.to(dtype) for t, dtype in zip(_qkv(4096, 4096, head_dim=64), dtypes))
    with pytest.raises(TypeError, match="share one dtype"):
        patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
def test_laser_attention_passes_the_scale(patched_dispatch: ModuleType, kernels: types.ModuleType, dtype: torch.dtype) -> None:
    torch_npu = kernels
    query, key, value = _qkv(4000, 4000, dtype=dtype)
    out = patched_dispatch._native_npu_attention(query, key, value, scale=0.05)
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (query, key, value)), scale=0.05
    ).transpose(1, 2)
    assert routes(torch_npu) == {"ascend_laser_attention": 1}
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
def test_all_valid_mask_still_gets_laser_attention(
    patched_dispatch: ModuleType, kernels: types.ModuleType, dtype: torch.dtype
) -> None:
    torch_npu = kernels
    query, key, value = _qkv(4000, 4000, dtype=dtype)
    out = patched_dispatch._native_npu_attention(query, key, value, attn_mask=_padding_mask(1, 4000, [4000]))
    assert routes(torch_npu) == {"ascend_laser_attention": 1}
    expected = _sdpa(query, key, value)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, dtype)


def test_padding_mask_uses_fusion_attention_with_broadcast_mask(patched_dispatch: ModuleType, kernels: types.ModuleType) -> None:
    """bf16, so the padding is the only reason not to take laser attention."""
    torch_npu = kernels
    query, key, value = _qkv(4000, 4000, dtype=torch.bfloat16)
    mask = _padding_mask(1, 4000, [3900])
    out = patched_dispatch._native_npu_attention(query, key, value, attn_mask=mask)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}
    expected = _sdpa(query, key, value, mask)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.bfloat16)


@pytest.mark.parametrize(
    ("seq_q", "seq_kv", "head_dim"),
    [(3999, 3999, 8), (4000, 4000, 129), (64, 64, 8), (40, 77, 8)],
    ids=["too-short", "head-dim-129", "short", "cross"],
)
def test_unsupported_shapes_use_fusion_attention(
    patched_dispatch: ModuleType, kernels: types.ModuleType, seq_q: int, seq_kv: int, head_dim: int
) -> None:
    """bf16, so the shape is the only reason not to take laser attention."""
    torch_npu = kernels
    query, key, value = _qkv(seq_q, seq_kv, head_dim=head_dim, dtype=torch.bfloat16)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}
    expected = _sdpa(query, key, value)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.bfloat16)


def test_masked_batch_matches_sdpa(patched_dispatch: ModuleType, kernels: types.ModuleType) -> None:
    """A CFG-like batch of two prompts of different text lengths ([B, 1, 1, Skv] mask, as ERNIE-Image passes)."""
    torch_npu = kernels
    query, key, value = _qkv(24, 24, batch=2)
    mask = _padding_mask(2, 24, [24, 17])
    out = patched_dispatch._native_npu_attention(query, key, value, attn_mask=mask)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}
    assert (out - _sdpa(query, key, value, mask)).abs().max().item() <= FP32_TOLERANCE


def test_supported_cross_attention_routes_to_laser(patched_dispatch: ModuleType, kernels: types.ModuleType) -> None:
    """Cross-attention in [118404, 119056]: routed on meta tensors (shapes only, nothing computed)."""
    torch_npu = kernels
    query = torch.empty(1, 118404, 2, 128, device="meta", dtype=torch.bfloat16)
    key = value = torch.empty(1, 119056, 2, 128, device="meta", dtype=torch.bfloat16)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"ascend_laser_attention": 1}
    assert out.shape == query.shape


def test_dropout_never_goes_to_laser_attention(patched_dispatch: ModuleType, kernels: types.ModuleType) -> None:
    torch_npu = kernels
    query, key, value = _qkv(4000, 4000, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError):  # the reference fusion attention has no dropout
        patched_dispatch._native_npu_attention(query, key, value, dropout_p=0.1)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}


def test_mindiesd_absent_falls_back(patched_dispatch: ModuleType, kernels: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    torch_npu = kernels
    monkeypatch.setitem(sys.modules, "mindiesd", None)  # `import mindiesd` now raises ModuleNotFoundError
    query, key, value = _qkv(4000, 4000, dtype=torch.bfloat16)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}
    expected = _sdpa(query, key, value)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.bfloat16)


class _BrokenMindiesdFinder(importlib.abc.MetaPathFinder):
    """Makes `import mindiesd` fail the way a broken install does (a missing shared library)."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "mindiesd":
            raise OSError("libascend_laser.so: cannot open shared object file")
        return None


def test_mindiesd_broken_falls_back_with_one_warning(
    patched_dispatch: ModuleType, kernels: types.ModuleType, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch_npu = kernels
    monkeypatch.delitem(sys.modules, "mindiesd")
    monkeypatch.setattr(sys, "meta_path", [_BrokenMindiesdFinder(), *sys.meta_path])
    query, key, value = _qkv(4000, 4000, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        patched_dispatch._native_npu_attention(query, key, value)
        patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"npu_fusion_attention": 2}
    assert len([r for r in caplog.records if "mindiesd failed to import" in r.getMessage()]) == 1


@pytest.mark.parametrize(("seq_len", "dtype"), [(64, torch.bfloat16), (4000, torch.float32)],
                         ids=["unsupported-shape", "float32"])
def test_mindiesd_is_not_imported_when_laser_cannot_serve(
    patched_dispatch: ModuleType, kernels: types.ModuleType, monkeypatch: pytest.MonkeyPatch, seq_len: int, dtype: torch.dtype
) -> None:
    """Shape and dtype are checked before mindiesd is imported: an fp32 model, or a shape the laser
    kernel does not take, never loads MindIE-SD."""
    monkeypatch.delitem(sys.modules, "mindiesd")
    monkeypatch.setattr(sys, "meta_path", [_BrokenMindiesdFinder(), *sys.meta_path])
    query, key, value = _qkv(seq_len, seq_len, dtype=dtype)
    patched_dispatch._native_npu_attention(query, key, value)
    assert patched_dispatch._mindiesd_attention_forward.cache_info().currsize == 0


# ---------------------------------------------------------------------------------------------------------
# bf16 against fp32

# bf16 route vs fp32 attention on the unrounded fp32 inputs. Rounding q, k, v to bf16 (u/2 each, u = 2^-8)
# moves every score and value by a fraction of u, the output is a softmax-weighted average of the values (the
# rounding errors of v average out rather than add up), then rounded once more (u/2; the laser route goes
# through fp16 first, exact for these inputs). Measured: at most ~1.5u of max |expected| over the cases below.
# The bar, 4u (1.56e-2), leaves more than 2x margin.
BF16_ATTENTION_RELATIVE_BAR = 4 * UNIT_ROUNDOFF[torch.bfloat16]
BF16_ATTENTION_CASES = {
    "laser-4096-unmasked": dict(seq_q=4096, seq_kv=4096, head_dim=64, valid=None, kernel="ascend_laser_attention"),
    "laser-4133-unmasked": dict(seq_q=4133, seq_kv=4133, head_dim=64, valid=None, kernel="ascend_laser_attention"),
    "fusion-4000-padded": dict(seq_q=4000, seq_kv=4000, head_dim=64, valid=[3900], kernel="npu_fusion_attention"),
    "fusion-cfg-batch-masked": dict(seq_q=24, seq_kv=24, head_dim=8, valid=[24, 17], kernel="npu_fusion_attention"),
    "fusion-cross-40x77": dict(seq_q=40, seq_kv=77, head_dim=8, valid=None, kernel="npu_fusion_attention"),
}


@pytest.mark.parametrize("case", list(BF16_ATTENTION_CASES))
def test_bf16_attention_against_fp32(
    patched_dispatch: ModuleType, kernels: types.ModuleType, case: str, diffusers_version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch_npu = kernels
    spec = BF16_ATTENTION_CASES[case]
    batch = len(spec["valid"]) if spec["valid"] else 1
    query, key, value = _qkv(spec["seq_q"], spec["seq_kv"], head_dim=spec["head_dim"], batch=batch)
    mask = _padding_mask(batch, spec["seq_kv"], spec["valid"]) if spec["valid"] else None
    out = patched_dispatch._native_npu_attention(*(t.to(torch.bfloat16) for t in (query, key, value)), attn_mask=mask)
    assert routes(torch_npu) == {spec["kernel"]: 1}
    expected = _sdpa(query, key, value, mask)
    max_abs = (out.float() - expected).abs().max().item()
    relative = max_abs / expected.abs().max().item()
    with capsys.disabled():
        print(f"\n[bf16 vs fp32] diffusers {diffusers_version} attention {case}: max abs {max_abs:.3e}, "
              f"relative {relative:.3e} ({relative / UNIT_ROUNDOFF[torch.bfloat16]:.1f} u), "
              f"bar {BF16_ATTENTION_RELATIVE_BAR:.3e}")
    assert relative <= BF16_ATTENTION_RELATIVE_BAR


# ---------------------------------------------------------------------------------------------------------
# Under each vendor behaviour: the chip MindIE-SD dispatches for, and MINDIE_SD_FA_TYPE

LASER_TOKENS = 4133
"""Above 4096 and not a multiple of 256: MindIE-SD pads to 4352 and excludes the 219 zero keys (pre_tokens)."""
CHIP_ROUTES = {
    "A2": {"ascend_laser_attention": 1},
    "A3": {"ascend_laser_attention": 1},
    "A5": {"fused_attn_score": 1, "npu_fusion_attention": 1},  # MindIE-SD reroutes laser to fused_attn_score
    "Duo": {"npu_fusion_attention": 1},  # no laser operator: the patch falls back, with one warning
}


@pytest.mark.parametrize("chip", list(CHIP_ROUTES))
def test_unmasked_laser_sized_call_on_each_chip(patched_dispatch: ModuleType, kernels: types.ModuleType,
                                                 caplog: pytest.LogCaptureFixture, chip: str) -> None:
    """Unmasked bf16 self-attention of 4133 tokens: laser on A2 / A3, MindIE-SD's own reroute to fused_attn_score
    on A5, and on a chip whose MindIE-SD has no laser operator (Duo) npu_fusion_attention: never an exception."""
    torch_npu = kernels
    mindiesd_ops.set_chip(chip)
    query, key, value = _qkv(LASER_TOKENS, LASER_TOKENS, head_dim=64, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == CHIP_ROUTES[chip]
    expected = _sdpa(query, key, value)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.bfloat16)
    fallbacks = [r for r in caplog.records if "has no laser attention" in r.getMessage()]
    assert len(fallbacks) == (1 if chip == "Duo" else 0)


def test_chip_without_laser_falls_back_once_with_one_warning(
    patched_dispatch: ModuleType, kernels: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """Three generations' worth of calls on a Duo: MindIE-SD is asked for laser once, refuses (ParametersInvalid),
    one warning; every call is computed by npu_fusion_attention and never asks MindIE-SD again."""
    torch_npu = kernels
    mindiesd_ops.set_chip("Duo")
    query, key, value = _qkv(4096, 4096, head_dim=64, dtype=torch.bfloat16)
    dispatch_calls = [0]
    original = patched_dispatch._mindiesd_attention_forward().attention_forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        dispatch_calls[0] += 1
        return original(*args, **kwargs)

    patched_dispatch._mindiesd_attention_forward().attention_forward = counted
    with caplog.at_level(logging.WARNING):
        outs = [patched_dispatch._native_npu_attention(query, key, value) for _ in range(3)]
    assert dispatch_calls[0] == 1
    assert routes(torch_npu) == {"npu_fusion_attention": 3}
    assert len([r for r in caplog.records if "has no laser attention" in r.getMessage()]) == 1
    assert all(torch.equal(out, outs[0]) for out in outs)


FA_TYPE_ROUTES = {
    "ascend_laser_attention": {"ascend_laser_attention": 1},
    "fused_attn_score": {"fused_attn_score": 1, "npu_fusion_attention": 1},
    "prompt_flash_attn": {"prompt_flash_attn": 1, "npu_prompt_flash_attention": 1},
}


@pytest.mark.parametrize("fa_type", mindiesd_ops.FA_TYPES)
def test_mindie_sd_fa_type_overrides_the_laser_call(patched_dispatch: ModuleType, kernels: types.ModuleType,
                                                     monkeypatch: pytest.MonkeyPatch, fa_type: str) -> None:
    """MINDIE_SD_FA_TYPE overrides the op_type of the patch's (unmasked) manual call, in MindIE-SD's own
    attention_forward: each operator computes the same attention."""
    torch_npu = kernels
    monkeypatch.setenv("MINDIE_SD_FA_TYPE", fa_type)
    query, key, value = _qkv(LASER_TOKENS, LASER_TOKENS, head_dim=64, dtype=torch.float16)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == FA_TYPE_ROUTES[fa_type]
    expected = _sdpa(query, key, value)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.float16)


@pytest.mark.parametrize("chip", list(CHIP_ROUTES))
@pytest.mark.parametrize("fa_type", [None, *mindiesd_ops.FA_TYPES])
def test_masked_calls_never_reach_laser_attention(patched_dispatch: ModuleType, kernels: types.ModuleType,
                                                  monkeypatch: pytest.MonkeyPatch, chip: str, fa_type: str | None) -> None:
    """MindIE-SD's laser operator drops a mask silently (AscendLaserAttention never hands it to the kernel), and
    MINDIE_SD_FA_TYPE=ascend_laser_attention would send any manual call there: a padded call of the patch must
    reach npu_fusion_attention directly, with its mask, whatever the chip and the switch."""
    torch_npu = kernels
    mindiesd_ops.set_chip(chip)
    if fa_type is not None:
        monkeypatch.setenv("MINDIE_SD_FA_TYPE", fa_type)
    query, key, value = _qkv(LASER_TOKENS, LASER_TOKENS, head_dim=64, batch=2, dtype=torch.bfloat16)
    mask = _padding_mask(2, LASER_TOKENS, [LASER_TOKENS, 4000])
    out = patched_dispatch._native_npu_attention(query, key, value, attn_mask=mask)
    assert routes(torch_npu) == {"npu_fusion_attention": 1}
    expected = _sdpa(query, key, value, mask)
    assert (out.float() - expected).abs().max().item() <= _half_tolerance(expected, torch.bfloat16)


def test_laser_padding_to_256_is_excluded(patched_dispatch: ModuleType, kernels: types.ModuleType) -> None:
    """4133 tokens: MindIE-SD appends 219 zero keys and excludes them with pre_tokens=219; a zero key counted
    would draw weight exp(0) from every query and move the output well past the bar."""
    torch_npu = kernels
    query, key, value = _qkv(LASER_TOKENS, LASER_TOKENS, head_dim=64, dtype=torch.float16)
    out = patched_dispatch._native_npu_attention(query, key, value)
    assert routes(torch_npu) == {"ascend_laser_attention": 1} and mindiesd_ops.calls["la"] == 1
    padded = torch.cat((key, torch.zeros(1, 219, 2, 64, dtype=key.dtype)), dim=1)
    with_zero_keys = _sdpa(query, padded, torch.cat((value, torch.zeros_like(padded[:, LASER_TOKENS:])), dim=1))
    expected = _sdpa(query, key, value)
    tolerance = _half_tolerance(expected, torch.float16)
    assert (out.float() - expected).abs().max().item() <= tolerance
    assert (with_zero_keys - expected).abs().max().item() > 4 * tolerance, "the yardstick sees the padding"

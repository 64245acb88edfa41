"""The selftest checks: the patched diffusers code on the device against CPU references of the same math.

Each check returns a CheckResult: its measured error, its tolerance (the reason for the figure is
next to it) and a status: passed, failed, or skipped with the reason it could not run. A check that
raises is failed with the exception as its detail, never skipped.

Errors are measured as max |device - reference| over the output, divided by max |reference| where the
tolerance is relative (said in `unit`). References are computed on the CPU in float64 from the very
inputs the device saw (already rounded to the check's dtype), so what is measured is the kernel and
the patched code around it, not the rounding of the inputs.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import tiny_ernie
from .device import Device, counting

TRANSFORMER = "diffusers.models.transformers.transformer_ernie_image"
DISPATCH = "diffusers.models.attention_dispatch"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Unit roundoff (2^-p, p = significant bits) of each dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SEED = 20240601


@dataclass
class CheckResult:
    """One check: status passed / failed / skipped, measured error and tolerance in `unit`."""

    name: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    unit: str = ""
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON data; a non-finite error (nan, inf) becomes null, named in the detail."""
        data = asdict(self)
        if self.error is not None and not math.isfinite(self.error):
            data["error"], data["detail"] = None, f"measured error is {self.error}; {self.detail}"
        return data


class Skip(Exception):
    """The check cannot run here; the message says why."""


def measured(name: str, error: float, tolerance: float, unit: str, detail: str) -> CheckResult:
    status = "passed" if math.isfinite(error) and error <= tolerance else "failed"
    return CheckResult(name, status, error, tolerance, unit, detail)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Skip(f"{name.split('.')[0]} is not installed here ({exc})") from None


def _require(module: Any, attribute: str, patch_id: str) -> Any:
    if not hasattr(module, attribute):
        raise AssertionError(f"{module.__name__}.{attribute} is missing: {patch_id} is not applied "
                             f"(run `ernie-patch apply` first) in {module.__file__}")
    return getattr(module, attribute)


def unapplied() -> str | None:
    """Why no check can mean anything: this interpreter's diffusers has no ERNIE-Image patch (apply
    not run); None when it has them, or has no diffusers (its checks are then skipped)."""
    try:
        transformer = importlib.import_module(TRANSFORMER)
    except ImportError:
        return None
    if hasattr(transformer, "apply_rotary_emb_npu"):
        return None
    return f"the ERNIE-Image patches are not applied to the diffusers of {sys.executable}"


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# RoPE ----------------------------------------------------------------------------------------------

def _rope_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The processor's own rotate-half RoPE (= npu_rotary_mul "half": x*cos + cat(-x2, x1)*sin), float64.

    cos and sin of the float32 angles are rounded to x's dtype first, as the patched and the original code both do.
    """
    rot = angles.shape[-1]
    x64, x_pass = x[..., :rot].double(), x[..., rot:].double()
    cos, sin = (f(angles.double()).to(x.dtype).double() for f in (torch.cos, torch.sin))
    x1, x2 = x64.chunk(2, dim=-1)
    return torch.cat((x64 * cos + torch.cat((-x2, x1), dim=-1) * sin, x_pass), dim=-1)


# ERNIE-Image's real RoPE: head_dim 128 split into axes (32, 48, 48), theta 256; an image token of an image with T
# text tokens sits at (T, row, column) of the side/16 x side/16 latent grid, text token t at (t, 0, 0). Angles reach
# max(T, side/16 - 1) radians, where a bfloat16 angle (8 significant bits) is off by up to 1 rad.
ROPE_CASES = {"1024x1024+256": (1024, 256, 128), "2048x2048+512": (2048, 512, 128), "1024x1024+256,half": (1024, 256, 64)}
ROPE_THETA, ROPE_AXES, HEAD_DIM = 256, (32, 48, 48), 128


def real_rope_angles(transformer: Any, side: int, text_len: int) -> torch.Tensor:
    """freqs_cis [1, S, 1, 128] of one image of SIDE x SIDE pixels and TEXT_LEN text tokens, computed by the
    release's own ErnieImageEmbedND3 from the position ids its transformer builds."""
    grid = side // 16
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                   indexing="ij")
    image_ids = torch.stack((torch.full((grid * grid,), float(text_len)), rows.reshape(-1), columns.reshape(-1)), -1)
    text_ids = torch.stack((torch.arange(text_len, dtype=torch.float32), *torch.zeros(2, text_len)), -1)
    embed = transformer.ErnieImageEmbedND3(dim=HEAD_DIM, theta=ROPE_THETA, axes_dim=ROPE_AXES)
    return embed(torch.cat((image_ids, text_ids)).unsqueeze(0))


def check_rope(device: Device, dtype: torch.dtype) -> CheckResult:
    """apply_rotary_emb_npu (diffusers-rope) on the device at ERNIE-Image's real positions (1024² and 2048² images,
    256 and 512 text tokens), RoPE on all and on half of the head channels."""
    transformer = _import(TRANSFORMER)
    rope_npu = _require(transformer, "apply_rotary_emb_npu", "diffusers-rope")
    torch_npu = sys.modules.get("torch_npu") or importlib.import_module("torch_npu")
    calls, worst, tolerance, largest_angle = [0], 0.0, 0.0, 0.0
    for seed, (side, text_len, rot) in enumerate(ROPE_CASES.values()):
        angles = real_rope_angles(transformer, side, text_len)[..., :rot]
        x = _randn(1, angles.shape[1], 1, HEAD_DIM, seed=seed).to(dtype)
        with device.active(), counting(torch_npu, "npu_rotary_mul", calls):
            out = device.get(rope_npu(device.put(x), device.put(angles)))
        worst = max(worst, _max_abs(out, _rope_reference(x, angles)))
        largest_angle = max(largest_angle, angles.abs().max().item())
        # Each output element is x1*cos + x2*sin: two products and a sum, each rounded once to the dtype
        # (3u), plus the dtype roundings of cos and sin (2u) and the device's own cos/sin error (a few ulp
        # of float32 of angles up to ~512 rad, below u of any dtype): 8u of max |x| bounds it with margin.
        tolerance = max(tolerance, 8 * UNIT_ROUNDOFF[dtype] * x.abs().max().item())
    if calls[0] == 0:
        raise AssertionError("apply_rotary_emb_npu never called torch_npu.npu_rotary_mul")
    return measured("rope", worst, tolerance, "abs",
                     f"apply_rotary_emb_npu -> npu_rotary_mul(rotary_mode='half'), {calls[0]} call(s), ERNIE-Image "
                     f"positions {', '.join(ROPE_CASES)} (angles up to {largest_angle:.0f} rad), vs x*cos + "
                     f"rotate_half(x)*sin in float64")


# Attention -----------------------------------------------------------------------------------------

def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """softmax(scale * q k^T, masked where KEEP is False) v in float64; [B, S, N, D] in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def _padding_keep(batch: int, seq: int, lengths: tuple[int, ...]) -> torch.Tensor:
    """[B, Skv] boolean: True for the first LENGTHS[b] keys of row b (diffusers' convention: True attends)."""
    return torch.arange(seq).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


# The masks diffusers' ERNIE-Image hands the "_native_npu" backend, and what the patch turns them into:
# no mask; an all-valid mask (dropped: None); a padding mask [B, Skv] and [B, 1, 1, Skv] (both broadcast
# to [B, 1, Sq, Skv] and inverted for npu_fusion_attention).
MASKS: dict[str, Callable[[int, int], torch.Tensor | None]] = {
    "none": lambda b, s: None,
    "all-valid[B,Skv]": lambda b, s: torch.ones(b, s, dtype=torch.bool),
    "padding[B,Skv]": lambda b, s: _padding_keep(b, s, (s, s - 9)),
    "padding[B,1,1,Skv]": lambda b, s: _padding_keep(b, s, (s - 5, s - 17))[:, None, None, :],
}


def _native_npu(dispatch: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
    return dispatch._native_npu_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=None)


def _attention_tolerance(dtype: torch.dtype, v: torch.Tensor, keys: int) -> float:
    """Bound for fused attention against float64 on the same inputs.

    The output is a convex combination of value rows, so errors scale with max |v|: one rounding of the
    output to the dtype (u), the probabilities rounded to the dtype before P @ V as Ascend's flash kernels
    do for half types (u), the float32 softmax and accumulation over KEYS terms (keys * 2^-24); 4u leaves
    a factor of two of margin for the exp approximation of the device.
    """
    return (4 * UNIT_ROUNDOFF[dtype] + keys * 2.0**-24) * v.abs().max().item()


def check_fusion_attention(device: Device, dtype: torch.dtype, mask_name: str) -> CheckResult:
    """_native_npu_attention (diffusers-attention) with one mask shape, through npu_fusion_attention."""
    dispatch = _import(DISPATCH)
    _require(dispatch, "_broadcast_attn_mask_npu", "diffusers-attention")
    batch, seq, heads, dim = 2, 64, 2, 32
    q, k, v = (_randn(batch, seq, heads, dim, seed=30 + i).to(dtype) for i in range(3))
    keep = MASKS[mask_name](batch, seq)
    calls = [0]
    with device.active(), counting(dispatch, "npu_fusion_attention", calls):
        on_device = [device.put(t) for t in (q, k, v)]
        out = device.get(_native_npu(dispatch, *on_device, None if keep is None else device.put(keep)))
    if calls[0] != 1:
        raise AssertionError(f"npu_fusion_attention called {calls[0]} time(s), expected once")
    keep4 = None if keep is None else (keep if keep.ndim == 4 else keep[:, None, None, :])
    expected = _attention_reference(q, k, v, keep4, dim**-0.5)
    return measured(f"fusion_attention[{mask_name}]", _max_abs(out, expected), _attention_tolerance(dtype, v, seq),
                     "abs", f"_native_npu_attention -> npu_fusion_attention, mask {mask_name}, {tuple(q.shape)} BSND")


LASER_TOKENS = 4133
"""Above 4096 and not a multiple of 256: MindIE-SD pads the sequence to 4352 and excludes the padding (pre_tokens)."""


def check_laser_attention(device: Device, dtype: torch.dtype) -> CheckResult:
    """The laser route of the patched dispatch: unmasked self-attention of LASER_TOKENS tokens in float16/bfloat16,
    through this interpreter's own MindIE-SD."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise Skip("the laser route takes float16/bfloat16 only (--dtype bf16 runs it)")
    dispatch = _import(DISPATCH)
    _require(dispatch, "_mindiesd_attention_forward", "diffusers-attention")
    if importlib.util.find_spec("mindiesd") is None:
        raise Skip("mindiesd (MindIE-SD) is not installed here")
    dispatch._mindiesd_attention_forward.cache_clear()
    if dispatch._mindiesd_attention_forward() is None:
        raise Skip("mindiesd (MindIE-SD) does not import here")
    mindiesd = sys.modules["mindiesd"]
    batch, seq, heads, dim = 1, LASER_TOKENS, 2, 64
    q, k, v = (_randn(batch, seq, heads, dim, seed=40 + i).to(dtype) for i in range(3))
    calls = [0]
    try:
        with counting(mindiesd, "attention_forward", calls):
            dispatch._mindiesd_attention_forward.cache_clear()
            with device.active():
                out = device.get(_native_npu(dispatch, *(device.put(t) for t in (q, k, v)), None))
            refused = dispatch._mindiesd_attention_forward().refused
    finally:
        dispatch._mindiesd_attention_forward.cache_clear()
    if calls[0] != 1 or refused:
        raise AssertionError(f"mindiesd.attention_forward called {calls[0]} time(s), refused: {refused}; expected "
                             "one laser call")
    expected = _attention_reference(q, k, v, None, dim**-0.5)
    # MindIE-SD computes on float16 copies and casts the output to float16 and back (la_preprocess_input,
    # la_postprocess_output): the fused-attention bound in float16 plus one rounding to the input dtype.
    tolerance = _attention_tolerance(torch.float16, v, seq) + UNIT_ROUNDOFF[dtype] * v.abs().max().item()
    return measured("laser_attention", _max_abs(out, expected), tolerance, "abs",
                     f"_native_npu_attention -> mindiesd.attention_forward(op_type='ascend_laser_attention'), "
                     f"{tuple(q.shape)} BSND")


# Tiny ERNIE-Image transformer ----------------------------------------------------------------------

# Relative bar (max abs error / max |reference output|) for one forward of the tiny model on the device
# against float32 on the CPU. In bfloat16 every activation is rounded to 8 significant bits a dozen times
# per layer; measured on the fake device, ~5u of the output's largest magnitude: 16u (6.25e-2) gives a 3x
# margin. In float32 the bar is 4 * 2^-11 (1.95e-3): Ascend may run float32 convolutions and matmuls in
# HF32 (11 significant bits; torch.npu.conv.allow_hf32 is on by default), a few such roundings; on the
# CPU the measured error is ~1.5e-7. The tiny model's attention adds little to its output, so a wrong
# RoPE moves it by only ~1-2% (cos and sin swapped: 1.1e-2 to 2.0e-2 in float32, caught; in bfloat16
# 2.6e-2, under the bf16 bar): the kernel checks above are the sharp ones, this one is end to end.
MODEL_RELATIVE_BAR = {torch.float32: 4 * 2.0**-11, torch.bfloat16: 16 * 2.0**-8, torch.float16: 16 * 2.0**-11}


def check_model(device: Device, dtype: torch.dtype, case_name: str) -> CheckResult:
    """The tiny ERNIE-Image transformer through the patched code ("_native_npu" backend) vs float32 CPU."""
    transformer = _import(TRANSFORMER)
    _require(transformer, "apply_rotary_emb_npu", "diffusers-rope")
    case = tiny_ernie.CASES[case_name]
    model = tiny_ernie.build_model(transformer, case)
    inputs = tiny_ernie.make_inputs(case)
    model.set_attention_backend("native")  # the backend is also a process-wide setting: name it each time
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    torch_npu = sys.modules.get("torch_npu") or importlib.import_module("torch_npu")
    rope_calls = [0]
    with torch.no_grad(), device.active(), counting(torch_npu, "npu_rotary_mul", rope_calls):
        model = device.move(model.to(dtype))
        model.set_attention_backend("_native_npu")
        try:
            on_device = {name: device.put(value.to(dtype) if value.is_floating_point() else value)
                         for name, value in inputs.items()}
            out = device.get(model(**on_device, return_dict=False)[0])
        finally:
            model.set_attention_backend("native")
            model.reset_attention_backend()
    if rope_calls[0] == 0:
        raise AssertionError("the forward never called torch_npu.npu_rotary_mul: the RoPE patch's NPU branch did not run")
    relative = _max_abs(out, expected) / expected.abs().max().item()
    return measured(f"model[{case_name}]", relative, MODEL_RELATIVE_BAR[dtype], "rel",
                     f"tiny ERNIE-Image ({case.notes}), {rope_calls[0]} npu_rotary_mul call(s), vs float32 CPU")


# Running -------------------------------------------------------------------------------------------

def planned_checks(device: Device, dtype: torch.dtype) -> list[tuple[str, Callable[[], CheckResult]]]:
    """(name, thunk) of every check of the diffusers patches, in order."""
    checks: list[tuple[str, Callable[[], CheckResult]]] = [("rope", lambda: check_rope(device, dtype))]
    for mask in MASKS:
        checks.append((f"fusion_attention[{mask}]", lambda m=mask: check_fusion_attention(device, dtype, m)))
    checks.append(("laser_attention", lambda: check_laser_attention(device, dtype)))
    for case in tiny_ernie.CASES:
        checks.append((f"model[{case}]", lambda c=case: check_model(device, dtype, c)))
    return checks


def run_one(name: str, thunk: Callable[[], CheckResult]) -> CheckResult:
    """THUNK's result, timed; a Skip is skipped with its reason, any other exception is failed."""
    started = time.monotonic()
    try:
        result = thunk()
    except Skip as skip:
        result = CheckResult(name, "skipped", detail=str(skip))
    except Exception as exc:  # a check that breaks is a failed check, with what broke it
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = CheckResult(name, "failed", detail=f"{type(exc).__name__}: {exc} "
                                                     f"(at {where.filename}:{where.lineno})")
    result.seconds = round(time.monotonic() - started, 3)
    return result

"""The tiny ERNIE-Image transformer through the real diffusers 0.38.0, pristine vs patched.

CPU: the patched model is bit-identical to the pristine one, also when torch_npu is importable (a CPU
reference at sys.modules["torch_npu"] that refuses non-NPU tensors and counts its calls): the NPU
branches are chosen by the tensors' device, never by what is installed.

NPU: the NPU branches run on a fake "npu" device (ernie_patcher/selftest/runtime/fake_npu.py: PrivateUse1 renamed
"npu" as torch_npu does, CPU data behind it) against CPU references of npu_rotary_mul,
npu_fusion_attention and mindiesd.attention_forward (ernie_patcher/selftest/runtime/). Their output matches
the pristine CPU output in fp32, and the patched NPU path is bit-identical to the pristine code run on
the same fake device. In fp32 every attention call goes to npu_fusion_attention: MindIE-SD's laser
attention takes float16 / bfloat16 only and refuses float32.

bf16: the patched NPU path in bfloat16 (the precision ERNIE-Image runs in on Ascend; unmasked calls take
laser attention, which computes in float16) against the fp32 CPU output of the pristine release.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from ernie_patcher.selftest.runtime import tiny_ernie

CASES = list(tiny_ernie.CASES)
FP32_TOLERANCE = 1e-6
# bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 (a single rounding is within u/2 of the value).
# One forward of the tiny model rounds every activation to bf16 a dozen times or more per layer (input
# cast, adaLN modulation, norms, QKV, RoPE, attention, output projection, residuals, FFN, final layer);
# measured, the output's worst element is off by ~5u of the output's largest magnitude on every case.
# The bar allows 16u (6.25e-2 of max |output|): 3x margin over the measured figures, on both releases.
BF16_UNIT_ROUNDOFF = 2.0**-8
BF16_RELATIVE_BAR = 16 * BF16_UNIT_ROUNDOFF
# Image-level figure: the source notes measured 41.16 dB for bf16 vs fp32 on ERNIE-Image-Turbo.
PSNR_BAR_DB = 40.0


def _case(runs: dict[tuple[str, str], dict[str, Any]], tree: str, scenario: str, name: str) -> dict[str, Any]:
    return runs[(tree, scenario)]["cases"][name]


def _output(run: dict[str, Any]) -> torch.Tensor:
    """The output of one forward; a forward that raised fails the test with its error."""
    assert "error" not in run, run["error"]
    return run["out"]


def _pristine_cpu(runs: dict[tuple[str, str], dict[str, Any]], name: str) -> torch.Tensor:
    return _output(_case(runs, "pristine", "cpu", name)["plain"])


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _is_masked(name: str) -> bool:
    lens = tiny_ernie.CASES[name].text_lens
    return min(lens) < max(lens)


@pytest.mark.parametrize("name", CASES)
def test_all_runs_use_the_same_weights(model_runs: dict, name: str) -> None:
    digests = {key: _case(model_runs, *key, name)["digest"] for key in model_runs}
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("name", CASES)
def test_output_is_not_trivial(model_runs: dict, name: str) -> None:
    out = _pristine_cpu(model_runs, name)
    assert out.dtype == torch.float32
    assert out.abs().max().item() > 0.1


@pytest.mark.parametrize("name", CASES)
def test_cpu_output_bit_identical_after_patch(model_runs: dict, name: str) -> None:
    pristine = _pristine_cpu(model_runs, name)
    patched = _output(_case(model_runs, "patched", "cpu", name)["plain"])
    assert torch.equal(pristine, patched), _max_abs_diff(pristine, patched)


@pytest.mark.parametrize("name", CASES)
def test_cpu_tensors_never_reach_npu_kernels_when_torch_npu_importable(model_runs: dict, name: str) -> None:
    run = _case(model_runs, "patched", "cpu", name)["torch_npu_importable"]
    out = _output(run)
    assert run["calls"] == {}
    assert torch.equal(out, _pristine_cpu(model_runs, name))


@pytest.mark.parametrize("name", CASES)
def test_npu_rope_branch_matches_cpu(model_runs: dict, name: str) -> None:
    run = _case(model_runs, "patched", "npu", name)["native"]
    out = _output(run)
    layers = tiny_ernie.CASES[name].model["num_layers"]
    assert run["device"] == "npu:0"
    assert run["calls"] == {"npu_rotary_mul": 2 * layers}, "query and key of every layer go through the NPU kernel"
    assert _max_abs_diff(out, _pristine_cpu(model_runs, name)) <= FP32_TOLERANCE


@pytest.mark.parametrize("name", CASES)
def test_npu_rope_kernel_bit_identical_to_original_rope_on_same_device(model_runs: dict, name: str) -> None:
    pristine = _case(model_runs, "pristine", "npu", name)["native"]
    patched = _case(model_runs, "patched", "npu", name)["native"]
    assert pristine["calls"] == {}, "pristine diffusers has no NPU RoPE"
    assert torch.equal(_output(pristine), _output(patched)), _max_abs_diff(pristine["out"], patched["out"])


@pytest.mark.parametrize("name", CASES)
def test_native_npu_backend_matches_cpu(model_runs: dict, name: str) -> None:
    """fp32: laser attention refuses float32, so every call, the unmasked 4036-token one included, is fusion attention."""
    run = _case(model_runs, "patched", "npu", name)["_native_npu"]
    out = _output(run)
    layers = tiny_ernie.CASES[name].model["num_layers"]
    assert run["calls"] == {"npu_rotary_mul": 2 * layers, "npu_fusion_attention": layers}
    assert _max_abs_diff(out, _pristine_cpu(model_runs, name)) <= FP32_TOLERANCE


@pytest.mark.parametrize("name", CASES)
def test_native_npu_backend_bit_identical_to_pristine_on_same_device(model_runs: dict, name: str) -> None:
    pristine = _case(model_runs, "pristine", "npu", name)["_native_npu"]
    patched = _case(model_runs, "patched", "npu", name)["_native_npu"]
    assert pristine["calls"] == {"npu_fusion_attention": tiny_ernie.CASES[name].model["num_layers"]}
    assert torch.equal(_output(pristine), _output(patched)), _max_abs_diff(pristine["out"], patched["out"])


def _psnr_db(out: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR over the reference's dynamic range: 20 log10((max - min) / RMSE); the output is not an 8-bit image."""
    dynamic_range = (reference.max() - reference.min()).item()
    rmse = (out.float() - reference).pow(2).mean().sqrt().item()
    return math.inf if rmse == 0.0 else 20.0 * math.log10(dynamic_range / rmse)


def _bf16_native_npu(runs: dict[tuple[str, str], dict[str, Any]], name: str) -> tuple[dict[str, Any], torch.Tensor]:
    run = _case(runs, "patched", "npu_bf16", name)["_native_npu"]
    out = _output(run)
    assert out.dtype == torch.bfloat16 and run["device"] == "npu:0"
    return run, out


@pytest.mark.parametrize("name", CASES)
def test_bf16_npu_path_takes_the_half_precision_kernels(model_runs: dict, name: str) -> None:
    """bf16 unmasked 4036 tokens: laser attention; masked CFG batches: fusion attention; RoPE on the NPU kernel."""
    run, _ = _bf16_native_npu(model_runs, name)
    layers = tiny_ernie.CASES[name].model["num_layers"]
    attention_kernel = "npu_fusion_attention" if _is_masked(name) else "ascend_laser_attention"
    assert run["calls"] == {"npu_rotary_mul": 2 * layers, attention_kernel: layers}


@pytest.mark.parametrize("name", CASES)
def test_bf16_npu_path_within_bf16_bar_of_fp32_cpu(
    model_runs: dict, name: str, diffusers_version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = _bf16_native_npu(model_runs, name)
    reference = _pristine_cpu(model_runs, name)
    max_abs = _max_abs_diff(out.float(), reference)
    relative = max_abs / reference.abs().max().item()
    with capsys.disabled():
        print(f"\n[bf16 vs fp32] diffusers {diffusers_version} {name}: max abs {max_abs:.3e}, "
              f"relative {relative:.3e} ({relative / BF16_UNIT_ROUNDOFF:.1f} u), bar {BF16_RELATIVE_BAR:.3e}")
    assert relative <= BF16_RELATIVE_BAR


@pytest.mark.parametrize("name", CASES)
def test_bf16_npu_path_psnr_against_fp32_cpu(
    model_runs: dict, name: str, diffusers_version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = _bf16_native_npu(model_runs, name)
    psnr = _psnr_db(out, _pristine_cpu(model_runs, name))
    with capsys.disabled():
        print(f"\n[bf16 vs fp32] diffusers {diffusers_version} {name}: PSNR {psnr:.2f} dB (bar {PSNR_BAR_DB} dB)")
    assert psnr >= PSNR_BAR_DB

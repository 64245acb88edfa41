"""The tiny ERNIE-Image transformer through the real diffusers 0.38.0, pristine vs patched.

CPU: the patched model is bit-identical to the pristine one, also when torch_npu is importable (a CPU
reference at sys.modules["torch_npu"] that refuses non-NPU tensors and counts its calls): the NPU
branches are chosen by the tensors' device, never by what is installed.

NPU: the NPU branches run on a fake "npu" device (tests/numerics/fake_npu.py: PrivateUse1 renamed
"npu" as torch_npu does, CPU data behind it) against CPU references of npu_rotary_mul,
npu_fusion_attention and mindiesd.attention_forward (tests/numerics/reference/). Their output matches
the pristine CPU output in fp32, and the patched NPU path is bit-identical to the pristine code run on
the same fake device.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.numerics import tiny_ernie

CASES = list(tiny_ernie.CASES)
FP32_TOLERANCE = 1e-6


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
    run = _case(model_runs, "patched", "npu", name)["_native_npu"]
    out = _output(run)
    layers = tiny_ernie.CASES[name].model["num_layers"]
    attention_kernel = "npu_fusion_attention" if _is_masked(name) else "ascend_laser_attention"
    assert run["calls"] == {"npu_rotary_mul": 2 * layers, attention_kernel: layers}
    assert _max_abs_diff(out, _pristine_cpu(model_runs, name)) <= FP32_TOLERANCE


@pytest.mark.parametrize("name", CASES)
def test_native_npu_backend_bit_identical_to_pristine_on_same_device(model_runs: dict, name: str) -> None:
    pristine = _case(model_runs, "pristine", "npu", name)["_native_npu"]
    patched = _case(model_runs, "patched", "npu", name)["_native_npu"]
    assert pristine["calls"] == {"npu_fusion_attention": tiny_ernie.CASES[name].model["num_layers"]}
    assert torch.equal(_output(pristine), _output(patched)), _max_abs_diff(pristine["out"], patched["out"])

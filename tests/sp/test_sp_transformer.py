"""Patches 4 and 5 on CPU: the NPU sequence-parallel path of vllm-omni's ERNIE-Image transformer.

A tiny ErnieImageTransformer2DModel (fixed weights, the same on every rank) runs a CFG batch of
two prompts with different text lengths over a 5x7 latent grid: 41 joint tokens, divisible by
neither 2 nor 4. With the platform reporting NPU, SP=2, SP=4 and SP=2 inside CFG 2 x SP 2 must
give the single-device output (fp32, max abs diff <= 1e-5); a text key counted once per rank
would break that. Unpatched vllm-omni 0.20.0 already matches through its _sp_plan hooks, so the
tests also show that the new path ran: no _sp_plan hook, the Ulysses processor in every layer on
this rank's share of the padded sequence, heads <-> sequence all-to-alls. With the platform
reporting CUDA the output is bit-identical to unpatched vllm-omni.

The NPU path hands the attention kernel no mask: each CFG row attends over its own valid keys
(35 image tokens + its 3 or 6 text tokens), one call per row, and the SP padding is never attended.
"""
from __future__ import annotations

from math import prod
from typing import Any

import pytest

from tests.sp.tiny import JOINT_TOKENS, TEXT_LENS, TINY_CONFIG, expected_attention_calls, padded_tokens

TOLERANCE = 1e-5
LAYERS = TINY_CONFIG["num_layers"]


def max_abs_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def test_the_sp_runs_need_padding() -> None:
    assert JOINT_TOKENS % 2 and JOINT_TOKENS % 4


@pytest.mark.parametrize("run_name", ["patched-sp2", "patched-sp4", "patched-cfg2-sp2"])
def test_npu_sequence_parallel_output_equals_single_device(runs, figures, run_name: str) -> None:
    reference = runs("pristine-sp1")[0]["cuda"]["output"]
    npu_single = runs("patched-sp1")[0]["npu"]["output"]
    figures["patched-sp1"] = max_abs_diff(npu_single, reference)
    assert figures["patched-sp1"] <= TOLERANCE
    diffs = [max_abs_diff(rank["npu"]["output"], reference) for rank in runs(run_name)]
    print(f"{run_name}: max abs diff vs single device, per rank: {diffs}")
    figures[run_name] = max(diffs)
    assert max(diffs) <= TOLERANCE


@pytest.mark.parametrize("run_name", ["patched-sp2", "patched-sp4", "patched-cfg2-sp2"])
def test_npu_path_installs_no_sp_plan_hook(runs, run_name: str) -> None:
    for rank in runs(run_name):
        assert rank["npu"]["sp_hooks"] == []


def test_the_hook_check_sees_upstream_hooks(runs) -> None:
    for rank in runs("patched-sp2"):
        assert rank["cuda"]["sp_hooks"] == [
            "unified_prepare:sp_input---unified_prepare",
            "final_linear:sp_output---final_linear",
        ]


@pytest.mark.parametrize(
    "run_name,sp_size", [("patched-sp1", 1), ("patched-sp2", 2), ("patched-sp4", 4), ("patched-cfg2-sp2", 2)]
)
def test_npu_path_runs_ulysses_processor_in_every_layer(runs, run_name: str, sp_size: int) -> None:
    local_tokens = padded_tokens(sp_size) // sp_size
    for rank in runs(run_name):
        npu = rank["npu"]
        assert npu["processor_calls"] == [(layer, local_tokens) for layer in range(LAYERS)]
        assert npu["attention_skips_sp"] == [True] * LAYERS
        assert npu["all_to_all"] == (4 * LAYERS if sp_size > 1 else 0), "q, k, v and output per layer"


@pytest.mark.parametrize("run_name,pristine_name", [("patched-sp1", "pristine-sp1"), ("patched-sp2", "pristine-sp2")])
def test_non_npu_path_is_unchanged(runs, figures, run_name: str, pristine_name: str) -> None:
    for patched, pristine in zip(runs(run_name), runs(pristine_name)):
        assert patched["cuda"]["processor_calls"] == []
        assert patched["cuda"]["sp_hooks"] == pristine["cuda"]["sp_hooks"]
        assert patched["cuda"]["all_to_all"] == pristine["cuda"]["all_to_all"]
        diff = max_abs_diff(patched["cuda"]["output"], pristine["cuda"]["output"])
        print(f"{run_name} non-NPU vs unpatched: max abs diff {diff}")
        figures[f"{run_name}-non-npu-vs-unpatched"] = diff
        assert diff == 0.0


@pytest.mark.parametrize(
    "run_name,sp_size", [("patched-sp1", 1), ("patched-sp2", 2), ("patched-sp4", 4), ("patched-cfg2-sp2", 2)]
)
def test_npu_path_attends_valid_keys_without_a_mask(runs, figures, run_name: str, sp_size: int) -> None:
    for rank in runs(run_name):
        calls = rank["npu"]["attention_calls"]
        assert calls == expected_attention_calls(sp_size)
    mask_bytes = sum(0 if shape is None else prod(shape) for *_, shape in calls) // LAYERS
    before = len(TEXT_LENS) * padded_tokens(sp_size) ** 2
    print(f"{run_name}: attention mask bytes per layer call: {mask_bytes} (a [B, 1, S, S] bool mask: {before})")
    figures[f"{run_name}-mask-bytes-per-layer-call"] = mask_bytes


def test_upstream_path_hands_its_key_mask_to_the_kernel(runs) -> None:
    """The recording sees masks where there are some: unpatched vllm-omni passes its [B, S] key mask."""
    calls = runs("pristine-sp1")[0]["cuda"]["attention_calls"]
    assert calls == [(2, JOINT_TOKENS, JOINT_TOKENS, [2, JOINT_TOKENS])] * LAYERS


def test_key_padding_reads_valid_key_runs_and_refuses_other_masks(runs) -> None:
    cases = runs("patched-sp1")[0]["key_padding_cases"]
    assert not cases["missing"], "key_padding is not in the Ulysses module"
    assert cases["all-valid"] is None
    assert cases["cfg-text-lengths"] == [[0, 1, 4], [1, 2, 6]]
    assert cases["sp-padding-only"] == [[0, 2, 5]]
    assert cases["two-images-per-prompt"] == [[0, 2, 4], [2, 4, 6]]
    assert cases["not-a-prefix"].startswith("ValueError: the key mask of some row is not a prefix")

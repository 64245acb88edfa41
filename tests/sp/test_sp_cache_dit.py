"""Patches 4 and 5 with cache-dit: the NPU sequence-parallel path under vllm-omni's cache-dit backend.

From vllm-omni 0.24.0 on, ERNIE-Image's transformer declares a cache-dit adapter (its `layers` as Pattern_3
blocks). Cache-dit wraps those blocks and, on a step whose residual is similar enough to the last one, skips the
later layers and reuses their residual; on the NPU path each skipped layer is a skipped Ulysses all-to-all, so the
ranks must skip together. Each rank only holds its own tokens: cache-dit (1.3.0 and later) counts the blocks as
parallelized whenever the world size is > 1 and all-reduces (AVG) the residual means before it compares, so the
ranks take one decision. Without that all-reduce, ranks whose local diffs lie on both sides of the threshold
decide differently and the next all-to-all hangs.

The pipeline runs 8 steps from the same seeded noise with cache-dit enabled the way vllm-omni's model runner
enables it, at vllm-omni's default threshold (0.24) and at a threshold between the two SP=2 ranks' local residual
diffs at their first comparison (the SP=1 run repeats that threshold). Every time: the ranks compare as
parallelized and take the same decisions, the last layer runs on fewer steps than the first (caching happened,
on every rank) and the SP=2 latents equal the one-device run's (fp32, max abs diff <= 1e-5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.sp.conftest import launch
from tests.sp.tiny import TINY_CONFIG

TOLERANCE = 1e-5
STEPS = 8
THRESHOLDS = ("default", "between")


def cached(run: dict[str, Any], threshold: str) -> dict[str, Any]:
    result = run["cache_dit"]
    if not result["supported"]:
        pytest.skip("this vllm-omni release declares no cache-dit adapter for ERNIE-Image (from 0.24.0 on)")
    return result[threshold]


@pytest.fixture(scope="session")
def single_device(runs, patched_site: Path, tmp_path_factory: pytest.TempPathFactory):
    """threshold name -> the SP=1 cached run at the threshold the SP=2 run used."""
    found = {"default": runs("patched-sp1")[0]}
    sp2 = runs("patched-sp2")[0]["cache_dit"]
    if sp2["supported"]:
        threshold = sp2["between"]["threshold"]
        found["between"] = launch(patched_site, tmp_path_factory.mktemp("cache-dit-between-sp1"), 1, "--sp", "1",
                                  "--cache-dit", "--cache-dit-threshold", repr(threshold))[0]
    return lambda name: cached(found.get(name, found["default"]), name)


def test_the_between_threshold_lies_between_the_ranks_local_diffs(runs, figures) -> None:
    ranks = [cached(rank, "between") for rank in runs("patched-sp2")]
    threshold = ranks[0]["threshold"]
    first_local = [rank["comparisons"][0]["local"] for rank in ranks]
    figures["cache-dit-between-threshold"] = threshold
    figures["cache-dit-first-local-diffs"] = first_local
    print(f"cache-dit, SP=2: local residual diffs at the first comparison {first_local}, threshold {threshold:.4g}")
    assert min(first_local) < threshold < max(first_local)
    assert threshold < 1.0, "cache-dit's shortcut (threshold >= 1.0) compares nothing"


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_ranks_compare_as_parallelized_and_decide_alike(runs, threshold: str) -> None:
    ranks = [cached(rank, threshold) for rank in runs("patched-sp2")]
    decisions = [[c["similar"] for c in rank["comparisons"]] for rank in ranks]
    assert ranks[0]["comparisons"], "cache-dit compared no residual"
    assert all(c["parallelized"] for rank in ranks for c in rank["comparisons"]), "the residual means are all-reduced"
    assert all(d == decisions[0] for d in decisions), decisions
    assert all(rank["layer_calls"] == ranks[0]["layer_calls"] for rank in ranks)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_caching_happens_on_every_rank(runs, single_device, figures, threshold: str) -> None:
    for result in [single_device(threshold)] + [cached(rank, threshold) for rank in runs("patched-sp2")]:
        calls = result["layer_calls"]
        assert len(calls) == TINY_CONFIG["num_layers"]
        assert calls[0] == STEPS, "the first layer (Fn_compute_blocks=1) runs on every step"
        assert sum(calls) < STEPS * TINY_CONFIG["num_layers"], f"no step was cached: {calls}"
    figures[f"cache-dit-{threshold}-layer-calls"] = calls
    print(f"cache-dit ({threshold}): attention calls per layer over {STEPS} steps: {calls}")


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cache_dit_sp2_equals_its_single_device_run(runs, single_device, figures, threshold: str) -> None:
    single = single_device(threshold)
    diffs = []
    for rank in runs("patched-sp2"):
        result = cached(rank, threshold)
        assert result["threshold"] == single["threshold"]
        assert result["layer_calls"] == single["layer_calls"], "every rank caches the same steps as one device"
        diffs.append(float((result["latents"] - single["latents"]).abs().max()))
    print(f"cache-dit ({threshold}), SP=2 vs SP=1: max abs diff of the final latents, per rank: {diffs}")
    figures[f"cache-dit-{threshold}-sp2"] = max(diffs)
    assert max(diffs) <= TOLERANCE

"""Patches 4 and 5 with cache-dit: the NPU sequence-parallel path under vllm-omni's cache-dit backend.

From vllm-omni 0.24.0 on, ERNIE-Image's transformer declares a cache-dit adapter (its `layers` as Pattern_3
blocks). Cache-dit wraps those blocks and, on a step whose residual is similar enough to the last one, skips the
later layers and reuses their residual; on the NPU path each skipped layer is a skipped Ulysses all-to-all, so the
ranks must skip together. Each rank only holds its own tokens: cache-dit (1.3.0 and later) counts the blocks as
parallelized whenever the world size is > 1 and all-reduces (AVG) the residual means before it compares, so the
ranks take one decision. Without that all-reduce, ranks whose local diffs lie on both sides of the threshold
decide differently and the next all-to-all hangs.

The pipeline runs 8 steps from the same seeded noise with cache-dit enabled the way vllm-omni's model runner
enables it (timestep modulation scaled down so that consecutive residuals are close, as in a trained model: see
sp_worker.CACHE_DIT_MODULATION_SCALE), at vllm-omni's default threshold (0.24) and at a threshold between the two
SP=2 ranks' local residual diffs at their first comparison (the SP=1 run repeats that threshold). Every time: the
ranks compare as parallelized and decide on the all-reduced diff, so they take the same decisions; the last layer
runs on fewer steps than the first (caching happened, on every rank); and the SP=2 latents equal the one-device
run's (fp32, max abs diff <= 1e-5).

The all-reduced diff is not exactly the one-device diff: the SP padding tokens count in each rank's mean. A
threshold between those two would let SP=2 decide otherwise than SP=1 with both ranks in agreement, so the
"between" threshold keeps clear of that gap (between_ranks below); a test checks that it does. Each cached run is
a process of its own, as in vllm-omni (one cache-dit enable per worker).
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


def cached(run: dict[str, Any]) -> dict[str, Any]:
    result = run["cache_dit"]
    if not result["supported"]:
        pytest.skip("this vllm-omni release declares no cache-dit adapter for ERNIE-Image (from 0.24.0 on)")
    return result


def with_combined_diffs(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SP=2 ranks' cached runs, each comparison given the diff cache-dit decides on under SP ("combined": the
    AVG all-reduce of the ranks' means of |t1 - t2| over the AVG of their means of |t1|) and the diff one device
    computes over the same tokens without the SP padding ("one_device"), from the parts every rank recorded."""
    for index, comparison in enumerate(ranks[0]["comparisons"]):
        parts = [rank["comparisons"][index]["parts"] for rank in ranks]
        combined = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        one_device = sum(p[2] for p in parts) / sum(p[3] for p in parts)
        for rank in ranks:
            rank["comparisons"][index].update(combined=combined, one_device=one_device)
    return ranks


def between_ranks(ranks: list[dict[str, Any]]) -> float:
    """A threshold strictly between the lowest and the highest local residual diff of the SP=2 ranks at their first
    comparison (identical on every rank up to there, whatever the threshold), above both the combined and the
    one-device diff (so SP=2 and SP=1 reuse the cache there alike, though a rank deciding on its own diff alone
    would not): the middle of the gap between the higher of those two and the highest local diff."""
    first = [rank["comparisons"][0] for rank in ranks]
    floor, top = max(first[0]["combined"], first[0]["one_device"]), max(c["local"] for c in first)
    assert top > floor, f"no threshold between the ranks' local diffs clears the combined and one-device diffs: {first}"
    return (floor + top) / 2


@pytest.fixture(scope="session")
def cache_dit(runs, patched_site: Path, tmp_path_factory: pytest.TempPathFactory):
    """threshold name -> (the SP=1 cached run, the SP=2 ranks' cached runs) at that threshold: vllm-omni's default
    (from the tier's patched SP=1 and SP=2 runs) and between the SP=2 ranks' local diffs (runs of their own)."""
    found: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    def run(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if name not in found:
            default = with_combined_diffs([cached(rank) for rank in runs("patched-sp2")])
            if name == "default":
                found[name] = (cached(runs("patched-sp1")[0]), default)
            else:
                args = ("--cache-dit", "--cache-dit-threshold", repr(between_ranks(default)))
                sp2 = launch(patched_site, tmp_path_factory.mktemp("cache-dit-between-sp2"), 2, "--sp", "2", *args)
                sp1 = launch(patched_site, tmp_path_factory.mktemp("cache-dit-between-sp1"), 1, "--sp", "1", *args)
                found[name] = (cached(sp1[0]), with_combined_diffs([cached(rank) for rank in sp2]))
        return found[name]

    return run


def test_the_between_threshold_lies_between_the_ranks_local_diffs(cache_dit, figures) -> None:
    _, ranks = cache_dit("between")
    threshold = ranks[0]["threshold"]
    first = ranks[0]["comparisons"][0]
    first_local = [rank["comparisons"][0]["local"] for rank in ranks]
    figures["cache-dit-between-threshold"] = threshold
    figures["cache-dit-first-local-diffs"] = first_local
    figures["cache-dit-first-combined-one-device"] = [first["combined"], first["one_device"]]
    print(f"cache-dit, SP=2: local residual diffs at the first comparison {first_local}, all-reduced "
          f"{first['combined']:.5g}, one device {first['one_device']:.5g}, threshold {threshold:.5g}")
    assert min(first_local) < threshold < max(first_local)
    assert threshold < 1.0, "cache-dit's shortcut (threshold >= 1.0) compares nothing"
    assert (first["combined"] < threshold) == (first["one_device"] < threshold), "SP=2 and SP=1 would differ"


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_ranks_compare_as_parallelized_and_decide_alike(cache_dit, threshold: str) -> None:
    _, ranks = cache_dit(threshold)
    decisions = [[c["similar"] for c in rank["comparisons"]] for rank in ranks]
    assert ranks[0]["comparisons"], "cache-dit compared no residual"
    assert all(c["parallelized"] for rank in ranks for c in rank["comparisons"]), "the residual means are all-reduced"
    for rank in ranks:
        assert [c["combined"] < rank["threshold"] for c in rank["comparisons"]] == decisions[0], (
            "every decision is taken on the all-reduced diff, not on the rank's own")
    assert all(d == decisions[0] for d in decisions), decisions
    assert all(rank["layer_calls"] == ranks[0]["layer_calls"] for rank in ranks)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_caching_happens_on_every_rank(cache_dit, figures, threshold: str) -> None:
    single, ranks = cache_dit(threshold)
    for result in [single, *ranks]:
        calls = result["layer_calls"]
        assert len(calls) == TINY_CONFIG["num_layers"]
        assert calls[0] == STEPS, "the first layer (Fn_compute_blocks=1) runs on every step"
        assert sum(calls) < STEPS * TINY_CONFIG["num_layers"], f"no step was cached: {calls}"
    figures[f"cache-dit-{threshold}-layer-calls"] = calls
    print(f"cache-dit ({threshold}): attention calls per layer over {STEPS} steps: {calls}")


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_cache_dit_sp2_equals_its_single_device_run(cache_dit, figures, threshold: str) -> None:
    single, ranks = cache_dit(threshold)
    diffs = []
    for result in ranks:
        assert result["threshold"] == single["threshold"]
        assert result["layer_calls"] == single["layer_calls"], "every rank caches the same steps as one device"
        assert [c["one_device"] for c in result["comparisons"]] == pytest.approx(
            [c["local"] for c in single["comparisons"]], rel=1e-5), "SP=2's padding-free diff is the one device's"
        diffs.append(float((result["latents"] - single["latents"]).abs().max()))
    print(f"cache-dit ({threshold}), SP=2 vs SP=1: max abs diff of the final latents, per rank: {diffs}")
    figures[f"cache-dit-{threshold}-sp2"] = max(diffs)
    assert max(diffs) <= TOLERANCE

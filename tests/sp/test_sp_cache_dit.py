"""Patches 4 and 5 with cache-dit: the NPU sequence-parallel path under vllm-omni's cache-dit backend.

From vllm-omni 0.24.0 on, ERNIE-Image's transformer declares a cache-dit adapter (its `layers` as
Pattern_3 blocks). Cache-dit wraps those blocks and, on cached steps, skips the later layers and
reuses their residual; on the NPU path each skipped layer is a skipped Ulysses all-to-all, so the
ranks must skip together. The pipeline runs 8 steps from the same seeded noise with cache-dit
enabled the way vllm-omni's model runner enables it; at SP=2 every rank must end with the latents
of the same cached run on one device (fp32, max abs diff <= 1e-5), and the last layer must have
been skipped on some steps, or the run proved nothing about caching.
"""
from __future__ import annotations

import pytest

from tests.sp.tiny import TINY_CONFIG

TOLERANCE = 1e-5
STEPS = 8


def cached(run: dict) -> dict:
    result = run["cache_dit"]
    if not result["supported"]:
        pytest.skip("this vllm-omni release declares no cache-dit adapter for ERNIE-Image (from 0.24.0 on)")
    return result


def test_cache_dit_skips_the_last_layer_on_some_steps(runs, figures) -> None:
    calls = cached(runs("patched-sp1")[0])["layer_calls"]
    figures["cache-dit-layer-calls"] = calls
    print(f"cache-dit, SP=1: attention calls per layer over {STEPS} steps: {calls}")
    assert calls[0] == STEPS, "the first layer (Fn_compute_blocks=1) runs on every step"
    assert 0 < calls[-1] < STEPS, "cache-dit reused the last layer's residual on some steps, not all"
    assert len(calls) == TINY_CONFIG["num_layers"]


def test_cache_dit_sp2_equals_its_single_device_run(runs, figures) -> None:
    single = cached(runs("patched-sp1")[0])
    diffs = []
    for rank in runs("patched-sp2"):
        result = cached(rank)
        assert result["layer_calls"] == single["layer_calls"], "every rank caches the same steps as one device"
        diffs.append(float((result["latents"] - single["latents"]).abs().max()))
    print(f"cache-dit, SP=2 vs SP=1: max abs diff of the final latents, per rank: {diffs}")
    figures["cache-dit-sp2"] = max(diffs)
    assert max(diffs) <= TOLERANCE

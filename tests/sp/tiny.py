"""Sizes of the tiny ERNIE-Image transformer and its inputs: the selftest's own
(ernie_patcher.selftest.runtime.sp_worker), shared by the SP worker and the tests."""
from __future__ import annotations

from ernie_patcher.selftest.runtime.sp_worker import GRID, TEXT_LENS, TINY_CONFIG  # noqa: F401 (shared)

IMAGE_TOKENS = GRID[0] * GRID[1]
"""35 image tokens; TEXT_LENS is a CFG batch (the shorter prompt is padded and masked)."""
JOINT_TOKENS = IMAGE_TOKENS + max(TEXT_LENS)
"""41 = 35 image + 6 text tokens: not divisible by 2 or 4, so the SP runs must pad."""


def padded_tokens(sp_size: int) -> int:
    return -(-JOINT_TOKENS // sp_size) * sp_size


def expected_attention_calls(sp_size: int) -> list[tuple[int, int, int, None]]:
    """The patched NPU path's Attention calls in one forward: per layer, one unmasked call per CFG
    row, as (rows, gathered query length, valid keys = image + the row's text tokens, mask shape)."""
    return [(1, padded_tokens(sp_size), IMAGE_TOKENS + text, None) for text in TEXT_LENS] * TINY_CONFIG["num_layers"]

"""Sizes of the tiny ERNIE-Image transformer and its inputs, shared by the SP worker and the tests."""
from __future__ import annotations

from typing import Any

TINY_CONFIG: dict[str, Any] = {
    "in_channels": 8,
    "num_layers": 2,
    "num_attention_heads": 4,
    "ffn_hidden_size": 128,
    "hidden_size": 64,
    "text_in_dim": 32,
    "rope_axes_dim": (4, 6, 6),
}
GRID = (5, 7)
IMAGE_TOKENS = GRID[0] * GRID[1]
"""35 image tokens."""
TEXT_LENS = (3, 6)
"""A CFG batch: negative and positive prompt of different lengths (the shorter one is padded and masked)."""
JOINT_TOKENS = IMAGE_TOKENS + max(TEXT_LENS)
"""41 = 35 image + 6 text tokens: not divisible by 2 or 4, so the SP runs must pad."""


def padded_tokens(sp_size: int) -> int:
    return -(-JOINT_TOKENS // sp_size) * sp_size


def expected_attention_calls(sp_size: int) -> list[tuple[int, int, int, None]]:
    """The patched NPU path's Attention calls in one forward: per layer, one unmasked call per CFG
    row, as (rows, gathered query length, valid keys = image + the row's text tokens, mask shape)."""
    return [(1, padded_tokens(sp_size), IMAGE_TOKENS + text, None) for text in TEXT_LENS] * TINY_CONFIG["num_layers"]

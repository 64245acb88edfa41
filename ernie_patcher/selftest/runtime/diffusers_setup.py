"""diffusers' torch_npu hookup on the fake device, as its own guarded import does when torch_npu is installed.

diffusers decides at import (attention_dispatch.py, module level) whether torch_npu is installed, from
package metadata the reference module does not have; on the fake device the result of that import is
set here instead. On a real NPU diffusers' own import is used and nothing is changed.
"""
from __future__ import annotations

import importlib
import sys

from .device import Device

DISPATCH = "diffusers.models.attention_dispatch"


def prepare(device: Device) -> None:
    """On the fake device: diffusers' attention dispatch bound to the reference npu_fusion_attention."""
    if not device.fake:
        return
    try:
        dispatch = importlib.import_module(DISPATCH)
    except ImportError:
        return  # diffusers is not installed: its checks are skipped with that reason
    dispatch.npu_fusion_attention = sys.modules["torch_npu"].npu_fusion_attention
    dispatch._CAN_USE_NPU_ATTN = True

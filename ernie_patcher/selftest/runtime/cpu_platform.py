"""A CPU stand-in for vllm-omni's device platform, so its distributed code runs in gloo processes.

vllm-omni picks its platform lazily (`vllm_omni.platforms.current_omni_platform`) and several
modules bind it at import time, so `install()` must run before any `vllm_omni.diffusion`
import. `set_npu(True)` makes the platform report Ascend NPU (`is_npu()`), which selects the
NPU code paths of the patched model; `set_npu(False)` reports CUDA, the upstream default path.
Tensors stay on the CPU either way. Attention uses vllm-omni's SDPA backend, unless
`set_npu(..., npu_attention_backend=True)`: then vllm-omni's own NPU platform chooses it: its
NPUOmniPlatform.get_diffusion_attn_backend_cls runs (FLASH_ATTN when `mindiesd` is importable, after
importing it; else SDPA), and the chosen AttentionImpl.forward dispatches to `forward_npu` because the
platform reports NPU. vllm_omni/platforms/npu/platform.py imports `vllm_ascend.platform.NPUPlatform`
at module level, only to derive NPUOmniPlatform from it; vllm-ascend (Ascend's vllm plugin, built for
CANN) is not installed here, so while that module is imported a stand-in `vllm_ascend.platform` whose
NPUPlatform is an empty subclass of vllm's Platform is in sys.modules (and removed again). Nothing of
it is called: the backend choice reads only mindiesd's presence.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from vllm.platforms.interface import Platform
import vllm_omni.platforms as omni_platforms
from vllm_omni.platforms.interface import OmniPlatform, OmniPlatformEnum

SDPA_BACKEND = "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend"


class CpuTestPlatform(OmniPlatform):
    """gloo, one CPU "device" per process, SDPA attention; reports NPU or CUDA on demand."""

    _omni_enum = OmniPlatformEnum.CUDA
    device_name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"
    dist_backend = "gloo"
    reports_npu = False
    npu_attention_backend = False

    def is_npu(self) -> bool:
        return self.reports_npu

    def is_cuda(self) -> bool:
        return not self.reports_npu

    @classmethod
    def get_torch_device(cls, local_rank: int | None = None) -> torch.device:
        return torch.device("cpu")

    @classmethod
    def get_device_count(cls) -> int:
        return 1

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        return None

    @classmethod
    def synchronize(cls) -> None:
        return None

    @classmethod
    def get_diffusion_attn_backend_cls(cls, selected_backend: str | None, head_size: int, **kwargs: object) -> str:
        """SDPA, or in NPU-backend mode vllm-omni's NPU platform's own choice; later releases pass
        extra hints (e.g. allow_trtllm_default), handed on as they come."""
        if cls.reports_npu and cls.npu_attention_backend:
            choose = npu_platform_class().get_diffusion_attn_backend_cls.__func__
            return choose(cls, selected_backend, head_size, **kwargs)
        return SDPA_BACKEND


def npu_platform_class() -> type:
    """vllm-omni's NPUOmniPlatform, its module imported with vllm_ascend.platform stood in if it is absent."""
    name = "vllm_omni.platforms.npu.platform"
    if name in sys.modules or importlib.util.find_spec("vllm_ascend") is not None:
        return importlib.import_module(name).NPUOmniPlatform
    package, platform = types.ModuleType("vllm_ascend"), types.ModuleType("vllm_ascend.platform")
    platform.NPUPlatform = type("NPUPlatform", (Platform,), {"__doc__": "Stand-in base class (vllm-ascend absent)."})
    package.platform = platform
    sys.modules.update({"vllm_ascend": package, "vllm_ascend.platform": platform})
    try:
        return importlib.import_module(name).NPUOmniPlatform
    finally:
        del sys.modules["vllm_ascend"], sys.modules["vllm_ascend.platform"]


def install() -> CpuTestPlatform:
    """Make a CpuTestPlatform vllm-omni's current platform and return it."""
    platform = CpuTestPlatform()
    omni_platforms._current_omni_platform = platform
    return platform


def set_npu(platform: CpuTestPlatform, npu: bool, npu_attention_backend: bool = False) -> None:
    """Report Ascend NPU (True) or CUDA (False) from now on, choosing attention backends as above.

    vllm-omni caches the backend it resolves per process (functools.cache in its selector module,
    under release-specific names), so every cached resolver there is cleared: the next Attention
    layer asks the platform again.
    """
    from vllm_omni.diffusion.attention import selector  # not at import time: see install()

    type(platform).reports_npu = npu
    type(platform).npu_attention_backend = npu_attention_backend
    for resolver in vars(selector).values():
        if callable(getattr(resolver, "cache_clear", None)):
            resolver.cache_clear()

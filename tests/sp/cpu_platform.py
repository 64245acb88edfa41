"""A CPU stand-in for vllm-omni's device platform, so its distributed code runs in gloo processes.

vllm-omni picks its platform lazily (`vllm_omni.platforms.current_omni_platform`) and several
modules bind it at import time, so `install()` must run before any `vllm_omni.diffusion`
import. `set_npu(True)` makes the platform report Ascend NPU (`is_npu()`), which selects the
NPU code paths of the patched model; `set_npu(False)` reports CUDA, the upstream default path.
Tensors stay on the CPU either way and attention uses vllm-omni's SDPA backend.
"""
from __future__ import annotations

import torch
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
        """SDPA whatever is asked; later releases pass extra hints (e.g. allow_trtllm_default)."""
        return SDPA_BACKEND


def install() -> CpuTestPlatform:
    """Make a CpuTestPlatform vllm-omni's current platform and return it."""
    platform = CpuTestPlatform()
    omni_platforms._current_omni_platform = platform
    return platform


def set_npu(platform: CpuTestPlatform, npu: bool) -> None:
    """Report Ascend NPU (True) or CUDA (False) from now on."""
    platform.reports_npu = npu

"""The device the checks run on: a real Ascend NPU (torch_npu), or the CPU through the fake NPU device.

On the CPU, the torch_npu stand-in (torch_npu_ref: its kernels as CPU references, the chip MindIE-SD asks for)
is put in sys.modules before diffusers is imported, and the interpreter's own mindiesd, when it has one, is
imported over it with only its device operator standing in (mindiesd_ops), exactly as the numerics tests do, so
the patched NPU branches run for real on CPU data. On an NPU the vendors' own modules are used and nothing is
replaced.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


class DeviceUnavailable(RuntimeError):
    """--device npu was asked for and this interpreter has no usable NPU."""


@dataclass
class Device:
    """Where the checks put their tensors; `fake` is the CPU with the fake NPU device and references."""

    kind: str  # "npu" or "cpu"
    description: str
    count: int = 1
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def fake(self) -> bool:
        return self.kind == "cpu"

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """TENSOR on npu:0 (fake or real)."""
        if self.fake:
            from . import fake_npu

            return fake_npu.to_npu(tensor)
        return tensor.to("npu:0")

    def get(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of TENSOR, which the code under test left on the NPU."""
        if tensor.device.type != "npu":
            raise AssertionError(f"the result is on {tensor.device}, not on the NPU")
        if self.fake:
            from . import fake_npu

            return fake_npu.to_cpu(tensor).clone()
        return tensor.cpu()

    def move(self, module: torch.nn.Module) -> torch.nn.Module:
        """MODULE's parameters and buffers on npu:0."""
        if self.fake:
            from . import fake_npu

            return fake_npu.move_module(module)
        return module.to("npu:0")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Factory calls with device="npu" land on the CPU payloads in fake mode; nothing on a real NPU."""
        if not self.fake:
            yield
            return
        from . import fake_npu

        with fake_npu.FakeNpuMode():
            yield

    def synchronize(self) -> None:
        if not self.fake:
            torch.npu.synchronize()


def _real_npu() -> tuple[int, str]:
    """(device count, why not) of torch_npu in this interpreter."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception as exc:  # any failure to import means no usable NPU here
        return 0, f"torch_npu does not import: {type(exc).__name__}: {exc}"
    try:
        count = int(torch.npu.device_count()) if torch.npu.is_available() else 0
    except Exception as exc:
        return 0, f"torch.npu does not answer: {type(exc).__name__}: {exc}"
    return count, "" if count else "torch_npu imports but sees no NPU"


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return ""


def open_device(choice: str) -> Device:
    """The device for CHOICE ("auto", "npu", "cpu"); in fake mode the references are installed."""
    versions = {name: _version(name) for name in ("torch", "torch_npu", "mindiesd", "diffusers", "vllm-omni")}
    if choice in ("auto", "npu"):
        count, why_not = _real_npu()
        if count:
            return Device("npu", f"npu ({count} device(s), torch_npu {versions['torch_npu']})", count, versions)
        if choice == "npu":
            raise DeviceUnavailable(why_not)
    _install_fake()
    mindiesd = "MindIE-SD's own code, its laser kernel stood in" if "mindiesd" in sys.modules else "no mindiesd"
    return Device("cpu", f"cpu (fake npu device, CPU stand-ins of torch_npu's kernels; {mindiesd})", 1, versions)


CHIP = "A2"
"""The chip the fake device reports to MindIE-SD: an A2, whose MindIE-SD registers the laser operator."""


def _install_fake() -> None:
    from . import fake_npu, mindiesd_ops, torch_npu_ref

    torch_npu = torch_npu_ref.build_module(strict_device=True, chip=CHIP)
    sys.modules["torch_npu"] = torch_npu
    fake_npu.install(torch_npu.npu)
    if mindiesd_ops.available():
        try:
            mindiesd_ops.load(CHIP, strict_device=True)
        except Exception as exc:  # a broken mindiesd is the laser check's skip reason (the patch's import fails too)
            print(f"selftest: mindiesd does not import: {type(exc).__name__}: {exc}", file=sys.stderr)


@contextlib.contextmanager
def counting(owner: Any, name: str, counter: list[int]) -> Iterator[None]:
    """OWNER.NAME replaced by a wrapper that counts its calls into COUNTER[0]."""
    original: Callable = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)

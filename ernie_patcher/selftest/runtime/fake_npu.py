"""A fake "npu" device for CPU-only processes: tensors that report device npu:0 but keep their data on CPU.

This is how the tests select the patches' NPU branches honestly. torch_npu itself registers Ascend as
PyTorch's PrivateUse1 backend under the name "npu"; `install()` does the same renaming, so
`tensor.device.type == "npu"` is answered by PyTorch's own device machinery, exactly the check the
patched code makes. NpuTensor is a wrapper tensor subclass whose device is npu:0 and whose payload is a
CPU tensor: every aten op on it (and every factory call asking for device "npu") runs on the CPU payload
through __torch_dispatch__ and hands back NpuTensors. The code under test is not altered in any way.

`install()` is process-wide and irreversible (PyTorch allows the backend to be renamed once), so it is
only called in worker or selftest subprocesses, never in the pytest or ernie-patch process.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

NPU = "npu"


class NpuTensor(torch.Tensor):
    """A tensor reporting device npu:0 whose data is the CPU tensor `payload`."""

    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor) -> "NpuTensor":
        return torch.Tensor._make_wrapper_subclass(
            cls,
            payload.shape,
            strides=payload.stride(),
            storage_offset=payload.storage_offset(),
            dtype=payload.dtype,
            device=torch.device(NPU, 0),
            requires_grad=False,
        )

    def __init__(self, payload: torch.Tensor) -> None:
        self.payload = payload

    def __repr__(self) -> str:
        return f"NpuTensor({self.payload!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run_on_cpu(func, args, kwargs or {})


def _run_on_cpu(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Run FUNC on the CPU payloads; wrap its tensor results when any input was on the fake NPU."""
    touched_npu = False

    def unwrap(value: Any) -> Any:
        nonlocal touched_npu
        if isinstance(value, NpuTensor):
            touched_npu = True
            return value.payload
        if isinstance(value, torch.device) and value.type == NPU:
            touched_npu = True
            return torch.device("cpu")
        return value

    cpu_args, cpu_kwargs = tree_map(unwrap, (args, kwargs))
    result = func(*cpu_args, **cpu_kwargs)
    if not touched_npu:
        return result
    originals = {id(a.payload): a for a in tree_flatten_tensors((args, kwargs)) if isinstance(a, NpuTensor)}

    def wrap(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or isinstance(value, NpuTensor):
            return value
        original = originals.get(id(value))
        return NpuTensor(value) if original is None else original

    return tree_map(wrap, result)


def tree_flatten_tensors(tree: Any) -> list[torch.Tensor]:
    """All tensors in a pytree."""
    found: list[torch.Tensor] = []
    tree_map(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, tree)
    return found


class FakeNpuMode(TorchDispatchMode):
    """Routes factory calls with device="npu" (torch.arange(..., device=npu), ...) to the CPU."""

    def __torch_dispatch__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run_on_cpu(func, args, kwargs or {})


def install(device_module: object) -> None:
    """Name PrivateUse1 "npu", as torch_npu does, with PyTorch's own Python-backend scaffolding.

    torch.utils.backend_registration._setup_privateuseone_for_python_backend registers what PyTorch
    expects of a backend (device module, hooks, device guard); it is experimental API, used here only.
    DEVICE_MODULE becomes `torch.npu`, as torch_npu's own `torch_npu.npu` does: the torch_npu stand-in's
    (torch_npu_ref.NpuDeviceModule), which also answers `get_amp_supported_dtype()` as torch_npu's does on a
    bf16-capable device: `torch.autocast(device_type="npu", ...)` requires it, and diffusers >= 0.41 enters
    `torch.autocast(device_type=pos.device.type, enabled=False)` in the ERNIE-Image RoPE.
    """
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(NPU, backend_module=device_module)


def to_npu(tensor: torch.Tensor) -> NpuTensor:
    """TENSOR's data, now reported on npu:0."""
    return NpuTensor(tensor)


def move_module(module: torch.nn.Module) -> torch.nn.Module:
    """MODULE with every parameter and buffer on the fake NPU (what `module.to("npu")` does with torch_npu)."""
    return module._apply(lambda tensor: tensor if isinstance(tensor, NpuTensor) else NpuTensor(tensor.detach()))


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU payload of an NpuTensor."""
    if not isinstance(tensor, NpuTensor):
        raise TypeError(f"expected an NpuTensor, got a tensor on {tensor.device}")
    return tensor.payload

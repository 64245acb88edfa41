"""Runs the tiny ERNIE-Image models in a fresh process whose diffusers is one given install tree.

    python -m tests.numerics.worker SCENARIO OUTPUT.pt      (PYTHONPATH = <tree>:<repo root>)

Scenarios:
  cpu      plain CPU forward; then again with the torch_npu stand-in importable
           (sys.modules["torch_npu"]) and refusing non-NPU tensors, counting its kernel calls.
  npu      forward on the fake NPU device (ernie_patcher/selftest/runtime/fake_npu.py) with the torch_npu stand-in
           and the real mindiesd 3.1.0 over it (its laser kernel stood in, an A2 chip): once with the "native"
           attention backend (SDPA), once with "_native_npu".
  npu_bf16 the same in bfloat16 (weights and floating inputs cast after seeding, as a bf16 pipeline
           loads them); outputs are returned in bfloat16.

Each writes a dict of CPU tensors (or the error a forward raised) and kernel call counts to OUTPUT.pt
for the tests to compare.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from ernie_patcher.selftest.runtime import tiny_ernie
from ernie_patcher.selftest.runtime import mindiesd_ops, torch_npu_ref

TRANSFORMER = "diffusers.models.transformers.transformer_ernie_image"
DISPATCH = "diffusers.models.attention_dispatch"


def _import_targets() -> tuple[Any, Any]:
    transformer, dispatch = importlib.import_module(TRANSFORMER), importlib.import_module(DISPATCH)
    if "site-packages" in transformer.__file__:
        raise RuntimeError(f"diffusers must come from the install tree, not {transformer.__file__}")
    return transformer, dispatch


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """{"out": output} or, when the forward raises, {"error": "<type>: <message>"} for the test to report."""
    try:
        with torch.no_grad():
            return {"out": model(**inputs, return_dict=False)[0]}
    except Exception as error:  # reported by the tests, not swallowed
        return {"error": f"{type(error).__name__}: {error}"}


@contextlib.contextmanager
def _module_installed(name: str, module: Any) -> Iterator[None]:
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        yield
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous


def run_cpu() -> dict[str, Any]:
    """CPU forwards, without and with an importable (strict) reference torch_npu."""
    transformer, _ = _import_targets()
    result: dict[str, Any] = {"diffusers_file": transformer.__file__, "cases": {}}
    for name, case in tiny_ernie.CASES.items():
        model = tiny_ernie.build_model(transformer, case)
        inputs = tiny_ernie.make_inputs(case)
        plain = _forward(model, inputs)
        torch_npu = torch_npu_ref.build_module(strict_device=True)
        with _module_installed("torch_npu", torch_npu):
            importlib.import_module("torch_npu")
            with_torch_npu = _forward(model, inputs)
        result["cases"][name] = {
            "digest": tiny_ernie.state_digest(model),
            "plain": plain,
            "torch_npu_importable": with_torch_npu | {"calls": dict(torch_npu.calls)},
        }
    return result


def _to_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """VALUE in DTYPE when it is floating point (the text lengths stay integers)."""
    return value.to(dtype) if value.is_floating_point() else value


def run_npu(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Fake-NPU forwards in DTYPE with reference torch_npu and mindiesd; "native" then "_native_npu" backend."""
    from ernie_patcher.selftest.runtime import fake_npu

    transformer, dispatch = _import_targets()
    torch_npu = torch_npu_ref.build_module(strict_device=True, chip="A2")
    sys.modules["torch_npu"] = torch_npu
    fake_npu.install(torch_npu.npu)
    mindiesd_ops.load("A2", strict_device=True)
    # What diffusers' own guarded import does when torch_npu is installed (attention_dispatch.py, module level).
    dispatch.npu_fusion_attention = torch_npu.npu_fusion_attention
    dispatch._CAN_USE_NPU_ATTN = True
    result: dict[str, Any] = {"diffusers_file": transformer.__file__, "cases": {}}
    with fake_npu.FakeNpuMode():
        for name, case in tiny_ernie.CASES.items():
            model = tiny_ernie.build_model(transformer, case)
            digest = tiny_ernie.state_digest(model)
            model = model.to(dtype).to(torch.device("npu"))
            inputs = {key: fake_npu.to_npu(_to_dtype(value, dtype)) for key, value in tiny_ernie.make_inputs(case).items()}
            entry: dict[str, Any] = {"digest": digest, "param_device": str(next(model.parameters()).device)}
            for backend in ("native", "_native_npu"):
                model.set_attention_backend(backend)
                mindiesd_ops.clear(torch_npu)
                run = _forward(model, inputs)
                if "out" in run:
                    run = {"device": str(run["out"].device), "out": fake_npu.to_cpu(run["out"]).clone()}
                entry[backend] = run | {"calls": mindiesd_ops.routes(torch_npu)}
            model.reset_attention_backend()
            result["cases"][name] = entry
    return result


SCENARIOS = {"cpu": run_cpu, "npu": run_npu, "npu_bf16": lambda: run_npu(torch.bfloat16)}


def main(argv: list[str]) -> int:
    scenario, output = argv
    torch.set_num_threads(1)
    torch.save(SCENARIOS[scenario](), Path(output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

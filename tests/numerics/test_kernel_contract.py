"""The kernel stand-ins against the vendors' own declarations, read out of the published packages.

- torch_npu's kernels: the schema of each op in `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml` of
  the torch-npu 2.14.0 wheel (downloaded once into the test cache with `pip download --no-deps`, never
  installed: it needs torch 2.14 and CANN). Same names in the same order, same defaults, the same keyword-only
  parameters; PyTorch's codegen binds `Tensor self` as `input` in Python. An undeclared keyword is a TypeError.
- npu_rotary_mul: bit-identical to torch_npu's own decomposition (`torch_npu/_inductor/decomposition.py`).
- MindIE-SD's `mindiesd::la`: the schema its libPTAExtensionOPS.so declares (the .so of the tier's mindiesd).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ernie_patcher.selftest.runtime import mindiesd_ops, torch_npu_ref
from tests.support.realpkgs import wheel

TORCH_NPU = ("torch-npu", "2.14.0")
SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DECOMPOSITION_FILE = "torch_npu/_inductor/decomposition.py"
LITERALS = {"None": None, "True": True, "False": False}


@pytest.fixture(scope="module")
def torch_npu_wheel() -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel(*TORCH_NPU)) as archive:
        yield archive


def declared_schema(archive: zipfile.ZipFile, op: str) -> str:
    """The `func:` line of OP in torch_npu's op schema file."""
    text = archive.read(SCHEMA_FILE).decode()
    found = re.findall(rf"^\s*-?\s*func: ({op}\(.*\) -> .*)$", text, flags=re.MULTILINE)
    assert len(found) == 1, f"{op}: {len(found)} declarations in {SCHEMA_FILE}"
    return found[0]


def _default(text: str) -> Any:
    if text in LITERALS:
        return LITERALS[text]
    if text[0] in "'\"":
        return text[1:-1]
    return float(text) if "." in text else int(text)


def parameters(schema: str) -> list[tuple[str, Any, bool]]:
    """(Python name, default or inspect.Parameter.empty, keyword-only) of each argument of an ATen-style SCHEMA."""
    arguments = schema[schema.index("(") + 1:schema.rindex(") ->")]
    found, keyword_only = [], False
    for argument in (a.strip() for a in arguments.split(",")):
        if argument == "*":
            keyword_only = True
            continue
        declaration, _, default = argument.partition("=")
        name = declaration.split()[-1]
        found.append(("input" if name == "self" else name, _default(default) if default else inspect.Parameter.empty,
                      keyword_only))
    return found


def stand_in_parameters(function: Callable) -> list[tuple[str, Any, bool]]:
    return [(p.name, p.default, p.kind is inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("op", torch_npu_ref.KERNELS)
def test_stand_in_takes_exactly_the_declared_parameters(torch_npu_wheel: zipfile.ZipFile, op: str) -> None:
    declared = parameters(declared_schema(torch_npu_wheel, op))
    stand_in = getattr(torch_npu_ref.build_module(strict_device=False), op)
    assert stand_in_parameters(stand_in) == declared


@pytest.mark.parametrize("op", torch_npu_ref.KERNELS)
def test_an_undeclared_keyword_is_a_type_error(op: str) -> None:
    stand_in = getattr(torch_npu_ref.build_module(strict_device=False), op)
    x = torch.zeros(1, 2, 1, 4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        stand_in(x, x, x, atten_mask_typo=None)


def _decomposition(archive: zipfile.ZipFile) -> Callable:
    """torch_npu's own `npu_rotary_mul` decomposition (a nested function of decomposition.py), compiled alone."""
    tree = ast.parse(archive.read(DECOMPOSITION_FILE).decode())
    wanted = {"_rotate_half", "npu_rotary_mul"}
    nodes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in wanted}
    assert set(nodes) == wanted, f"{DECOMPOSITION_FILE} has {sorted(nodes)}"
    namespace: dict[str, Any] = {"torch": torch, "Tensor": torch.Tensor}
    module = ast.Module(body=[nodes["_rotate_half"], nodes["npu_rotary_mul"]], type_ignores=[])
    exec(compile(module, DECOMPOSITION_FILE, "exec"), namespace)
    return namespace["npu_rotary_mul"]


@pytest.mark.parametrize("cos_shape", [(1, 7, 1, 8), (3, 7, 1, 8), (3, 7, 2, 8)], ids=["1S1D", "BS1D", "BSND"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_npu_rotary_mul_is_torch_npus_own_decomposition(torch_npu_wheel: zipfile.ZipFile, cos_shape: tuple,
                                                        dtype: torch.dtype) -> None:
    decomposition = _decomposition(torch_npu_wheel)
    generator = torch.Generator().manual_seed(sum(cos_shape))
    x = torch.randn(3, 7, 2, 8, generator=generator).to(dtype)
    angles = torch.randn(cos_shape, generator=generator) * 300
    cos, sin = torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
    stand_in = torch_npu_ref.build_module(strict_device=False).npu_rotary_mul
    assert torch.equal(stand_in(x, cos, sin, rotary_mode="half"), decomposition(x, cos, sin))


def _normalized(schema: str) -> str:
    return re.sub(r"\s+", " ", schema).replace("( ", "(").replace(" )", ")").strip()


def test_laser_op_stand_in_has_the_schema_mindiesd_declares() -> None:
    """`mindiesd::la` as MindIE-SD's own operator library registers it, byte for byte (whitespace aside)."""
    spec = importlib.util.find_spec("mindiesd")
    assert spec is not None, "the tier's mindiesd overlay is not on the path"
    libraries = sorted(Path(spec.origin).parent.glob("plugin/*/libPTAExtensionOPS.so"))
    assert libraries, "mindiesd ships no libPTAExtensionOPS.so"
    for library in libraries:
        found = re.findall(rb"la\(Tensor query,[^\x00]*?-> \(Tensor, Tensor\)", library.read_bytes())
        assert {_normalized(f.decode()) for f in found} == {_normalized(mindiesd_ops.LA_SCHEMA)}, library
    mindiesd_ops.register_laser_op()
    declared = torch._C.parse_schema("mindiesd::" + _normalized(mindiesd_ops.LA_SCHEMA))
    assert torch.ops.mindiesd.la.default._schema == declared

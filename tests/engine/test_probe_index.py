"""Call, string and import probes answered from one index per file content (one AST walk per kind),
with the same answers as walking the tree for each probe: suffix matches of dotted names, the line of
the first match in ast.walk order. On the real diffusers 0.38.0 attention_dispatch.py."""
from __future__ import annotations

import ast
from pathlib import Path

from ernie_patcher.patchset import probes
from ernie_patcher.patchset.probes import run_probe
from ernie_patcher.patchset.series import ProbeSpec
from support.cli import DISPATCH


def _walked(source: bytes, kind: str, wanted: str) -> int | None:
    """The line of the first node (ast.walk order) a probe of KIND for WANTED matches: the reference."""
    for node in ast.walk(ast.parse(source)):
        if kind == "call" and isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name == wanted or name.endswith("." + wanted):
                return node.lineno
        if kind == "string" and isinstance(node, ast.Constant) and node.value == wanted:
            return node.lineno
    return None


def test_index_gives_what_a_walk_gives(site: Path):
    source = (site / DISPATCH).read_bytes()
    for kind, wanted in (("call", "npu_fusion_attention"), ("call", "torch_npu.npu_fusion_attention"),
                         ("call", "fusion_attention"), ("call", "F.scaled_dot_product_attention"),
                         ("call", "scaled_dot_product_attention"), ("string", "_native_npu"),
                         ("string", "no such string here")):
        probe = ProbeSpec(file=DISPATCH, kind=kind, name=wanted if kind == "call" else None,
                          value=wanted if kind == "string" else None)
        line = _walked(source, kind, wanted)
        result = run_probe(probe, source)
        assert result.passed == (line is not None), (kind, wanted, result.detail)
        if line is not None:
            assert result.detail.endswith(f"at line {line}"), (kind, wanted, result.detail)


def test_a_thousand_probes_of_one_file_walk_it_once_per_kind(site: Path, monkeypatch):
    source = (site / DISPATCH).read_bytes() + b"\n# distinct content for this test\n"
    walks = []
    real_walk = ast.walk
    monkeypatch.setattr(probes.ast, "walk", lambda node: walks.append(node) or real_walk(node))
    for n in range(1000):
        run_probe(ProbeSpec(file=DISPATCH, kind="string", value=f"absent-{n}"), source)
        run_probe(ProbeSpec(file=DISPATCH, kind="call", name=f"absent_{n}"), source)
    assert len(walks) == 2

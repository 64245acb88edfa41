"""Declarative AST probes: facts a patched file must show, checked without running its code."""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Iterator

from ..errors import COMPILE_ERRORS
from .series import ProbeSpec

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class ProbeResult:
    probe: ProbeSpec
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"file": self.probe.file, "kind": self.probe.kind, "check": self.probe.describe(),
                "passed": self.passed, "detail": self.detail}


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements of a block, looking inside if/try/with (guarded definitions) but not into defs."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _statements(handler.body)


def _child(scope: ast.AST, name: str) -> ast.AST | None:
    for node in _statements(getattr(scope, "body", [])):
        if isinstance(node, (*_FUNCTIONS, ast.ClassDef)) and node.name == name:
            return node
    return None


def _resolve(tree: ast.Module, dotted: str) -> ast.AST | None:
    """Find a def or class by dotted name (`Class.method`) among module-level statements."""
    scope: ast.AST | None = tree
    for part in dotted.split("."):
        scope = _child(scope, part) if scope is not None else None
    return scope


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return None


def _positional(node: ast.AST) -> tuple[str, ...]:
    args = node.args  # type: ignore[attr-defined]
    return tuple(a.arg for a in [*args.posonlyargs, *args.args])


def _check_def(tree: ast.Module, probe: ProbeSpec, kinds: tuple[type, ...]) -> tuple[bool, str]:
    node = _resolve(tree, probe.name or "")
    if node is None or not isinstance(node, kinds):
        return False, f"{probe.name} not defined"
    if probe.params is not None and _positional(node) != probe.params:
        return False, f"{probe.name} has parameters ({', '.join(_positional(node))})"
    return True, f"{probe.name} defined at line {node.lineno}"


def _scope(tree: ast.Module, probe: ProbeSpec) -> tuple[ast.AST | None, str]:
    if not probe.within:
        return tree, "module"
    return _resolve(tree, probe.within), probe.within


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [a.name for a in node.names] + [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
    return []


# kind -> (what a match is called, how to say it is missing)
_SEARCHES = {
    "call": ("call", lambda p: f"no call to {p.name}"),
    "string": ("string", lambda p: f"no string {p.value!r}"),
    "import": ("import", lambda p: f"no import of {p.name}"),
}


def _suffixes(dotted: str | None) -> list[str]:
    """Every name a dotted name matches by suffix: `a.b.c` is itself, `b.c` and `c`."""
    if not dotted:
        return []
    parts = dotted.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _keys(node: ast.AST, kind: str) -> list[str]:
    """What NODE shows for probes of KIND: the names a call or import matches, a string's value."""
    if kind == "call":
        return _suffixes(_dotted(node.func)) if isinstance(node, ast.Call) else []
    if kind == "string":
        return [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []
    return [key for name in _imported_names(node) for key in _suffixes(name)]


def _index(scope: ast.AST, kind: str) -> dict[str, int]:
    """Each thing probes of KIND look for in SCOPE, with the line of its first node in ast.walk order:
    one walk per scope and kind, kept on the scope node (the tree is kept per file content, _parse),
    so a thousand probes of one file walk it once, not a thousand times."""
    kept = scope.__dict__.setdefault("_probe_index", {})
    if kind not in kept:
        index: dict[str, int] = {}
        for node in ast.walk(scope):
            for key in _keys(node, kind):
                index.setdefault(key, node.lineno)
        kept[kind] = index
    return kept[kind]


def _search(tree: ast.Module, probe: ProbeSpec) -> tuple[bool, str]:
    """Look for the probe's node anywhere inside its scope (`within`, or the whole module)."""
    scope, label = _scope(tree, probe)
    if scope is None:
        return False, f"{label} not defined"
    noun, missing = _SEARCHES[probe.kind]
    wanted = probe.value if probe.kind == "string" else probe.name
    line = _index(scope, probe.kind).get(wanted or "")
    if line is not None:
        return True, f"{noun} at line {line}"
    return False, f"{missing(probe)} in {label}"


def _evaluate(tree: ast.Module, probe: ProbeSpec) -> tuple[bool, str]:
    if probe.kind in ("function", "method"):
        return _check_def(tree, probe, _FUNCTIONS)
    if probe.kind == "class":
        return _check_def(tree, probe, (ast.ClassDef,))
    return _search(tree, probe)


def probe_key(probe: ProbeSpec) -> str:
    """A digest naming the probe's definition: a memoized result is reused only for the same probe."""
    return hashlib.sha256(json.dumps(asdict(probe), sort_keys=True).encode()).hexdigest()


def memo(result: ProbeResult, source: bytes | None) -> dict:
    """RESULT as kept in the manifest: it holds for exactly these file bytes."""
    return {"file_sha256": hashlib.sha256(source).hexdigest() if source is not None else None,
            "passed": result.passed, "detail": result.detail}


def recall(probe: ProbeSpec, source: bytes | None, memos: dict[str, dict]) -> ProbeResult | None:
    """The result computed at apply, when the file still has exactly the bytes it was computed on.

    A probe is a pure function of its definition and the file's bytes, so an identical sha256
    gives the identical result without parsing the file again.
    """
    kept = memos.get(probe_key(probe))
    digest = hashlib.sha256(source).hexdigest() if source is not None else None
    if kept is None or kept["file_sha256"] != digest:
        return None
    return ProbeResult(probe, kept["passed"], kept["detail"] + " (file unchanged since apply)")


@lru_cache(maxsize=16)
def _parse(source: bytes) -> ast.Module:
    """Parse once per distinct file content: several probes usually look at the same file."""
    return ast.parse(source)


def run_probe(probe: ProbeSpec, source: bytes | None) -> ProbeResult:
    """Evaluate PROBE against SOURCE (None: the file does not exist)."""
    if source is None:
        return ProbeResult(probe, probe.absent, "file does not exist")
    try:
        tree = _parse(source)
        found, detail = _evaluate(tree, probe)
    except COMPILE_ERRORS as exc:
        return ProbeResult(probe, False, f"file does not parse: {type(exc).__name__}: {str(exc)[:200]}")
    return ProbeResult(probe, found != probe.absent, detail)

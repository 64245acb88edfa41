"""Fuzz the diff parser, the hunk applier, the series loader and the state-file loaders: for any
input they return or raise the tool's own PatcherError (HunkConflict for the applier), nothing else.

Bounded by example counts (ERNIE_PATCHER_FUZZ_EXAMPLES, default 1000 per target); the number of
inputs each target tried is printed in the pytest terminal summary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ernie_patcher.patchset.diffparse import parse_patch
from ernie_patcher.errors import PatcherError
from ernie_patcher.patchset.hunks import HunkConflict, apply_hunks
from ernie_patcher.patchset.series import parse_series
from ernie_patcher.core.state import JOURNAL_SCHEMA, Journal, Manifest
from faultkit import FUZZ_COUNTS

EXAMPLES = int(os.environ.get("ERNIE_PATCHER_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TARGET = "".join(f"line {n}\n" for n in range(1, 40))
VALID_DIFF = """\
--- a/diffusers/models/example.py
+++ b/diffusers/models/example.py
@@ -3,7 +3,8 @@
 line 3
 line 4
 line 5
-line 6
+line 6 changed
+line 6b
 line 7
 line 8
 line 9
@@ -20,3 +21,3 @@
 line 20
-line 21
+line 21 changed
 line 22
--- /dev/null
+++ b/diffusers/models/new.py
@@ -0,0 +1,2 @@
+def f():
+    return 1
"""
VALID_SERIES = """\
schema = 1
name = "fuzz"

[[patch]]
id = "one"
file = "one.patch"
package = "diffusers"
versions = "==0.38.0"
strip = 1
requires = []

[[patch.probe]]
file = "diffusers/models/example.py"
kind = "function"
name = "f"
params = ["x"]
"""
DIFF_ALPHABET = st.sampled_from(list("-+ @\\\n,0123456789abcd/.") + ["--- ", "+++ ", "@@ -", " @@\n", "/dev/null",
                                                                     "diff --git ", "a/", "b/", "\r", "\t", "é"])


def _count(target: str) -> None:
    FUZZ_COUNTS[target] = FUZZ_COUNTS.get(target, 0) + 1


def _parse_and_apply(text: str) -> None:
    try:
        parsed = parse_patch(text, "diffusers", None, "fuzz")
    except PatcherError:
        return
    for file in parsed.files:
        for reverse in (False, True):
            try:
                apply_hunks(TARGET, file.hunks, reverse=reverse)
            except HunkConflict:
                pass


@FUZZ
@given(st.one_of(st.text(), st.lists(DIFF_ALPHABET, max_size=80).map("".join)))
def test_diff_parser_on_arbitrary_text(text: str):
    _count("diff parser, arbitrary text")
    _parse_and_apply(text)


@st.composite
def mutated(draw, base: str) -> str:
    """BASE with a few line-level edits: drop, duplicate, replace, or splice random characters."""
    lines = base.splitlines(True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["drop", "dup", "replace", "splice", "number"]))
        if action == "drop":
            del lines[at]
        elif action == "dup":
            lines.insert(at, lines[at])
        elif action == "replace":
            lines[at] = draw(st.text(max_size=30)) + "\n"
        elif action == "splice":
            cut = draw(st.integers(0, len(lines[at])))
            lines[at] = lines[at][:cut] + draw(st.text("-+ @\\\n0123456789/.", max_size=8)) + lines[at][cut:]
        else:
            lines[at] = "".join(str(draw(st.integers(0, 10 ** 6))) if c.isdigit() else c for c in lines[at])
    return "".join(lines)


@FUZZ
@given(mutated(VALID_DIFF))
def test_diff_parser_on_mutated_diffs(text: str):
    _count("diff parser + hunk applier, mutated diffs")
    _parse_and_apply(text)


@FUZZ
@given(text=st.one_of(st.text(), mutated(VALID_SERIES)))
def test_series_loader(tmp_path: Path, text: str):
    _count("series loader, arbitrary and mutated TOML")
    (tmp_path / "one.patch").write_text(VALID_DIFF)
    try:
        parse_series(text, tmp_path)
    except PatcherError:
        pass


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
VALID_MANIFEST = {
    "schema": 1, "tool": "ernie-patcher", "tool_version": "0.1.0", "updated": "now", "series": "s", "patch_dir": "/p",
    "patches": {"one": {"package": "diffusers", "version": "0.38.0", "patch_sha256": "a" * 64,
                        "files": ["diffusers/x.py"], "offsets": [0], "applied_at": "now"}},
    "files": {"diffusers/x.py": {"path": "/site/diffusers/x.py", "package": "diffusers", "version": "0.38.0",
                                 "relpath": "diffusers/x.py", "action": "modify", "before": "b" * 64,
                                 "after": "c" * 64, "mode": 420, "patches": ["one"], "module": "diffusers"}},
}


@st.composite
def damaged_manifest(draw) -> object:
    """The valid manifest with one value somewhere replaced by random JSON."""
    document = json.loads(json.dumps(VALID_MANIFEST))
    node = document
    for _ in range(draw(st.integers(0, 3))):
        if not isinstance(node, dict) or not node:
            break
        key = draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or draw(st.booleans()):
            node[key] = draw(JSON)
            return document
        node = node[key]
    if isinstance(node, dict):
        node[draw(st.text(max_size=8))] = draw(JSON)
    return document


@FUZZ
@given(st.one_of(JSON, damaged_manifest()))
def test_state_loaders(document: object):
    _count("manifest and journal loaders, damaged JSON")
    for load in (lambda d: Manifest.from_json(d, Path("/state/manifest.json")),
                 lambda d: Journal.from_json({"schema": JOURNAL_SCHEMA, "tool": "ernie-patcher", "operation": "apply",
                                              "started": "now", "restore": [], "manifest": d},
                                             Path("/state/journal.json")),
                 lambda d: Journal.from_json(d, Path("/state/journal.json"))):
        try:
            load(document)
        except PatcherError:
            pass


@pytest.fixture(scope="module")
def applied_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    from faultkit import cli, fault_set
    from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target

    root = tmp_path_factory.mktemp("fuzz-fast")
    site = install_target(root / "site", DIFFUSERS, VLLM_OMNI)
    patches = fault_set(site, root / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    return site, patches, (site / ".ernie-patcher" / "manifest.json").read_bytes()


@st.composite
def damaged_real_manifest(draw, good: bytes) -> bytes:
    """The applied manifest with one value at a random place replaced by random JSON, a key added
    or removed, or nested deeper than any parser's recursion limit."""
    document = json.loads(good)
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(900, 200_000))
        return (b'{"tool": "ernie-patcher", "schema": 2, "files": ' + b"[" * depth + b"]" * depth + b"}")
    node = document
    while isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or draw(st.integers(0, 3)) == 0:
            action = draw(st.sampled_from(["replace", "remove"]))
            if action == "remove":
                del node[key]
            else:
                node[key] = draw(JSON)
            return json.dumps(document).encode()
        node = node[key]
    if isinstance(node, dict):
        node[draw(st.text(max_size=8))] = draw(JSON)
    return json.dumps(document).encode()


def test_fast_path_hands_every_manifest_the_engine_refuses_to_it(applied_manifest: tuple[Path, Path, bytes]):
    """For any damage to a real manifest the fast path returns an answer or None (the engine then
    runs), never raises (exit 70); and for every manifest the engine refuses (corrupt state,
    exit 7) it returns None: it never answers where the engine refuses."""
    from ernie_patcher.core import fastpath

    site, patches, good = applied_manifest
    manifest = site / ".ernie-patcher" / "manifest.json"
    options = {"command": "verify", "python": None, "site": str(site), "patches": str(patches), "only": [],
               "as_json": True, "reparse": False, "quiet": False}
    answered = []

    @settings(max_examples=min(EXAMPLES, 300), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(damaged_real_manifest(good))
    def check(data: bytes) -> None:
        _count("fast path, damaged real manifests")
        manifest.write_bytes(data)
        try:
            Manifest.from_json(json.loads(data), manifest)
            refused = False
        except (PatcherError, ValueError, RecursionError):
            refused = True
        answer = fastpath.answer(options)
        assert not (refused and answer is not None), "the fast path answered from a manifest the engine refuses"
        answered.append(answer is not None)

    try:
        check()
    finally:
        manifest.write_bytes(good)
    assert fastpath.answer(options) is not None, "the fast path does not answer the undamaged manifest"

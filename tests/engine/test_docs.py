"""The documentation names only what exists: every relative link in README.md, ARCHITECTURE.md and
docs/*.md resolves (the file is there; an #anchor into a markdown file is one of its headings, as
GitHub makes them), every file of the repository and every test they name is there, every
`make TARGET` they name is a target of the Makefile, and README.md stays within 250 lines."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250
# A path whose first component is one of these is a path in this repository, relative to its root.
# Any other path the docs name (diffusers/..., ~/.cache/..., .ernie-patcher/, /opt/venv) is outside it.
REPO_DIRS = ("ernie_patcher", "tests", "bench", "patches", "examples", "docs", ".ci")
# The layer folders of ernie_patcher/: a code span that is only a path starting with one of them
# (`core/engine.py`, `selftest/runtime/`) is relative to ernie_patcher/.
PACKAGE_DIRS = ("cli", "authoring", "core", "selftest", "patchset", "target", "fs", "schema")
# Files of diffusers and vllm-omni that the docs name by their bare file name: not in this repository.
FOREIGN_FILES = {"attention_dispatch.py", "transformer_ernie_image.py", "ernie_image_transformer.py",
                 "pipeline_ernie_image.py", "ulysses_attention.py", "fused_rope.py"}
# Not searched for the files the docs name.
SKIP_DIRS = {".git", ".venv", ".cache", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w.*/-]*)" % "|".join(re.escape(d) for d in REPO_DIRS))
PACKAGE_PATH = re.compile(r"^(?:%s)/[\w.*/-]*$" % "|".join(PACKAGE_DIRS))
MODULE_FILE = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.py)\b(?![/\w])")
TEST_IN_FILE = re.compile(r"(?<![\w./-])(test_\w+\.py)::(test_\w+)")
TEST_NAME = re.compile(r"(?<![\w.:/-])(test_\w+)\b(?!\.py|[\w/-])")
MAKE_IN_SPAN = re.compile(r"^make\s+([\w.%-]+)")
MAKE_IN_BLOCK = re.compile(r"^\s*(?:\$\s+)?make\s+([\w.%-]+)", re.M)


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


class Markdown:
    """A markdown file split the way a reader sees it: prose (links, code spans, headings) apart
    from fenced code blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        prose, blocks, block, fence = [], [], [], None
        for line in self.text.splitlines():
            opening = FENCE.match(line)
            if fence is None and opening:
                fence, block = opening.group(1)[0] * 3, []
                prose.append("")
            elif fence is not None and line.lstrip().startswith(fence):
                blocks.append("\n".join(block))
                fence = None
                prose.append("")
            elif fence is not None:
                block.append(line)
                prose.append("")
            else:
                prose.append(line)
        self.prose = "\n".join(prose)  # fenced blocks blanked, line numbers kept
        self.blocks = blocks

    def spans(self) -> list[str]:
        """The contents of the inline code spans of the prose."""
        return [m.group(2).strip() for m in CODE_SPAN.finditer(self.prose)]

    def links(self) -> list[tuple[int, str]]:
        """(line, target) of every inline link and image; code spans are not links."""
        text = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), self.prose)
        return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]

    def headings(self) -> list[str]:
        return [m.group(2) for m in map(HEADING.match, self.prose.splitlines()) if m]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text without markup, lower case, every character but
    letters, digits, '_', '-' and spaces dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Every anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in Markdown(path).headings():
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


@lru_cache(maxsize=None)
def repository_files() -> tuple[frozenset[str], tuple[Path, ...]]:
    """The names of every file in the checkout, and the test modules."""
    names, tests = set(), []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        names.update(files)
        here = Path(directory)
        if here == ROOT / "tests" or ROOT / "tests" in here.parents:
            tests += [here / f for f in files if f.endswith(".py")]
    return frozenset(names), tuple(sorted(tests))


def _exists(relative: str, base: Path = ROOT) -> bool:
    """RELATIVE (a path, or a glob with '*') names at least one file or directory below BASE."""
    relative = relative.rstrip("/") or "."
    if "*" in relative:
        return any(base.glob(relative))
    return (base / relative).exists()


def _defines(test_file: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\b", test_file.read_text(encoding="utf-8"), re.M) is not None


def _strip_end(path: str) -> str:
    return path.rstrip(".,;:")


@lru_cache(maxsize=None)
def make_targets() -> tuple[frozenset[str], tuple[re.Pattern, ...]]:
    """The Makefile's targets, and its pattern rules as regular expressions."""
    names: set[str] = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith(("\t", "#", " ")):
            continue
        match = re.match(r"^([A-Za-z0-9_.%/$() -]+?)\s*::?(?!=)", line)
        if match:
            names.update(match.group(1).split())
    names.discard(".PHONY")
    patterns = tuple(re.compile("^" + re.escape(n).replace("%", ".+") + "$") for n in names if "%" in n)
    return frozenset(n for n in names if "%" not in n), patterns


def _is_target(name: str) -> bool:
    plain, patterns = make_targets()
    return name in plain or any(p.match(name) for p in patterns)


@pytest.mark.parametrize("doc", documents(), ids=_name)
def test_every_relative_link_resolves(doc: Path):
    page = Markdown(doc)
    broken = []
    for line, target in page.links():
        if SCHEME.match(target):
            continue  # an address outside the repository
        path, _, anchor = target.partition("#")
        destination = (doc.parent / path).resolve() if path else doc
        where = f"{_name(doc)}:{line}: {target}"
        if ROOT not in destination.parents and destination != ROOT:
            broken.append(f"{where} leaves the repository")
        elif not destination.exists():
            broken.append(f"{where}: no such file or directory")
        elif anchor and destination.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(destination):
            broken.append(f"{where}: no heading with that anchor in {_name(destination)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("doc", documents(), ids=_name)
def test_every_file_and_test_named_exists(doc: Path):
    page = Markdown(doc)
    names, test_files = repository_files()
    everything = page.prose + "\n" + "\n".join(page.blocks)
    missing = []
    for match in REPO_PATH.finditer(everything):
        if not _exists(_strip_end(match.group(1))):
            missing.append(f"{match.group(1)} (relative to the repository)")
    for span in page.spans():
        if PACKAGE_PATH.match(span) and not _exists(span, ROOT / "ernie_patcher"):
            missing.append(f"{span} (relative to ernie_patcher/)")
    for match in MODULE_FILE.finditer(everything):
        if match.group(1) not in names and match.group(1) not in FOREIGN_FILES:
            missing.append(f"{match.group(1)} (no file of that name in the repository)")
    for match in TEST_IN_FILE.finditer(everything):
        files = [t for t in test_files if t.name == match.group(1)]
        if files and not any(_defines(t, match.group(2)) for t in files):
            missing.append(f"{match.group(0)} (no such test in {', '.join(_name(t) for t in files)})")
    for span in page.spans():
        for match in TEST_NAME.finditer(span):
            if not any(_defines(t, match.group(1)) for t in test_files):
                missing.append(f"{match.group(1)} (no test of that name under tests/)")
    assert not missing, f"{_name(doc)} names what is not there:\n" + "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("doc", documents(), ids=_name)
def test_every_make_target_named_exists(doc: Path):
    page = Markdown(doc)
    named = [m.group(1) for span in page.spans() for m in [MAKE_IN_SPAN.match(span)] if m]
    named += [m.group(1) for block in page.blocks for m in MAKE_IN_BLOCK.finditer(block)]
    unknown = sorted({name for name in named if not _is_target(name)})
    assert not unknown, f"{_name(doc)} names make targets the Makefile does not have: {', '.join(unknown)}"


def test_readme_is_a_five_minute_read():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, more than {README_MAX_LINES}: move detail to docs/"


def test_readme_shows_make_demo_and_make_test_first():
    first = Markdown(ROOT / "README.md").blocks[0].splitlines()
    assert [line.split("#")[0].split() for line in first[:2]] == [["make", "demo"], ["make", "test"]]


def test_the_checks_see_what_the_docs_hold():
    """The parsers find the links, paths, tests and targets there are, and slug headings as GitHub
    does: a check that finds nothing would pass on anything."""
    readme = Markdown(ROOT / "README.md")
    assert any(target.startswith("docs/") for _, target in readme.links())
    assert "# Build context: the root of an ernie-patcher checkout, e.g." not in readme.headings()
    everything = "\n".join(Markdown(d).prose for d in documents())
    assert REPO_PATH.search(everything) and MODULE_FILE.search(everything) and TEST_IN_FILE.search(everything)
    assert any(PACKAGE_PATH.match(s) for s in Markdown(ROOT / "ARCHITECTURE.md").spans())
    assert _is_target("test") and _is_target("test-sp-0.24.0") and not _is_target("no-such-target")
    assert slug("`ernie-patch diff ID`") == "ernie-patch-diff-id"
    assert slug("Verify, and the fast path") == "verify-and-the-fast-path"
    assert slug("`ernie-patch create`: writing a patch from your edits") == \
        "ernie-patch-create-writing-a-patch-from-your-edits"
    assert slug("series.toml reference") == "seriestoml-reference"
    assert slug("Bird's-eye view") == "birds-eye-view"

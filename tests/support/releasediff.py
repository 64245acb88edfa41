"""Patch sets that are `git diff`s between two real published releases, and what `git apply` makes of them.

A release's files come from `pip install --no-deps --target` of its real wheel (realpkgs); the diff is
`git diff --no-index --binary` of the two releases' module directories, as a user keeping a private
build's delta would write it. `subset` builds the newer side of a smaller real pair: the older release
with a few of its paths as the newer release has them (every byte still a release's own).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from support.realpkgs import install_target
from support.tree import snapshot

SERIES = """schema = 1
name = "{name}"
"""
ENTRY = """
[[patch]]
id = "{id}"
file = "{id}.patch"
package = "{package}"
module = "{module}"
versions = "=={version}"
"""


def release(dest: Path, name: str, version: str) -> Path:
    """A `pip install --no-deps --target` tree of the real NAME==VERSION at DEST."""
    return install_target(dest, (name, version))


def git_diff(workdir: Path, old: str, new: str) -> bytes:
    """`git diff --no-index --binary OLD NEW` run in WORKDIR (paths relative to it: the diff's names)."""
    done = subprocess.run(["git", "diff", "--no-index", "--binary", old, new], cwd=workdir, capture_output=True)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"git diff failed: {done.stderr.decode()}")
    return done.stdout


def subset(old: Path, new: Path, dest: Path, paths: list[str]) -> Path:
    """A copy of tree OLD at DEST where each of PATHS (files or directories, relative) is as in NEW:
    copied from it, or removed when NEW does not have it."""
    shutil.copytree(old, dest, symlinks=True)
    for relpath in paths:
        target, source = dest / relpath, new / relpath
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def write_set(directory: Path, patches: list[dict], name: str = "release-diff") -> Path:
    """A patch set of PATCHES (id, package, module, version, diff: bytes) in DIRECTORY."""
    directory.mkdir(parents=True, exist_ok=True)
    text = SERIES.format(name=name)
    for patch in patches:
        (directory / f"{patch['id']}.patch").write_bytes(patch["diff"])
        text += ENTRY.format(**patch)
    (directory / "series.toml").write_text(text)
    return directory


def git_apply(site: Path, patch: Path, strip: int) -> None:
    """`git apply -pSTRIP PATCH` in SITE (a copy), as the reference of what the patch leaves."""
    subprocess.run(["git", "apply", f"-p{strip}", "--unsafe-paths", str(patch)], cwd=site, check=True)


def package_tree(site: Path) -> dict[str, tuple[str, int]]:
    """SITE's snapshot (contents, modes, directories) without the state directory, RECORD and bytecode,
    which git apply does not know of."""
    return {k: v for k, v in snapshot(site).items()
            if not k.startswith(".ernie-patcher") and not k.endswith("/RECORD") and "__pycache__" not in k}

"""Snapshots of a directory tree, to prove that a refused command changed nothing at all."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under ROOT: relative path -> (sha256 or link target or 'dir', mode)."""
    entries: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if path.is_symlink():
                entries[rel] = ("link:" + os.readlink(path), st.st_mode)
            elif path.is_dir():
                entries[rel] = ("dir", st.st_mode)
            else:
                entries[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode)
    return entries


def record_sha256(site: Path, dist_info: str, relpath: str) -> str:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for RELPATH."""
    for line in (site / dist_info / "RECORD").read_text().splitlines():
        path, _, rest = line.partition(",")
        if path == relpath:
            return rest.split(",")[0]
    raise KeyError(relpath)


def file_record_digest(path: Path) -> str:
    import base64

    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()

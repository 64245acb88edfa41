"""Find the target packages in an environment: this interpreter's, another's, or a site directory."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from . import envprobe
from .errors import ExitCode, PatcherError

STATE_DIRNAME = ".ernie-patcher"


@dataclass(frozen=True)
class InstalledPackage:
    """A distribution as found: version, where its dist-info and its import root are."""

    name: str
    module: str
    version: str
    dist_info: Path | None
    import_root: Path
    editable: bool

    def record(self) -> dict[str, str | None]:
        """RECORD entries: import-root-relative path -> 'sha256=<urlsafe-b64>' (or None)."""
        if self.dist_info is None:
            return {}
        try:
            text = (self.dist_info / "RECORD").read_text(encoding="utf-8")
        except OSError:
            return {}
        entries: dict[str, str | None] = {}
        for row in csv.reader(io.StringIO(text)):
            if row:
                entries[row[0]] = row[1] if len(row) > 1 and row[1] else None
        return entries


@dataclass(frozen=True)
class Environment:
    """The environment being patched; STATE_DIR holds the manifest, journal and originals."""

    python: str
    state_dir: Path
    packages: dict[str, InstalledPackage | None]

    def package(self, name: str) -> InstalledPackage | None:
        return self.packages.get(name)


def record_digest(data: bytes) -> str:
    """The digest in the RECORD format: 'sha256=' + urlsafe base64 without padding."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _ask_interpreter(python: str, request: dict) -> dict:
    import subprocess  # only for --python: the CLI starts faster without it

    source = Path(envprobe.__file__).read_text(encoding="utf-8")
    try:
        done = subprocess.run([python, "-c", source, json.dumps(request)], capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot run interpreter {python}: {exc}",
                           hint="pass --python the path of a python executable") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise PatcherError(ExitCode.ENVIRONMENT, f"interpreter {python} failed to describe its environment",
                           details=tail)
    return json.loads(done.stdout)


def discover(packages: list[tuple[str, str]], python: str | None = None,
             site: Path | None = None) -> Environment:
    """Locate PACKAGES ([(distribution, module)]) without importing them."""
    if python and site:
        raise PatcherError(ExitCode.USAGE, "--python and --site cannot be used together")
    unique = sorted(set(packages))
    if python:
        described = _ask_interpreter(python, {"packages": unique})
    else:
        paths = [str(Path(site).resolve())] if site else None
        described = envprobe.describe(unique, paths)
    state_dir = Path(site).resolve() if site else Path(described["purelib"])
    found: dict[str, InstalledPackage | None] = {}
    for dist, module in unique:
        info = described["distributions"].get(dist)
        location = described["modules"].get(module)
        if info is None or location is None:
            found[dist] = None
            continue
        module_dir = Path(location["module_dir"])
        found[dist] = InstalledPackage(
            name=dist, module=module, version=info["version"],
            dist_info=Path(info["dist_info"]) if info.get("dist_info") else None,
            import_root=module_dir.parent, editable=bool(info.get("editable")),
        )
    return Environment(python=described["python"] if not site else f"site:{state_dir}",
                       state_dir=state_dir / STATE_DIRNAME, packages=found)

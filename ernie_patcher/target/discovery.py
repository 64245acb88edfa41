"""Find the target packages in an environment: this interpreter's, another's, or a site directory."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExitCode, PatcherError
from . import envprobe

STATE_DIRNAME = ".ernie-patcher"
MAX_RECORD = 64 << 20


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
        """RECORD entries: import-root-relative path -> 'sha256=<urlsafe-b64>' (or None). Read by
        descriptor like every package file (a symlink, FIFO or file over 64 MiB is refused)."""
        if self.dist_info is None:
            return {}
        from ..fs.fsops import read_target

        data = read_target(self.dist_info / "RECORD", f"{self.dist_info.name}/RECORD", cap=MAX_RECORD)
        try:
            return parse_record(data.decode("utf-8")) if data is not None else {}
        except UnicodeDecodeError:
            return {}


def parse_record(text: str) -> dict[str, str | None]:
    """RECORD rows: path -> 'sha256=<urlsafe-b64>' (or None when the row has no digest).

    A RECORD without quotes or lone carriage returns (nearly all) is split directly; any other is
    read by the csv module."""
    text = text.replace("\r\n", "\n")
    if '"' in text or "\r" in text:
        return _parse_record_csv(text)
    entries: dict[str, str | None] = {}
    for line in text.split("\n"):
        if line:
            row = line.split(",")
            entries[row[0]] = row[1] if len(row) > 1 and row[1] else None
    return entries


def _parse_record_csv(text: str) -> dict[str, str | None]:
    import csv
    import io

    entries: dict[str, str | None] = {}
    try:
        for row in csv.reader(io.StringIO(text)):
            if row:
                entries[row[0]] = row[1] if len(row) > 1 and row[1] else None
    except csv.Error:
        pass  # a damaged RECORD counts up to the damage
    return entries


@dataclass(frozen=True)
class Environment:
    """The environment being patched; STATE_DIR holds the manifest, journal and originals.

    CACHE_TAG and MAGIC (hex) are those of the interpreter that loads its bytecode; INTERPRETER is
    the --python it was described by (None: this interpreter, --site included), ALLOW_USER_WRITABLE
    whether it runs even when another user could replace it (--allow-user-writable)."""

    python: str
    state_dir: Path
    packages: dict[str, InstalledPackage | None]
    cache_tag: str | None = None
    magic: str | None = None
    interpreter: str | None = None
    allow_user_writable: bool = False

    def package(self, name: str) -> InstalledPackage | None:
        return self.packages.get(name)


def record_digest(data: bytes) -> str:
    """The digest in the RECORD format: 'sha256=' + urlsafe base64 without padding."""
    return record_form(hashlib.sha256(data).hexdigest())


def record_form(hex_digest: str) -> str:
    """A sha256 hex digest in the RECORD format."""
    import base64

    digest = base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode()
    return f"sha256={digest}"


def discover(packages: list[tuple[str, str]], python: str | None = None,
             site: Path | None = None, allow_user_writable: bool = False) -> Environment:
    """Locate PACKAGES ([(distribution, module)]) without importing them. As root, a PYTHON another
    user could replace is refused unless ALLOW_USER_WRITABLE (interpreter.refuse_user_writable)."""
    if python and site:
        raise PatcherError(ExitCode.USAGE, "--python and --site cannot be used together")
    unique = sorted(set(packages))
    if site is not None and not Path(site).is_dir():
        raise PatcherError(ExitCode.MISSING, f"--site {site} is not a directory",
                           hint="pass the directory pip install --target wrote to, or use --python")
    if python:
        from .interpreter import describe

        described = describe(python, {"packages": unique}, allow_user_writable)
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
    tag, magic = described.get("cache_tag"), described.get("magic")
    return Environment(python=described["python"] if not site else f"site:{state_dir}",
                       state_dir=state_dir / STATE_DIRNAME, packages=found,
                       cache_tag=tag if isinstance(tag, str) else None, magic=magic if isinstance(magic, str) else None,
                       interpreter=python or None, allow_user_writable=allow_user_writable)

"""`verify` and `status` of an applied, unchanged environment, answered from the manifest.

Hand-written beside the engine because importing the engine (dataclasses, the series parser,
packaging, tomllib) costs several times an interpreter's own start. This path reads the manifest
through safeio under the shared lock, finds the packages (envprobe), and checks what the engine
would: every series id applied as recorded at the installed version, the series and patch files
byte-identical to apply's (sha256), every patched file holding what apply wrote, every stored
original the release's file (RECORD), every probe file holding the bytes its recorded result was
computed on. It returns None -- and the engine runs -- on anything else: a mismatch, a journal,
a note to make, a manifest older than the recorded answer, an error of any kind.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from ..errors import PatcherError
from ..fs.fsops import Lock, made_dirs_detail
from ..fs.safeio import MAX_JSON, MAX_OBJECT, SafeDir
from ..target import envprobe

try:  # the interpreter's own sha256: loading OpenSSL (hashlib) costs more than hashing a few files
    from _sha256 import sha256 as _sha256
except ImportError:  # Python >= 3.12 names it _sha2; other interpreters have hashlib only
    try:
        from _sha2 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256

STATE_DIRNAME = ".ernie-patcher"


class _Miss(Exception):
    """Something the fast path does not vouch for: the engine decides."""


def sha256(data: bytes) -> str:
    return _sha256(data).hexdigest()


def _need(condition: object) -> None:
    if not condition:
        raise _Miss


def _digest(value: object) -> str:
    """A sha256 hex digest from the manifest (it names a stored object), else a miss."""
    _need(isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value))
    return value  # type: ignore[return-value]


def _relative(value: object) -> str:
    """A relative path without '..' from the manifest or the answer, else a miss."""
    _need(isinstance(value, str) and value and not value.startswith("/") and "\x00" not in value
          and ".." not in value.split("/"))
    return value  # type: ignore[return-value]


def _read(path: Path) -> bytes | None:
    """A target or patch file (bytes), None when absent; never a FIFO or a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        raise _Miss from None
    try:
        _need(stat.S_ISREG(os.fstat(fd).st_mode))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _builtin_directory() -> Path:
    """As series.builtin_directory."""
    packaged = Path(__file__).parents[1] / "builtin"
    if (packaged / "series.toml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "patches"


def _environment(options: dict, packages: list[tuple[str, str]]) -> tuple[str, Path, dict]:
    """(python as reported, state directory, description) as discovery.discover finds them."""
    python, site = options["python"], options["site"]
    _need(not (python and site))
    if python:
        from ..target.interpreter import describe

        described = describe(python, {"packages": packages})
    else:
        described = envprobe.describe(packages, [str(Path(site).resolve())] if site else None)
    root = Path(site).resolve() if site else Path(described["purelib"])
    return (f"site:{root}" if site else described["python"]), root / STATE_DIRNAME, described


def _package_root(described: dict, name: str, module: str, version: str) -> Path:
    info = described["distributions"].get(name)
    location = described["modules"].get(module)
    _need(info and location and info["version"] == version)
    return Path(location["module_dir"]).parent


def _target(root: Path, module: str, relpath: str) -> Path:
    """As assess.target_path, missing instead of refusing (the engine then says why)."""
    path = root / relpath
    module_dir = (root / module).resolve()
    parent = path.parent.resolve()
    _need((parent == module_dir or module_dir in parent.parents) and not path.is_symlink())
    return path


def _load(state: SafeDir, name: str) -> dict:
    data = state.read(name, MAX_JSON)
    _need(data is not None)
    document = json.loads(data)
    _need(isinstance(document, dict) and document.get("tool") == "ernie-patcher"
          and document.get("schema") in (1, 2))
    return document


def _record_form(hex_digest: str) -> str:
    """As discovery.record_form (base64 would load struct and more)."""
    import binascii

    encoded = binascii.b2a_base64(bytes.fromhex(hex_digest), newline=False).decode()
    return "sha256=" + encoded.translate(str.maketrans("+/", "-_")).rstrip("=")


def _release_rows(record: bytes, register: dict | None, created: set[str], state: SafeDir) -> bytes:
    """The RECORD rows as the release shipped them (without the rows apply appended)."""
    if register is None or sha256(record) != register["after"]:
        return record
    before = _digest(register["before"])
    objects = state.subdir("objects")
    _need(objects is not None)
    with objects:
        original = objects.read(before, MAX_OBJECT)
    _need(original is not None and sha256(original) == register["before"] and record.startswith(original))
    rest = record[len(original):].decode("utf-8", "surrogateescape")
    if original and not original.endswith(b"\n"):
        _need(rest.startswith("\n"))
    rows = {line.split(",")[0] for line in rest.split("\n") if line}
    _need(rows and rows <= created and "\r" not in rest)
    return original


def _check_originals(described: dict, manifest: dict, state: SafeDir) -> None:
    """As originals.check_originals, for a release whose RECORD lists every file apply wrote."""
    by_package: dict[str, list[dict]] = {}
    for entry in manifest["files"].values():
        by_package.setdefault(entry["package"], []).append(entry)
    for name, entries in by_package.items():
        info = described["distributions"].get(name)
        _need(info and info.get("dist_info") and all(e["version"] == info["version"] for e in entries))
        record = _read(Path(info["dist_info"]) / "RECORD")
        _need(record is not None and b'"' not in record)
        register = next((e for e in entries if e["action"] == "register"), None)
        created = {e["relpath"] for e in entries if e["action"] == "create"}
        text = _release_rows(record, register, created, state).decode("utf-8", "surrogateescape")
        _need("\r" not in text.replace("\r\n", "\n"))
        rows = {}
        for line in text.replace("\r\n", "\n").split("\n"):
            if line:
                cells = line.split(",")
                rows[cells[0]] = cells[1] if len(cells) > 1 else ""
        created_dirs = {d for e in entries if e["action"] == "create" for d in e.get("dirs", [])}
        _need(not any(row.startswith(d + "/") for d in created_dirs for row in rows))  # as originals.py
        for entry in entries:
            if entry["action"] == "create":
                _need(entry["relpath"] not in rows)
            elif entry["action"] == "modify":
                before = entry["before"]
                _need(rows.get(entry["relpath"]) == _record_form(_digest(before)))


def _selected(answer: dict, only: list[str]) -> list[str]:
    """Series.select: ONLY plus what they require, in series order (all ids without ONLY)."""
    ids = answer["ids"]
    wanted, pending = set(), list(only)
    while pending:
        patch_id = pending.pop()
        _need(patch_id in ids)
        if patch_id not in wanted:
            wanted.add(patch_id)
            pending.extend(answer["patches"][patch_id]["requires"])
    return [i for i in ids if not only or i in wanted]


def _patch(patch_id: str, recorded: dict, shown: dict, roots: dict, manifest: dict) -> dict:
    """PatchState.to_dict() of a patch applied as recorded."""
    root = roots[shown["package"]]
    files = []
    for relpath in recorded["files"]:
        entry = manifest["files"].get(relpath)
        path = _target(root, shown["module"], _relative(relpath))
        current = _read(path)
        _need(entry and patch_id in entry["patches"] and (sha256(current) if current is not None else None)
              == entry["after"])
        dirs = [_relative(d) for d in entry.get("dirs", [])]
        detail = made_dirs_detail(dirs)
        files.append({"path": str(path), "relpath": relpath, "state": "applied", "detail": detail,
                      "action": "create" if entry["action"] == "create" else "modify", "offsets": []})
    probes = []
    for probe in shown["probes"]:
        memo = recorded["probes"].get(probe["key"])
        source = _read(root / _relative(probe["file"]))
        _need(memo and memo["passed"] is True and source is not None and memo["file_sha256"] == sha256(source))
        probes.append({"file": probe["file"], "kind": probe["kind"], "check": probe["check"], "passed": True,
                       "detail": memo["detail"] + " (file unchanged since apply)"})
    return {"id": patch_id, "package": shown["package"], "installed_version": recorded["version"],
            "versions": shown["tested"], "file": shown["file"],
            "variants": [{"file": f, "versions": v} for f, v in shown["variants"]],
            "state": "applied", "reason": "", "fit": None, "untested": shown["untested"], "manifest_stale": False,
            "strip": shown["strip"], "strip_inferred": False, "files": files, "probes": probes}


def _answer(options: dict) -> dict:
    """The document payload of an applied, unchanged environment (see answer)."""
    patch_dir = Path(options["patches"]) if options["patches"] else _builtin_directory()
    series_bytes = _read(patch_dir / "series.toml")
    _need(series_bytes is not None)
    series_digest = sha256(series_bytes)
    # The packages are known only from the manifest; discovery is asked for the ones it names.
    python, state_dir, described = _environment(options, [])
    _need(os.path.isdir(state_dir) and not os.path.islink(state_dir))
    with Lock(state_dir / "lock", exclusive=False):
        state = SafeDir.open(state_dir)
        _need(state is not None)
        with state:
            _need(not state.exists("journal.json"))
            manifest = _load(state, "manifest.json")
            answer = manifest.get("answer") or {}
            _need(answer.get("series_sha256") == series_digest and answer.get("patch_dir") == str(patch_dir))
            _need(set(manifest["patches"]) == set(answer["ids"]) == set(answer["patches"]))
            packages = sorted({(s["package"], s["module"]) for s in answer["patches"].values()})
            python, state_dir, described = _environment(options, packages)
            roots = {}
            for patch_id, recorded in manifest["patches"].items():
                shown = answer["patches"][patch_id]
                _need(recorded["package"] == shown["package"])
                roots[shown["package"]] = _package_root(described, shown["package"], shown["module"],
                                                        recorded["version"])
                _need("/" not in _relative(shown["file"]))
                _need(sha256(_read(patch_dir / shown["file"]) or b"") == recorded["patch_sha256"])
            _check_originals(described, manifest, state)
            patches = [_patch(i, manifest["patches"][i], answer["patches"][i], roots, manifest)
                       for i in _selected(answer, options["only"])]
    return {"python": python, "state_dir": str(state_dir), "patches": patches, "patch_set": str(patch_dir),
            "manifest_patches": sorted(manifest["patches"])}


def answer(options: dict) -> dict | None:
    """The payload of the report document (jsondoc.document's keys, as render.to_json fills them) of
    `verify`/`status` OPTIONS when the environment is applied and unchanged, else None."""
    if options.get("reparse") or (not options["as_json"] and sys.stdout.isatty()):
        return None  # --reparse parses every file; a terminal gets the rich tables of the engine
    try:
        return _answer(options)
    except (_Miss, PatcherError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None

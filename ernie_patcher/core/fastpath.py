"""`verify` and `status` of an applied, unchanged environment, answered from the manifest.

Hand-written beside the engine because importing the engine (dataclasses, the series parser,
packaging, tomllib) costs several times an interpreter's own start. This path reads the manifest
through safeio under the shared lock, finds the packages (envprobe), and checks what the engine
would: the manifest by the engine's own rules (manifestrules), every series id applied as
recorded at the installed version, the series and patch files byte-identical to apply's (sha256)
and every variant file of the series there, every patched file holding what apply wrote, every
stored original the release's file (RECORD) and there with its digest, every RECORD row apply
added there (revertable), every bytecode file the interpreter could load holding the code of its
source (bytecodecheck), every probe recorded and its file holding the bytes its recorded result was
computed on. It returns None -- and the engine runs, and decides -- on anything else: a
mismatch, a journal, a note to make, a manifest older than the recorded answer, a manifest the
engine refuses, an error of any kind: it never gives another verdict than the engine's.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from ..errors import ExitCode, PatcherError
from ..fs.fsops import Lock, made_dirs_detail
from ..fs.safeio import MAX_JSON, MAX_OBJECT, SafeDir, insecure_path, writable_by_others
from ..target import envprobe
from . import bytecodecheck, revertable
from .manifestrules import manifest_problem

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


def _environment(options: dict, packages: list[tuple[str, str]], bytecode: list[tuple[str, str]] | None = None,
                 known: list[str] | None = None) -> tuple[str, Path, dict]:
    """(python as reported, state directory, description) as discovery.discover finds them; the
    description also holds the bytecode facts of BYTECODE ([module, relpath] pairs), as the target
    interpreter finds them (KNOWN: see envprobe.bytecode_facts)."""
    python, site = options["python"], options["site"]
    _need(not (python and site))
    request = {"packages": packages, "bytecode": bytecode or [], "known": known or []}
    if python:
        from ..target.interpreter import describe

        described = describe(python, request, bool(options.get("allow_user_writable")))
    else:
        described = envprobe.describe(packages, [str(Path(site).resolve())] if site else None, request)
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
    _need(not _others_can_write(root, relpath))
    return path


def _others_can_write(root: Path, relpath: str) -> bool:
    """Whether another user than root (or the one running) can write a directory from ROOT down to
    RELPATH's: the engine then answers, naming it (the pins of safeio)."""
    directory = root
    for part in ["", *relpath.split("/")[:-1]]:
        directory = directory / part if part else directory
        if writable_by_others(os.lstat(directory)):
            return True
    return False


def _load(state: SafeDir, name: str) -> dict:
    """The manifest, when the engine would read it (manifestrules); the engine says why else."""
    data = state.read(name, MAX_JSON)
    _need(data is not None)
    document = json.loads(data)
    _need(manifest_problem(document) is None)
    return document


def _record_form(hex_digest: str) -> str:
    """As discovery.record_form (base64 would load struct and more)."""
    import binascii

    encoded = binascii.b2a_base64(bytes.fromhex(hex_digest), newline=False).decode()
    return "sha256=" + encoded.translate(str.maketrans("+/", "-_")).rstrip("=")


def _rows(text: str) -> dict[str, str | None]:
    """As discovery.parse_record, for a RECORD without quotes or lone carriage returns (nearly all)."""
    text = text.replace("\r\n", "\n")
    _need("\r" not in text and '"' not in text)
    rows: dict[str, str | None] = {}
    for line in text.split("\n"):
        if line:
            cells = line.split(",")
            rows[cells[0]] = cells[1] if len(cells) > 1 and cells[1] else None
    return rows


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


def _module_root(described: dict, entry: dict) -> Path:
    """The import root of ENTRY's package (as state.import_name names its module)."""
    module = entry.get("module") or entry["package"].replace("-", "_")
    location = described["modules"].get(module)
    _need(location)
    return Path(location["module_dir"]).parent


def _registered(described: dict, entries: list[dict], appended: dict[str, str | None], dist_info: str) -> None:
    """As originals.revert_problems: every file apply created and registered in RECORD, while it
    holds what apply wrote, is listed there with its digest. APPENDED: the rows after the release's
    (a created file in the release's rows is refused before)."""
    created = []
    for entry in entries:
        if entry["action"] == "create" and entry["after"] is not None:
            module = entry.get("module") or entry["package"].replace("-", "_")
            current = _read(_target(_module_root(described, entry), module, _relative(entry["relpath"])))
            if current is not None and sha256(current) == entry["after"]:
                created.append((entry["relpath"], _record_form(entry["after"])))
    problems = revertable.registration_problems(str(Path(dist_info) / "RECORD"), entries[0]["package"], appended,
                                                created)
    _need(not problems)


def _check_originals(described: dict, manifest: dict, state: SafeDir) -> None:
    """As originals.check_originals, for a release whose RECORD lists every file apply wrote; and,
    as originals.revert_problems, every RECORD row apply added still there (a RECORD changed since
    apply is the engine's to judge)."""
    by_package: dict[str, list[dict]] = {}
    for entry in manifest["files"].values():
        by_package.setdefault(entry["package"], []).append(entry)
    for name, entries in by_package.items():
        info = described["distributions"].get(name)
        _need(info and info.get("dist_info") and all(e["version"] == info["version"] for e in entries))
        record = _read(Path(info["dist_info"]) / "RECORD")
        _need(record is not None and b'"' not in record)
        register = next((e for e in entries if e["action"] == "register"), None)
        _need(register is None or sha256(record) == register["after"])
        created = {e["relpath"] for e in entries if e["action"] == "create"}
        release = _release_rows(record, register, created, state)
        rows = _rows(release.decode("utf-8", "surrogateescape"))
        created_dirs = {d for e in entries if e["action"] == "create" for d in e.get("dirs", [])}
        _need(not any(row.startswith(d + "/") for d in created_dirs for row in rows))  # as originals.py
        for entry in entries:
            if entry["action"] == "create":
                _need(entry["relpath"] not in rows)
            elif entry["action"] == "modify":
                before = entry["before"]
                _need(rows.get(entry["relpath"]) == _record_form(_digest(before)))
        if register is not None:
            appended = _rows(record[len(release):].decode("utf-8", "surrogateescape"))
            _registered(described, entries, appended, info["dist_info"])


def _check_stored(manifest: dict, state: SafeDir) -> None:
    """As originals.revert_problems: every original revert would restore is stored, with its digest."""
    befores = [(e["relpath"], e["before"]) for e in manifest["files"].values() if e["before"] is not None]
    if not befores:
        return
    objects = state.subdir("objects")
    _need(objects is not None)
    with objects:
        def stored(digest: str) -> str | None:
            data = objects.read(digest, MAX_OBJECT)
            return None if data is None else sha256(data)

        _need(not revertable.original_problems(befores, stored, "objects"))


def _variant_files(shown: dict, patch_dir: Path) -> None:
    """As series.load_series: every variant file of the id is a regular file of the patch set."""
    files = [_relative(file) for file, _ in shown["variants"]]
    _need(shown["file"] in files)
    for file in files:
        _need("/" not in file)
        try:
            _need(stat.S_ISREG(os.stat(patch_dir / file).st_mode))
        except OSError:
            raise _Miss from None


def _bytecode_request(answer: dict, manifest: dict, selected: list[str]) -> list[tuple[str, str]]:
    """[module, relpath] of every Python file of the SELECTED patches, each once."""
    wanted: dict[tuple[str, str], None] = {}
    for patch_id in selected:
        for relpath in manifest["patches"][patch_id]["files"]:
            if relpath.endswith(".py"):
                wanted[(answer["patches"][patch_id]["module"], _relative(relpath))] = None
    return list(wanted)


def _known(answer: dict, request: list[tuple[str, str]]) -> list[str]:
    """The digests of the marshalled code apply wrote for the files of REQUEST: bytecode holding
    exactly that need not be unmarshalled again (envprobe.bytecode_facts)."""
    recorded = answer.get("bytecode")
    entries = [recorded.get(relpath) for _, relpath in request] if isinstance(recorded, dict) else []
    return [e["raw"] for e in entries if isinstance(e, dict) and isinstance(e.get("raw"), str)]


def _check_bytecode(described: dict, request: list[tuple[str, str]], manifest: dict, answer: dict) -> None:
    """As the engine (bytecodecheck.judge): the bytecode the target's interpreter would load for each
    file of REQUEST is that file's code, as recorded at apply; anything else the engine decides."""
    found = described.get("bytecode")
    _need(isinstance(found, list) and len(found) == len(request))
    for facts, (_, relpath) in zip(found, request):
        _need(facts is not None and bytecodecheck.facts_ok({relpath: facts}, [relpath]))
        after = manifest["files"][relpath]["after"]
        reference = bytecodecheck.reference(answer, relpath, after, described.get("magic"))
        try:
            _need(not bytecodecheck.judge(facts, relpath, reference))
        except bytecodecheck.Unproven:
            raise _Miss from None


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


def _file_digest(path: Path, digests: dict[Path, str | None]) -> str | None:
    """sha256 of the file at PATH (None when absent), read once per answer (DIGESTS)."""
    if path not in digests:
        data = _read(path)
        digests[path] = sha256(data) if data is not None else None
    return digests[path]


def _patch(patch_id: str, recorded: dict, shown: dict, roots: dict, manifest: dict,
           digests: dict[Path, str | None]) -> dict:
    """PatchState.to_dict() of a patch applied as recorded."""
    root = roots[shown["package"]]
    files = []
    for relpath in recorded["files"]:
        entry = manifest["files"].get(relpath)
        path = _target(root, shown["module"], _relative(relpath))
        digest = _file_digest(path, digests)
        _need(entry and patch_id in entry["patches"] and digest == entry["after"])
        dirs = [_relative(d) for d in entry.get("dirs", [])]
        detail = made_dirs_detail(dirs)
        files.append({"path": str(path), "relpath": relpath, "state": "applied", "detail": detail,
                      "action": "create" if entry["action"] == "create" else "modify", "offsets": []})
    probes = []
    for probe in shown["probes"]:
        memo = recorded["probes"].get(probe["key"])
        digest = _file_digest(root / _relative(probe["file"]), digests)
        _need(memo and memo["passed"] is True and digest is not None and memo["file_sha256"] == digest)
        probes.append({"file": probe["file"], "kind": probe["kind"], "check": probe["check"], "passed": True,
                       "detail": memo["detail"] + " (file unchanged since apply)"})
    return {"id": patch_id, "package": shown["package"], "installed_version": recorded["version"],
            "versions": shown["tested"], "file": shown["file"],
            "variants": [{"file": f, "versions": v} for f, v in shown["variants"]],
            "state": "applied", "reason": "", "fit": None, "untested": shown["untested"], "manifest_stale": False,
            "strip": shown["strip"], "strip_inferred": shown.get("strip_inferred") is True, "files": files, "probes": probes}


def _answer(options: dict) -> dict:
    """The document payload of an applied, unchanged environment (see answer)."""
    patch_dir = Path(options["patches"]) if options["patches"] else _builtin_directory()
    series_bytes = _read(patch_dir / "series.toml")
    _need(series_bytes is not None)
    series_digest = sha256(series_bytes)
    # The packages are known only from the manifest; discovery is asked for the ones it names.
    python, state_dir, described = _environment(options, [])
    _need(os.path.isdir(state_dir) and not os.path.islink(state_dir))
    _need(not options["site"] or insecure_path(Path(os.path.abspath(options["site"]))) is None)
    with Lock(state_dir / "lock", exclusive=False):
        state = SafeDir.open(state_dir)
        _need(state is not None)
        with state:
            _need(not state.exists("journal.json") and not state.exists("overwritten"))  # the engine notes those
            manifest = _load(state, "manifest.json")
            _need(manifest.get("selected") is None)  # a selection recorded by apply --only: the engine's case
            answer = manifest.get("answer") or {}
            _need(answer.get("series_sha256") == series_digest and answer.get("patch_dir") == str(patch_dir))
            _need(set(manifest["patches"]) == set(answer["ids"]) == set(answer["patches"]))
            packages = sorted({(s["package"], s["module"]) for s in answer["patches"].values()})
            selected = _selected(answer, options["only"])
            request = _bytecode_request(answer, manifest, selected)
            python, state_dir, described = _environment(options, packages, request, _known(answer, request))
            roots = {}
            for patch_id, recorded in manifest["patches"].items():
                shown = answer["patches"][patch_id]
                _need(recorded["package"] == shown["package"])
                roots[shown["package"]] = _package_root(described, shown["package"], shown["module"],
                                                        recorded["version"])
                _need(insecure_path(roots[shown["package"]]) is None)  # the engine names a way others can redirect
                _variant_files(shown, patch_dir)
                _need(sha256(_read(patch_dir / shown["file"]) or b"") == recorded["patch_sha256"])
                _need({probe["key"] for probe in shown["probes"]} == set(recorded["probes"]))
            _check_originals(described, manifest, state)
            _check_stored(manifest, state)
            digests: dict[Path, str | None] = {}
            patches = [_patch(i, manifest["patches"][i], answer["patches"][i], roots, manifest, digests)
                       for i in selected]
            _check_bytecode(described, request, manifest, answer)
    return {"python": python, "state_dir": str(state_dir), "patches": patches, "patch_set": str(patch_dir),
            "manifest_patches": sorted(manifest["patches"])}


def answer(options: dict) -> dict | None:
    """The payload of the report document (jsondoc.document's keys, as render.to_json fills them) of
    `verify`/`status` OPTIONS when the environment is applied and unchanged, else None: then the
    engine decides. Any failure here, malformed input of any depth or size included, is a None;
    only an interruption (SIGINT, SIGTERM) goes on."""
    if options.get("reparse") or (not options["as_json"] and sys.stdout.isatty()):
        return None  # --reparse parses every file; a terminal gets the rich tables of the engine
    try:
        return _answer(options)
    except PatcherError as error:
        if error.code in (ExitCode.INTERRUPTED, ExitCode.TERMINATED):
            raise
        return None
    except Exception:  # the engine reads the same input again and says what is wrong with it
        return None

"""What a readable manifest is: its keys, each record's fields and the value each field may hold.

One rule set for the two readers of a manifest: the engine (state.Manifest.from_json, which
refuses a manifest breaking any rule as a corrupt state file, exit 7) and the fast path
(fastpath.py, which hands such a manifest to the engine). Plain tables and functions on the
decoded JSON, importing nothing but `re`, because the fast path must not load dataclasses or the
engine; tests/engine/test_one_verdict.py checks that the tables are the fields of state.py's
records.
"""
from __future__ import annotations

import re

TOOL = "ernie-patcher"
MANIFEST_READABLE = (1, 2, 3)  # 1: before `dirs`; 2: before `emptied` and `after_mode`
ACTIONS = ("create", "modify", "register")
# Top-level keys from_json reads (any JSON value, kept as its str()); `answer` is optional.
MANIFEST_KEYS = ("series", "patch_dir", "patches", "files", "tool_version", "updated")
MANIFEST_OPTIONAL = ("answer", "selected")  # the answer of the fast path; what apply --only selected
# Each record's fields: (name, kind, required). The kind is the field's annotation in state.py.
PATCH_FIELDS = (("package", "str", True), ("version", "str", True), ("patch_sha256", "str", True),
                ("files", "list[str]", True), ("offsets", "list[int]", True), ("applied_at", "str", True),
                ("probes", "dict[str, dict]", False))
FILE_FIELDS = (("path", "str", True), ("package", "str", True), ("version", "str", True),
               ("relpath", "str", True), ("action", "str", True), ("before", "str | None", True),
               ("after", "str | None", True), ("mode", "int", True), ("patches", "list[str]", False),
               ("module", "str", False), ("dirs", "list[str]", False), ("emptied", "dict[str, int]", False),
               ("after_mode", "int | None", False))
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def field_ok(name: str, kind: object, value: object) -> bool:
    """Whether VALUE fits the annotation KIND; digests must be sha256 hex (they name files)."""
    kind = str(kind)
    if name in ("before", "after", "digest", "written"):
        return value is None or (isinstance(value, str) and bool(DIGEST.match(value)))
    if name == "path":
        return isinstance(value, str) and value.startswith("/") and "\x00" not in value
    if name == "relpath":
        return (isinstance(value, str) and bool(value) and not value.startswith("/") and "\x00" not in value
                and ".." not in value.split("/"))
    if name == "action":
        return value in ACTIONS
    if name == "dirs":
        return isinstance(value, list) and all(field_ok("relpath", str, v) for v in value)
    if name == "emptied":  # directory modes: a set-group-id bit is kept
        return isinstance(value, dict) and all(field_ok("relpath", str, k) and isinstance(v, int)
                                               and not isinstance(v, bool) and 0 <= v <= 0o7777
                                               for k, v in value.items())
    if name == "after_mode":
        return value is None or field_ok("mode", "int", value)
    if name == "probes":
        return isinstance(value, dict) and all(probe_memo_ok(k, v) for k, v in value.items())
    if name == "mode":  # never a set-id or sticky bit
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.startswith("list["):
        item = int if kind == "list[int]" else str
        return isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    return isinstance(value, str)


def probe_memo_ok(key: object, memo: object) -> bool:
    return (isinstance(key, str) and bool(DIGEST.match(key)) and isinstance(memo, dict)
            and set(memo) == {"file_sha256", "passed", "detail"}
            and (memo["file_sha256"] is None or bool(DIGEST.match(str(memo["file_sha256"]))))
            and isinstance(memo["passed"], bool) and isinstance(memo["detail"], str))


def dirs_ok(relpath: str, action: str, dirs: list[str]) -> bool:
    """Directories apply created for a file it created: each below the module directory (the
    first part of RELPATH) and above the file, so revert can never remove anything else."""
    return action == "create" and all(len(d.split("/")) >= 2 and not {"", "."} & set(d.split("/"))
                                      and relpath.startswith(d + "/") for d in dirs)


def emptied_ok(relpath: str, action: str, dirs: list[str], removed: bool) -> bool:
    """Directories a patch empties: each below the module directory and above the file, which is one
    the recorded change REMOVED, so revert can only ever make directories on the way to a file it
    puts back."""
    return removed and action == "modify" and all(
        len(d.split("/")) >= 2 and not {"", "."} & set(d.split("/")) and relpath.startswith(d + "/") for d in dirs)


def record_problem(record: dict, name: str) -> str | None:
    """Why the fields (name -> value) of one record of kind NAME ('PatchRecord' or 'FileRecord')
    break a rule; None when they keep them all."""
    for field, kind, _ in _FIELDS[name]:
        if field in record and not field_ok(field, kind, record[field]):
            return f"field {field!r} of {name} has a bad value {record[field]!r:.60}"
    dirs = record.get("dirs") or []
    if dirs and not dirs_ok(record["relpath"], record["action"], dirs):
        return (f"field 'dirs' of {record['relpath']} names directories that are not between "
                f"its package module and the file: {dirs!r:.80}")
    emptied = record.get("emptied") or {}
    if emptied and not emptied_ok(record["relpath"], record["action"], list(emptied), record.get("after", "") is None):
        return (f"field 'emptied' of {record['relpath']} names directories that are not between "
                f"its package module and the file, or the file is not one removed: {emptied!r:.80}")
    return None


def _shape_problem(records: object, name: str) -> str | None:
    """Why RECORDS (key -> fields) cannot be read as records of kind NAME: not objects, a required
    field missing, a field unknown."""
    if not isinstance(records, dict):
        return f"missing or malformed field ({type(records).__name__} where {name}s are expected)"
    known = {field for field, _, _ in _FIELDS[name]}
    required = {field for field, _, needed in _FIELDS[name] if needed}
    for record in records.values():
        if not isinstance(record, dict):
            return f"missing or malformed field ({name} is a {type(record).__name__})"
        unknown, missing = sorted(set(record) - known), sorted(required - set(record))
        if unknown:
            return f"missing or malformed field ({name} has unknown field(s) {', '.join(unknown)})"
        if missing:
            return f"missing or malformed field ({name} lacks {', '.join(missing)})"
    return None


def manifest_problem(data: object) -> str | None:
    """Why DATA (a decoded manifest.json) is not a manifest this version reads; None when it is."""
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return "not an ernie-patcher manifest"
    if data.get("schema") not in MANIFEST_READABLE:
        readable = ", ".join(map(str, MANIFEST_READABLE))
        return (f"manifest schema {data.get('schema')!r:.20} is not one of {readable} "
                "(written by another ernie-patcher version?)")
    missing = [key for key in MANIFEST_KEYS if key not in data]
    if missing:
        return f"missing or malformed field ({', '.join(missing)} missing)"
    for key, name in (("patches", "PatchRecord"), ("files", "FileRecord")):
        problem = _shape_problem(data[key], name)
        for record in data[key].values() if problem is None else ():
            problem = record_problem(record, name)
            if problem:
                break
        if problem:
            return problem
    if not selection_ok(data.get("selected"), data["patches"]):
        return f"field 'selected' is not null or a list of applied patch ids: {data.get('selected')!r:.80}"
    return None


def selection_ok(selected: object, patches: dict) -> bool:
    """None, or distinct ids of patches the manifest records as applied (what `apply --only` selected)."""
    return selected is None or (isinstance(selected, list) and all(isinstance(i, str) and i in patches for i in selected)
                                and len(set(selected)) == len(selected))


_FIELDS = {"PatchRecord": PATCH_FIELDS, "FileRecord": FILE_FIELDS}

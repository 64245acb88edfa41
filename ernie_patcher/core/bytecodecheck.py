"""Whether the bytecode the target's interpreter would load for a patched or created file is that
file's code: what `verify` proves beside the file's digest.

A .py file holding exactly what apply wrote proves nothing when its __pycache__ holds bytecode of
other code that the interpreter loads instead: unchecked-hash bytecode is never compared with its
source, checked-hash bytecode is not when hash checks are off, and timestamp bytecode only by
mtime and size, which a copy, a restore or a hand can give any file. So every bytecode file the
interpreter could load (envprobe.bytecode_facts, computed by that interpreter: its cache tag, its
magic number, its source hash) must be absent, ignored by it (another interpreter's, a stale
timestamp), or hold the code compiled from the current source: proven by the digest of that code
apply recorded (the fast path and the engine alike), or by compiling the source (the engine:
without a recorded digest, or with --reparse).

One rule set for the fast path and the engine: both call `judge`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode, PatcherError
from ..target import envprobe

if TYPE_CHECKING:
    from ..target.discovery import Environment

VERDICTS = ("loads", "stale", "broken", "irregular", "unreadable")
MODES = (None, "timestamp", "unchecked-hash", "checked-hash")


class Unproven(Exception):
    """A loadable bytecode file whose code no recorded digest vouches for: compile the source to decide."""


def judge(facts: list[dict], source: str, reference: dict | None) -> list[str]:
    """Why each bytecode file of FACTS (for SOURCE) is not SOURCE's code, one line each; empty when
    every one is. REFERENCE: the digests of SOURCE's code recorded at apply (optimisation level 0;
    'raw': of the marshalled code apply wrote, 'code': of the code itself), None when there are
    none for this interpreter. Raises Unproven for a loadable file neither REFERENCE nor a
    comparison (fact['same']) decides."""
    problems = []
    name = source.rpartition("/")[2]
    for fact in facts:
        pyc, mode = fact["pyc"], fact["mode"]
        verdict = fact["verdict"]
        if verdict == "loads":
            if fact["same"] is None and fact["level"] == 0 and _recorded(fact, reference):
                continue
            if fact["same"] is None:
                raise Unproven(pyc)
            if not fact["same"]:
                how = "mtime and size" if mode == "timestamp" else "hash"
                problems.append(f"{pyc} ({mode}) matches {name} by {how} but holds other code: "
                                "the interpreter runs it instead of the file")
        elif verdict == "stale":
            when = "" if mode == "unchecked-hash" else " whenever hash checks are off"
            problems.append(f"{pyc} is {mode} bytecode of other source: the interpreter runs it instead of "
                            f"{name}{when}")
        elif verdict == "broken":
            problems.append(f"{pyc} matches {name} but {fact['why']}: importing the module fails")
        else:
            problems.append(f"{pyc} is {fact['why']}: the interpreter would read it in place of compiling {name}")
    return problems


def _recorded(fact: dict, reference: dict | None) -> bool:
    """Whether loadable FACT holds the code REFERENCE records (byte for byte, or its code object)."""
    return reference is not None and (fact["raw"] == reference["raw"]
                                      or (fact["code"] is not None and fact["code"] == reference["code"]))


def remedy(problems: list[str]) -> str:
    """PROBLEMS of one file as a state detail, with what to do."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; remove it (`ernie-patch revert`, then `apply`, also write fresh bytecode)"


def facts_ok(facts: object, sources: list[str]) -> bool:
    """Whether FACTS (as another interpreter printed them) have the shape bytecode_facts gives."""
    if not isinstance(facts, dict) or not all(isinstance(facts.get(s), list) for s in sources):
        return False
    keys = {"pyc", "level", "mode", "verdict", "raw", "code", "same", "why"}
    return all(isinstance(f, dict) and set(f) == keys and isinstance(f["pyc"], str) and f["level"] in (0, 1, 2)
               and f["mode"] in MODES and f["verdict"] in VERDICTS and isinstance(f["why"], str)
               and all(f[k] is None or isinstance(f[k], str) for k in ("raw", "code"))
               and f["same"] in (None, True, False) for s in sources for f in facts[s])


def reference(answer: dict, relpath: str, after: str | None, magic: str | None) -> dict | None:
    """The digests of RELPATH's code recorded at apply (in the manifest's answer: 'raw' and 'code',
    see judge) when it was compiled from the bytes AFTER by an interpreter of MAGIC; None else."""
    recorded = answer.get("bytecode") if isinstance(answer, dict) else None
    entry = recorded.get(relpath) if isinstance(recorded, dict) else None
    if not isinstance(entry, dict) or after is None or entry.get("after") != after or entry.get("magic") != magic:
        return None
    if not all(isinstance(entry.get(k), str) for k in ("raw", "code")):
        return None
    return {"raw": entry["raw"], "code": entry["code"]}


def code_record(code: bytes) -> tuple[str, str]:
    """The digests verify compares bytecode with, of marshalled CODE: of the raw bytes, and of the code
    object without its file name (so bytecode the interpreter or compileall wrote also matches)."""
    import marshal

    return envprobe.sha256_hex(code), envprobe.code_digest(marshal.loads(code))


def record(previous: dict, files: dict[str, str | None], compiled: dict[str, tuple[str, str]], magic: str) -> dict:
    """The answer's 'bytecode' record after apply: for each file of FILES (relpath -> after digest)
    compiled by this run (COMPILED: relpath -> code_record of interpreter MAGIC's code), the digests
    of its code; the earlier record kept for the others while their bytes are the same."""
    kept = previous.get("bytecode") if isinstance(previous.get("bytecode"), dict) else {}
    result = {relpath: entry for relpath, entry in kept.items()
              if relpath in files and isinstance(entry, dict) and entry.get("after") == files[relpath]}
    for relpath, (raw, code) in compiled.items():
        if relpath in files and files[relpath] is not None:
            result[relpath] = {"after": files[relpath], "magic": magic, "raw": raw, "code": code}
    return result


def facts_for(env: Environment, files: list[tuple[str, str, str, Path]], compared: bool,
              known: list[str]) -> list[list[dict]]:
    """envprobe.bytecode_facts of FILES ((distribution, module, relpath, path)), as ENV's interpreter
    sees them: computed here when it is this interpreter (its magic number and cache tag), else by
    it (--python another Python: its source hash and marshal format are its own). KNOWN: see
    envprobe.bytecode_facts."""
    import sys
    from importlib.util import MAGIC_NUMBER

    if env.interpreter is None or (env.magic, env.cache_tag) == (MAGIC_NUMBER.hex(), sys.implementation.cache_tag):
        found = envprobe.bytecode_facts([str(path) for *_, path in files], compared, known)
        return [found[str(path)] for *_, path in files]
    from ..target.interpreter import describe

    request = {"packages": sorted({(dist, module) for dist, module, _, _ in files}),
               "bytecode": [[module, relpath] for _, module, relpath, _ in files], "compared": compared,
               "known": known}
    answer = describe(env.interpreter, request, env.allow_user_writable).get("bytecode")
    if not (isinstance(answer, list) and len(answer) == len(files)
            and all(facts_ok({"f": f}, ["f"]) for f in answer)):
        raise PatcherError(ExitCode.ENVIRONMENT, f"interpreter {env.interpreter} did not describe the bytecode "
                           "it would load for the patched files", hint="run it again; is it the interpreter the "
                           "patches were applied for?")
    return answer

"""`verify` proves the code that will run and that revert can still run: bytecode the interpreter
would load instead of a patched file, a stored original gone, a RECORD row apply added gone are
each reported, naming the file, through the entry point users run."""
from __future__ import annotations

import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import DISPATCH, OMNI_DIR, ROOT, TRANSFORMER, cli, run
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target, wheel

STATE = ".ernie-patcher"
CREATED = f"{OMNI_DIR}/ulysses_attention.py"
HAND_EDIT = "\nERNIE_HAND_EDIT = 1\n"
# Loads each file as the import system does (its bytecode when valid) and prints the names its code defines.
LOADED_NAMES = ("import sys, importlib.machinery as m\n"
                "print([sorted(m.SourceFileLoader('checked', p).get_code('checked').co_names) for p in sys.argv[1:]])\n")


def loaded_names(*sources: Path, python: str = sys.executable) -> list[list[str]]:
    done = subprocess.run([python, "-B", "-c", LOADED_NAMES, *map(str, sources)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.replace("'", '"'))


RUNS_ITS_SOURCE = ("import sys, importlib.machinery as m\n"
                   "print(all(m.SourceFileLoader('checked', p).get_code('checked') == "
                   "compile(open(p, 'rb').read(), p, 'exec', dont_inherit=True) for p in sys.argv[1:]))\n")


def runs_its_source(*sources: Path) -> bool:
    """Whether the import system runs each file's own code (its bytecode, when it loads one, included)."""
    done = subprocess.run([sys.executable, "-B", "-c", RUNS_ITS_SOURCE, *map(str, sources)], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip() == "True"


def flags_of(pyc: Path) -> int:
    header = pyc.read_bytes()[:16]
    assert header[:4] == importlib.util.MAGIC_NUMBER
    return int.from_bytes(header[4:8], "little")


def test_a_checked_hash_release_gets_checked_hash_bytecode_so_a_later_hand_edit_runs(site: Path):
    """A release compiled in checked-hash mode (SOURCE_DATE_EPOCH builds): apply's fresh bytecode must
    be checked-hash too, so that the interpreter compares it with the source and a later hand edit
    of the file is what runs (and what verify reports), not apply's code."""
    target = site / DISPATCH
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "checked-hash", str(target)],
                   check=True)
    assert run("apply", "--site", site).code == 0
    pyc = Path(importlib.util.cache_from_source(str(target)))
    assert flags_of(pyc) == 0b11, "apply wrote bytecode in another mode than the release's checked-hash"
    assert pyc.read_bytes()[8:16] == importlib.util.source_hash(target.read_bytes())
    assert run("verify", "--site", site).code == 0
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(HAND_EDIT)
    assert "ERNIE_HAND_EDIT" in loaded_names(target)[0], "the interpreter ran apply's bytecode over the edited file"
    assert run("verify", "--site", site).code == 6


def plant(site: Path, mode: str) -> Path:
    """Bytecode of the release's attention_dispatch planted for the patched file: unchecked-hash, or
    timestamp with the patched file's mtime and size. Either way the interpreter loads it."""
    target = site / DISPATCH
    original = (site / STATE / "objects" / json.loads((site / STATE / "manifest.json").read_text())
                ["files"][DISPATCH]["before"]).read_bytes()
    if mode == "unchecked-hash":
        header = importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + importlib.util.source_hash(original)
    else:
        found = target.stat()
        header = (importlib.util.MAGIC_NUMBER + bytes(4) + (int(found.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                  + (found.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    pyc = Path(importlib.util.cache_from_source(str(target)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header + marshal.dumps(compile(original, str(target), "exec", dont_inherit=True)))
    assert "is_supported_laser_attention" not in loaded_names(target)[0], "the planted bytecode is not what runs"
    return pyc


@pytest.mark.parametrize("mode", ["unchecked-hash", "timestamp"])
def test_verify_names_bytecode_the_interpreter_would_run_instead_and_revert_then_apply_clears_it(site: Path,
                                                                                                  mode: str):
    assert run("apply", "--site", site).code == 0
    pyc = plant(site, mode)
    for args in (("verify",), ("verify", "-q"), ("verify", "--reparse")):
        done = run(*args, "--site", site)
        assert done.code == 6, (args, done.stdout, done.stderr)
        assert done.reason.startswith("error: verify failed: diffusers-attention: ") and str(pyc) in done.reason
    status = run("status", "--json", "--site", site)
    assert status.code == 0 and [p["state"] for p in status.json()["patches"]][1] == "drifted"
    assert run("apply", "--site", site).code == 6, "apply over bytecode it did not write must refuse"
    assert not runs_its_source(site / DISPATCH)
    assert run("revert", "--site", site).code == 0
    assert runs_its_source(site / DISPATCH), "revert left bytecode of other code than the file it restored"
    assert run("apply", "--site", site).code == 0
    assert run("verify", "--site", site).code == 0
    assert runs_its_source(site / DISPATCH)


def test_verify_names_a_missing_stored_original_and_a_missing_record_row(site: Path):
    """Revert needs every stored original; `pip uninstall` needs the RECORD row of each created file.
    verify exits 7 naming the one missing; status notes it; both paths say the same."""
    assert run("apply", "--site", site).code == 0
    manifest = json.loads((site / STATE / "manifest.json").read_text())
    stored = site / STATE / "objects" / manifest["files"][TRANSFORMER]["before"]
    kept = stored.read_bytes()
    stored.unlink()
    for args in (("verify",), ("verify", "--reparse")):
        done = run(*args, "--site", site)
        assert done.code == 7 and done.reason == (f"error: the stored original of {TRANSFORMER} ({stored}) is missing: "
                                                  "revert could not restore the file"), done.reason
    status = run("status", "--site", site)
    assert status.code == 0 and f"note: the stored original of {TRANSFORMER}" in status.stdout
    stored.write_bytes(kept)
    record = site / "vllm_omni-0.20.0.dist-info" / "RECORD"
    rows = record.read_bytes().splitlines(True)
    record.write_bytes(b"".join(r for r in rows if not r.startswith(CREATED.encode() + b",")))
    for args in (("verify", "--json"), ("verify", "--json", "--reparse")):
        done = run(*args, "--site", site)
        error = done.json()["error"]
        assert done.code == 7 and error["kind"] == "environment"
        assert error["reason"] == (f"{record} no longer lists {CREATED}, which apply created and registered: "
                                   "`pip uninstall vllm-omni` would leave it behind")
    record.write_bytes(b"".join(rows))
    assert run("verify", "--site", site).code == 0


def _other_python() -> str | None:
    """An interpreter of another Python version (another bytecode magic and source hash): on the
    PATH, or one pyenv installed."""
    names = [f"python3.{minor}" for minor in (12, 13, 10, 9)]
    candidates = [shutil.which(name) for name in names]
    candidates += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.*/bin/python3"))
    for found in filter(None, candidates):
        done = subprocess.run([found, "-c", "import sys; sys.exit(sys.version_info[:2] in ((3, 8), %r))"
                               % (sys.version_info[:2],)], capture_output=True)
        if done.returncode == 0:
            return found
    return None


def test_another_interpreters_bytecode_is_judged_by_that_interpreter(tmp_path: Path):
    """--python a venv of another Python: its bytecode has its own cache tag, magic and source hash.
    What it writes when importing the patched files is its code (verify 0); bytecode of the release
    planted for it in unchecked-hash mode is named (verify 6), by the fast path and the engine."""
    other = _other_python()
    if other is None:
        pytest.skip("no interpreter of another Python version here")
    venv = tmp_path / "venv"
    subprocess.run([other, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
                    str(wheel(*DIFFUSERS)), str(wheel(*VLLM_OMNI))], check=True)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert run("apply", "--python", python).code == 0
    target = site / DISPATCH
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([python, "-c", "import sys, importlib.machinery as m\n"
                    "m.SourceFileLoader('checked', sys.argv[1]).get_code('checked')", str(target)], check=True, env=env)
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"], capture_output=True,
                         text=True, check=True).stdout.strip()
    pyc = target.parent / "__pycache__" / f"attention_dispatch.{tag}.pyc"
    assert pyc.exists() and tag != sys.implementation.cache_tag
    for args in (("verify",), ("verify", "--reparse")):
        done = run(*args, "--python", python)
        assert done.code == 0, (args, done.stdout, done.stderr)
    stale = ("import sys, marshal, importlib.util as u\n"
             "original = open(sys.argv[2], 'rb').read()\n"
             "code = marshal.dumps(compile(original, sys.argv[1], 'exec', dont_inherit=True))\n"
             "open(sys.argv[3], 'wb').write(u.MAGIC_NUMBER + (1).to_bytes(4, 'little') + u.source_hash(original) + code)\n")
    manifest = json.loads((site / STATE / "manifest.json").read_text())
    original = site / STATE / "objects" / manifest["files"][DISPATCH]["before"]
    subprocess.run([python, "-c", stale, str(target), str(original), str(pyc)], check=True)
    for args in (("verify",), ("verify", "--reparse")):
        done = run(*args, "--python", python)
        assert done.code == 6 and str(pyc) in done.reason, (args, done.stdout, done.stderr)
    assert run("revert", "--python", python).code == 0
    assert not pyc.exists()
    assert cli("status", "--python", python).code == 0

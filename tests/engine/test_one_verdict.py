"""One verdict: the fast path (`ernie-patch verify` as users run it, answered from the manifest) and
the engine (`verify --reparse`, every file and probe evaluated again) give the same exit code and
the same patch states for every perturbation of an applied environment: a damaged patch set, a
hand-edited or malformed manifest, a recorded answer that no longer covers the probes, bytecode
the interpreter would load instead of the patched file, a stored original or a RECORD row revert
and `pip uninstall` need. Each row also names the verdict both must give."""
from __future__ import annotations

import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from support.cli import DISPATCH, OMNI_DIR, OMNI_PIPELINE, ROOT, TRANSFORMER, environ
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target

STATE = ".ernie-patcher"
PROBED_ONLY = "diffusers/models/embeddings.py"  # probed by diffusers-rope, patched by no patch
CREATED = f"{OMNI_DIR}/ulysses_attention.py"
OMNI_RECORD = "vllm_omni-0.20.0.dist-info/RECORD"
UNCHOSEN = "diffusers_attention_dispatch.v0_41.patch"  # the 0.41+ variant; 0.38.0 is installed
CHOSEN = "diffusers_attention_dispatch.patch"
# `ernie-patch ARGS` through the entry point users run (cli.quick.main, as the console script and
# `python -m ernie_patcher`); stderr's last line says whether the engine ran.
QUICK = ("import sys, atexit\n"
         "atexit.register(lambda: sys.stderr.write('\\nENGINE=%d\\n' % ('ernie_patcher.core.engine' in sys.modules)))\n"
         "from ernie_patcher.cli.quick import main\n"
         "sys.argv = ['ernie-patch'] + sys.argv[1:]\n"
         "main()\n")


@dataclass
class Verdict:
    code: int
    states: list[tuple[str, str]]
    error: str | None
    engine: bool
    stderr: str
    reason: str


def verdict(*args: str | Path) -> Verdict:
    done = subprocess.run([sys.executable, "-c", QUICK, *map(str, args), "--json"], capture_output=True, text=True,
                          env=environ({"PYTHONDONTWRITEBYTECODE": "1"}), cwd=ROOT, timeout=300)
    document = json.loads(done.stdout)
    assert document["exit_code"] == done.returncode, done.stdout
    error = document["error"]["kind"] if document["error"] else None
    return Verdict(done.returncode, [(p["id"], p["state"]) for p in document["patches"]], error,
                   "ENGINE=1" in done.stderr, done.stderr, document["error"]["reason"] if error else "")


@dataclass
class World:
    """A site applied with a copy of the built-in set, with one probe more (on a file no patch
    changes) and one patch without probes (omni-latent-sync: its file is checked by digest alone)."""

    template: Path
    patches: Path
    release: dict[str, bytes]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("verdict")
    patches = root / "set"
    shutil.copytree(ROOT / "patches", patches)
    series = (patches / "series.toml").read_text(encoding="utf-8")
    probe = (f'[[patch.probe]]\nfile = "{PROBED_ONLY}"\nkind = "function"\nname = "get_timestep_embedding"\n\n'
             '[[patch]]\nid = "diffusers-attention"')
    series = series.replace('[[patch]]\nid = "diffusers-attention"', probe, 1)
    start = series.index('id = "omni-latent-sync"')
    probes, end = series.index("[[patch.probe]]", start), series.index("[[patch]]", start)
    (patches / "series.toml").write_text(series[:probes] + series[end:], encoding="utf-8")
    template = install_target(root / "template", DIFFUSERS, VLLM_OMNI)
    release = {relpath: (template / relpath).read_bytes() for relpath in (DISPATCH, TRANSFORMER)}
    done = subprocess.run([sys.executable, "-m", "ernie_patcher", "apply", "--site", template, "--patches", patches],
                          capture_output=True, text=True, env=environ(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return World(template, patches, release)


Perturb = Callable[[Path, World], None]


def edit_manifest(change: Callable[[dict], None]) -> Perturb:
    def perturb(site: Path, world: World) -> None:
        path = site / STATE / "manifest.json"
        document = json.loads(path.read_text())
        change(document)
        path.write_text(json.dumps(document))
    return perturb


def file_entry(document: dict, action: str = "modify") -> dict:
    return next(e for e in document["files"].values() if e["action"] == action)


def patch_record(document: dict, patch_id: str = "diffusers-rope") -> dict:
    return document["patches"][patch_id]


def nested(site: Path, world: World) -> None:
    depth = 100_000
    (site / STATE / "manifest.json").write_text('{"tool": "ernie-patcher", "schema": 2, "answer": '
                                                + "[" * depth + "]" * depth + "}")


def break_probed_only(site: Path, world: World) -> None:
    path = site / PROBED_ONLY
    path.write_text(path.read_text().replace("def get_timestep_embedding(", "def get_timestep_embedding_gone(", 1))


def no_answer_probes(site: Path, world: World) -> None:
    edit_manifest(lambda d: d["answer"]["patches"]["diffusers-rope"].update(probes=[]))(site, world)
    break_probed_only(site, world)


def forged_original(site: Path, world: World) -> None:
    """A modify entry naming another stored original (stored, so only RECORD can tell)."""
    other = b"# not the release's file\n"
    digest = store(site, other)
    edit_manifest(lambda d: d["files"][DISPATCH].update(before=digest))(site, world)


def forged_record_original(site: Path, world: World) -> None:
    """The RECORD entry's stored original replaced by the release RECORD without one of its rows
    (stored under its own digest; RECORD itself intact): revert would write back a RECORD missing
    a row of the release."""
    document = json.loads((site / STATE / "manifest.json").read_text())
    register = file_entry(document, "register")
    lines = (site / STATE / "objects" / register["before"]).read_bytes().splitlines(True)
    register["before"] = store(site, b"".join(lines[:3] + lines[4:]))
    (site / STATE / "manifest.json").write_text(json.dumps(document))


def store(site: Path, data: bytes) -> str:
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (site / STATE / "objects" / digest).write_bytes(data)
    return digest


def patch_set(change: Callable[[Path], None]) -> Perturb:
    """A change to the shared patch set; put back after the row (restore_patch_set)."""
    def perturb(site: Path, world: World) -> None:
        change(world.patches)
    return perturb


def variant_a_directory(patches: Path) -> None:
    (patches / UNCHOSEN).unlink()
    (patches / UNCHOSEN).mkdir()


def hand_edit(site: Path, world: World, relpath: str = DISPATCH) -> None:
    with open(site / relpath, "a", encoding="utf-8") as handle:
        handle.write("# edited by hand\n")


def other_version(site: Path, world: World) -> None:
    metadata = site / "diffusers-0.38.0.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.38.0", "Version: 0.38.1", 1))


# -- bytecode -----------------------------------------------------------------------------------

def pyc_of(site: Path, relpath: str, level: int = 0) -> Path:
    return Path(importlib.util.cache_from_source(str(site / relpath), optimization=level or ""))


def release_pyc(mode: str, level: int = 0) -> Perturb:
    """Bytecode of the release's code planted for the patched file: hash-based with the release's
    source hash, or timestamp with the patched file's mtime and size (the interpreter loads it)."""
    def perturb(site: Path, world: World) -> None:
        source = site / DISPATCH
        code = marshal.dumps(compile(world.release[DISPATCH], str(source), "exec", dont_inherit=True, optimize=level))
        pyc = pyc_of(site, DISPATCH, level)
        pyc.parent.mkdir(exist_ok=True)
        pyc.write_bytes(header(mode, source, world.release[DISPATCH]) + code)
    return perturb


def header(mode: str, source: Path, hashed: bytes) -> bytes:
    flags = {"timestamp": 0, "unchecked-hash": 1, "checked-hash": 3}[mode]
    head = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little")
    if flags:
        return head + importlib.util.source_hash(hashed)
    found = source.stat()
    return head + (int(found.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (found.st_size & 0xFFFFFFFF).to_bytes(4, "little")


def compiled(mode: str) -> Perturb:
    """What `python -m compileall` writes for every patched and created file: their own code."""
    def perturb(site: Path, world: World) -> None:
        files = [site / DISPATCH, site / TRANSFORMER, site / CREATED]
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-f", "--invalidation-mode", mode, *map(str, files)],
                       check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    return perturb


def imported(site: Path, world: World) -> None:
    """Bytecode the interpreter itself writes when it loads the patched modules (its marshalling)."""
    loader = ("import sys, importlib.machinery as m\n"
              "for path in sys.argv[1:]:\n"
              "    m.SourceFileLoader('checked', path).get_code('checked')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", loader, str(site / DISPATCH), str(site / CREATED)], check=True, env=env)
    assert pyc_of(site, DISPATCH).exists()


def irregular_pyc(kind: str) -> Perturb:
    def perturb(site: Path, world: World) -> None:
        pyc = pyc_of(site, DISPATCH)
        pyc.parent.mkdir(exist_ok=True)
        if kind == "symlink":
            release_pyc("unchecked-hash")(site, world)
            pyc.rename(pyc.with_suffix(".planted"))
            pyc.symlink_to(pyc.with_suffix(".planted").name)
        else:
            os.mkfifo(pyc)
    return perturb


def broken_pyc(site: Path, world: World) -> None:
    pyc = pyc_of(site, DISPATCH)
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header("unchecked-hash", site / DISPATCH, (site / DISPATCH).read_bytes()) + b"\x00garbage")


# -- what revert needs ----------------------------------------------------------------------------

def record_row(change: Callable[[list[bytes]], list[bytes]]) -> Perturb:
    def perturb(site: Path, world: World) -> None:
        path = site / OMNI_RECORD  # rows end in CRLF, the one apply added in LF: kept as they are
        path.write_bytes(b"".join(change(path.read_bytes().splitlines(True))))
    return perturb


def without_created_row(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if not line.startswith(CREATED.encode() + b",")]


def created_row_other_digest(lines: list[bytes]) -> list[bytes]:
    empty = b"sha256=47DEQpj8HBSa-_TImW-5JEeuQeRkm5NMpJWZG3hSuFU"
    return [CREATED.encode() + b"," + empty + b",0\n" if line.startswith(CREATED.encode() + b",") else line
            for line in lines]


def stored_original(damage: str) -> Perturb:
    def perturb(site: Path, world: World) -> None:
        document = json.loads((site / STATE / "manifest.json").read_text())
        stored = site / STATE / "objects" / document["files"][DISPATCH]["before"]
        if damage == "removed":
            stored.unlink()
        else:
            stored.chmod(0o644)
            stored.write_bytes(stored.read_bytes() + b"# tampered\n")
    return perturb


def nothing(site: Path, world: World) -> None:
    pass


ROWS: dict[str, tuple[Perturb, int]] = {
    "applied as recorded": (nothing, 0),
    # the patch set
    "unchosen variant file deleted": (patch_set(lambda p: (p / UNCHOSEN).unlink()), 2),
    "unchosen variant file a directory": (patch_set(variant_a_directory), 2),
    "chosen patch file edited": (patch_set(lambda p: (p / CHOSEN).write_text((p / CHOSEN).read_text() + "\n")), 6),
    "series file changed in a comment": (patch_set(lambda p: (p / "series.toml").write_text(
        (p / "series.toml").read_text() + "\n# a comment\n")), 0),
    # the manifest, edited by hand
    "mode a string": (edit_manifest(lambda d: file_entry(d).update(mode="0644")), 7),
    "unknown key in a file entry": (edit_manifest(lambda d: file_entry(d).update(owner="root")), 7),
    "dirs on a modify entry": (edit_manifest(lambda d: file_entry(d).update(dirs=["diffusers/models"])), 7),
    "tool_version removed": (edit_manifest(lambda d: d.pop("tool_version")), 7),
    "updated removed": (edit_manifest(lambda d: d.pop("updated")), 7),
    "offsets strings": (edit_manifest(lambda d: patch_record(d).update(offsets=["0", "0"])), 7),
    "relative path": (edit_manifest(lambda d: file_entry(d).update(path=DISPATCH)), 7),
    "extra key in a probe record": (edit_manifest(lambda d: next(iter(patch_record(d)["probes"].values())).update(
        seen="yes")), 7),
    "files a list": (edit_manifest(lambda d: d.update(files=[])), 7),
    "future schema": (edit_manifest(lambda d: d.update(schema=99)), 7),
    "manifest nested 100 000 deep": (nested, 7),
    "stored original of another file (RECORD disagrees)": (forged_original, 7),
    "RECORD original without a release row": (forged_record_original, 7),
    # the recorded answer and the probes
    "answer lists no probes, probed-only file broken": (no_answer_probes, 1),
    "probed-only file broken": (break_probed_only, 1),
    "answer lists no probes": (edit_manifest(lambda d: d["answer"]["patches"]["diffusers-rope"].update(probes=[])), 0),
    # the environment
    "patched file edited by hand": (hand_edit, 6),
    "patched file without probes edited by hand": (lambda site, world: hand_edit(site, world, OMNI_PIPELINE), 6),
    "patch record of another version": (edit_manifest(lambda d: patch_record(d).update(version="0.37.0")), 1),
    "created file removed": (lambda site, world: (site / CREATED).unlink(), 1),
    "installed version changed": (other_version, 1),
    # bytecode the interpreter would load
    "release code as unchecked-hash bytecode": (release_pyc("unchecked-hash"), 6),
    "release code as timestamp bytecode with the patched file's mtime and size": (release_pyc("timestamp"), 6),
    "release code as checked-hash bytecode": (release_pyc("checked-hash"), 6),
    "release code as optimised (opt-1) unchecked-hash bytecode": (release_pyc("unchecked-hash", 1), 6),
    "a symlink as the bytecode": (irregular_pyc("symlink"), 6),
    "a FIFO as the bytecode": (irregular_pyc("fifo"), 6),
    "bytecode holding no code": (broken_pyc, 6),
    "fresh timestamp bytecode (compileall)": (compiled("timestamp"), 0),
    "fresh unchecked-hash bytecode (compileall)": (compiled("unchecked-hash"), 0),
    "fresh bytecode the interpreter wrote on import": (imported, 0),
    # what revert and pip uninstall need
    "RECORD row of the created file removed": (record_row(without_created_row), 7),
    "RECORD row of the created file with another digest": (record_row(created_row_other_digest), 7),
    "stored original removed": (stored_original("removed"), 7),
    "stored original damaged": (stored_original("damaged"), 7),
}
# Rows where the fast path must answer by itself (no engine): what it vouches for stays fast.
FAST = {"applied as recorded", "fresh timestamp bytecode (compileall)", "fresh unchecked-hash bytecode (compileall)",
        "fresh bytecode the interpreter wrote on import"}


@pytest.fixture
def restore_patch_set(world: World):
    saved = {p.name: p.read_bytes() for p in world.patches.iterdir()}
    yield
    for path in world.patches.iterdir():
        if path.is_dir():
            path.rmdir()
        elif path.name not in saved:
            path.unlink()
    for name, data in saved.items():
        (world.patches / name).write_bytes(data)


# What a row may change in place; every other file of the copied site is a hard link to the template.
CHANGED = (DISPATCH, TRANSFORMER, OMNI_PIPELINE, CREATED, OMNI_RECORD, PROBED_ONLY, "diffusers-0.38.0.dist-info/METADATA")


def fresh_site(template: Path, site: Path) -> Path:
    """A copy of the applied TEMPLATE, cheap: hard links, except the state directory and CHANGED."""
    shutil.copytree(template, site, symlinks=True, copy_function=os.link, ignore=shutil.ignore_patterns(STATE))
    shutil.copytree(template / STATE, site / STATE)
    for relpath in CHANGED:
        (site / relpath).unlink()
        shutil.copy2(template / relpath, site / relpath)
    return site


@pytest.mark.parametrize("row", list(ROWS))
def test_fast_path_and_engine_give_one_verdict(world: World, tmp_path: Path, row: str, restore_patch_set):
    site = fresh_site(world.template, tmp_path / "site")
    perturb, expected = ROWS[row]
    perturb(site, world)
    fast = verdict("verify", "--site", site, "--patches", world.patches)
    engine = verdict("verify", "--reparse", "--site", site, "--patches", world.patches)
    assert engine.engine, "--reparse must run the engine"
    assert (fast.code, fast.states, fast.error) == (engine.code, engine.states, engine.error), \
        f"{row}: fast path {fast} / engine {engine}"
    assert fast.code == expected, f"{row}: both say exit {fast.code}, expected {expected}: {fast.stderr}"
    if row in FAST:
        assert not fast.engine, f"{row}: the fast path handed an environment it vouches for to the engine"
    assert "Traceback" not in fast.stderr + engine.stderr


def test_a_run_holding_the_lock_is_waited_for_by_neither_path(world: World, tmp_path: Path):
    """An apply stopped after removing its journal still holds the exclusive lock: both paths refuse
    (exit 7) instead of reading the state while it writes."""
    from support.cli import command

    site = fresh_site(world.template, tmp_path / "site")
    assert verdict("revert", "--site", site).code == 0
    held = subprocess.Popen(command("apply", "--site", site, "--patches", world.patches), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=environ({"ERNIE_PATCHER_TEST_PAUSE_AT": "journal-removed"}))
    try:
        _, status = os.waitpid(held.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "apply did not stop at its checkpoint"
        assert not (site / STATE / "journal.json").exists()
        fast = verdict("verify", "--site", site, "--patches", world.patches)
        engine = verdict("verify", "--reparse", "--site", site, "--patches", world.patches)
        assert (fast.code, fast.error) == (engine.code, engine.error) == (7, "environment")
        assert "holds the lock" in fast.reason
    finally:
        held.kill()
        held.wait()


def test_verify_quiet_exits_with_the_engines_code_when_the_engine_answers(world: World, tmp_path: Path):
    """`verify -q` (a build step, a HEALTHCHECK) of a hand-edited file: the quick entry point hands
    it to the engine, which prints one line and exits 6, as the click CLI does."""
    from support.cli import run

    site = fresh_site(world.template, tmp_path / "site")
    hand_edit(site, world)
    done = run("verify", "-q", "--site", site, "--patches", world.patches)
    assert done.code == 6 and done.stdout == "" and done.reason.startswith("error: verify failed: diffusers-attention")


def test_the_rule_tables_are_the_fields_of_the_manifest_records():
    """manifestrules holds the fast path's copy of the records' fields: the same names, kinds and
    defaults as state.py's dataclasses, so one rule set reads a manifest."""
    import dataclasses

    from ernie_patcher.core import manifestrules, state

    for record, table in ((state.PatchRecord, manifestrules.PATCH_FIELDS), (state.FileRecord, manifestrules.FILE_FIELDS)):
        fields = [(f.name, str(f.type), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                  for f in dataclasses.fields(record)]
        assert fields == list(table), record.__name__
    keys = [f.name for f in dataclasses.fields(state.Manifest)]
    assert keys == [*manifestrules.MANIFEST_KEYS, *manifestrules.MANIFEST_OPTIONAL]


STATUS_ROWS = ["applied as recorded", "unchosen variant file deleted", "mode a string", "manifest nested 100 000 deep",
               "answer lists no probes, probed-only file broken", "release code as unchecked-hash bytecode",
               "fresh bytecode the interpreter wrote on import", "RECORD row of the created file removed",
               "stored original removed"]


@pytest.mark.parametrize("row", STATUS_ROWS)
def test_status_gives_one_verdict_too(world: World, tmp_path: Path, row: str, restore_patch_set):
    """`status` shares the fast path: its answer is the engine's (the click CLI, which never takes it)."""
    from support.cli import cli

    site = fresh_site(world.template, tmp_path / "site")
    ROWS[row][0](site, world)
    fast = verdict("status", "--site", site, "--patches", world.patches)
    engine = cli("status", "--json", "--site", site, "--patches", world.patches)
    document = engine.json()
    assert (fast.code, fast.states, fast.error) == (
        engine.code, [(p["id"], p["state"]) for p in document["patches"]],
        document["error"]["kind"] if document["error"] else None), f"{row}: {fast} / {engine.stdout[-400:]}"

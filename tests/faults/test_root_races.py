"""Root on a tree another user can write: a real unprivileged user (uid 1001, no account needed)
owns the --site tree and attacks a root `ernie-patch` while it runs -- a symlink planted at a temp
file's name, package directories swapped for symlinks to a root-owned tree (or for directories of
its own) at every pause point of apply, revert and recovery. Nothing outside the site may change:
every root-owned file there keeps its bytes, owner and mode; the run refuses or completes inside
the site, and once the user stops, the next run leaves the site pristine or patched."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from faultkit import (CREATED, OMNI_RECORD, PAUSE_ENV, STATE, WRITTEN, changed, cli, fault_set, run, spawn, tree,
                      wait_stopped)
from support.cli import DISPATCH, OMNI_PIPELINE, TRANSFORMER
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target

ATTACKER = 1001
ALLOW = "--allow-user-writable"
# The package directories the attacker swaps: together they hold every file the fault set writes.
SWAPPED = {"diffusers/models": "models", "vllm_omni/diffusion/models/ernie_image": "ernie_image"}
POINTS = ["journal-written", *[f"file-{n}-written" for n in range(1, len(WRITTEN) + 1)]]


def owned_tree(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry under ROOT: relative path -> (sha256 / link target / 'dir', mode, uid, gid)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                what = "link:" + os.readlink(path)
            elif path.is_dir():
                what = "dir"
            else:
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[str(path.relative_to(root))] = (what, st.st_mode, st.st_uid, st.st_gid)
    return entries


def attacker(script: str) -> None:
    """SCRIPT run by /bin/sh as the unprivileged user."""
    done = subprocess.run(["/bin/sh", "-c", script], user=ATTACKER, group=ATTACKER, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"the attacker's script failed: {done.stderr}"


@dataclass
class Scene:
    """A site owned by the attacker; a root-owned 'system' tree beside it that must never change."""

    site: Path
    patches: Path
    system: Path
    system_before: dict

    def swap(self, kind: str) -> None:
        """Each of SWAPPED moved aside and replaced by a symlink into the system tree ('symlink'), by
        a symlink to where it was moved, inside the package ('inner-symlink'), or by a directory of
        the attacker's own with the same files ('directory')."""
        for relpath, name in SWAPPED.items():
            place = self.site / relpath
            if kind == "symlink":
                attacker(f"mv '{place}' '{place}.moved' && ln -s '{self.system / name}' '{place}'")
            elif kind == "inner-symlink":
                attacker(f"mv '{place}' '{place}.moved' && ln -s '{place.name}.moved' '{place}'")
            else:
                attacker(f"cp -R '{place}' '{place}.fake' && mv '{place}' '{place}.moved' && "
                         f"mv '{place}.fake' '{place}'")

    def unswap(self) -> None:
        for relpath in SWAPPED:
            place = self.site / relpath
            attacker(f"rm -rf '{place}' && mv '{place}.moved' '{place}'")

    def system_unchanged(self) -> None:
        now = owned_tree(self.system)
        assert now == self.system_before, f"root changed files outside the site: {changed(self.system_before, now)}"


@pytest.fixture
def scene() -> Iterator[Scene]:
    if os.geteuid() != 0:
        pytest.skip("the attacks need a root ernie-patch and a second user")
    base = Path(tempfile.mkdtemp(prefix="ernie-race-", dir="/tmp"))
    try:
        base.chmod(0o755)  # the attacker must reach the site; pytest's own tmp_path is root's only
        site = install_target(base / "site", DIFFUSERS, VLLM_OMNI)
        patches = fault_set(site, base / "set")
        system = base / "system"
        system.mkdir()
        for relpath, name in SWAPPED.items():
            shutil.copytree(site / relpath, system / name)
        (system / "secret").write_bytes(b"root only\n")
        (system / "secret").chmod(0o600)
        for dirpath, dirnames, filenames in os.walk(site):
            for name in [*dirnames, *filenames, "."]:
                os.chown(Path(dirpath) / name, ATTACKER, ATTACKER, follow_symlinks=False)
        yield Scene(site, patches, system, owned_tree(system))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _op(op: str, scene: Scene) -> list:
    return [op, "--site", scene.site, ALLOW] + (["--patches", scene.patches] if op == "apply" else [])


def _outcome(scene: Scene, pristine: dict, patched: dict) -> str:
    """After the attack: the next run (status, which recovers a pending journal) finds the site
    pristine or patched, never half of each."""
    status = cli("status", "--site", scene.site, "--patches", scene.patches)
    assert status.code == 0, status.stdout + status.stderr
    assert not (scene.site / STATE / "journal.json").exists(), "the next run did not finish the recovery"
    now = tree(scene.site)
    assert now in (pristine, patched), f"half-patched: {changed(pristine, now)}"
    return "pristine" if now == pristine else "patched"


def test_root_refuses_a_tree_another_user_can_write_and_status_names_it(scene: Scene):
    before = owned_tree(scene.site)
    status = cli("status", "--site", scene.site, "--patches", scene.patches)
    assert status.code == 0
    assert f"package directories another user can write: {scene.site} (owned by uid 1001)" \
        in status.stdout + status.stderr
    result = cli("apply", "--site", scene.site, "--patches", scene.patches)
    assert result.code == 7, result.stdout + result.stderr
    assert result.reason.startswith(f"error: refusing to write as root in {scene.site}: "
                                    "it is owned by uid 1001"), result.reason
    assert "--allow-user-writable" in result.stderr
    assert owned_tree(scene.site) == before, "a refused run wrote something"


def test_a_group_writable_package_directory_is_refused_too(scene: Scene):
    for dirpath, dirnames, filenames in os.walk(scene.site):
        for name in [*dirnames, *filenames, "."]:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)
    (scene.site / "diffusers" / "models").chmod(0o775)
    result = cli("apply", "--site", scene.site, "--patches", scene.patches)
    assert result.code == 7
    assert f"refusing to write as root in {scene.site / 'diffusers' / 'models'}: it is writable by group 0" \
        in result.reason
    assert cli("apply", "--site", scene.site, "--patches", scene.patches, ALLOW).code == 0


@pytest.mark.parametrize("kind", ["symlink", "directory"])
@pytest.mark.parametrize("point", POINTS)
def test_directories_swapped_while_apply_writes(scene: Scene, point: str, kind: str):
    pristine = tree(scene.site)
    assert cli(*_op("apply", scene)).code == 0
    patched = tree(scene.site)
    assert cli(*_op("revert", scene)).code == 0
    process = spawn(*_op("apply", scene), env={PAUSE_ENV: point})
    wait_stopped(process)
    scene.swap(kind)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    scene.system_unchanged()
    if point == "journal-written":
        assert process.returncode == 7, stderr
        assert "refusing" in stderr and str(scene.site / "diffusers" / "models") in stderr, stderr
    else:
        assert process.returncode in (0, 7), stderr
    scene.unswap()
    _outcome(scene, pristine, patched)
    scene.system_unchanged()


@pytest.mark.parametrize("point", POINTS)
def test_directories_swapped_while_revert_writes(scene: Scene, point: str):
    pristine = tree(scene.site)
    assert cli(*_op("apply", scene)).code == 0
    patched = tree(scene.site)
    process = spawn(*_op("revert", scene), env={PAUSE_ENV: point})
    wait_stopped(process)
    scene.swap("symlink")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    scene.system_unchanged()
    assert process.returncode in (0, 7), stderr
    if point == "journal-written":
        assert process.returncode == 7 and "it is a symlink" in stderr, stderr
    scene.unswap()
    _outcome(scene, pristine, patched)
    scene.system_unchanged()


@pytest.mark.parametrize("restored", [1, 2, 3, 4])
def test_directories_swapped_while_recovery_writes(scene: Scene, restored: int):
    pristine = tree(scene.site)
    assert cli(*_op("apply", scene)).code == 0
    patched = tree(scene.site)
    assert cli(*_op("revert", scene)).code == 0
    assert run(*_op("apply", scene), env={"ERNIE_PATCHER_TEST_KILL_AT": "file-5-written"}).code == -9
    process = spawn("status", "--site", scene.site, "--patches", scene.patches, env={PAUSE_ENV: f"restore-{restored}"})
    wait_stopped(process)
    scene.swap("symlink")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    scene.system_unchanged()
    assert process.returncode in (0, 7), stderr
    scene.unswap()
    assert _outcome(scene, pristine, patched) == "pristine"
    scene.system_unchanged()


def test_a_symlink_planted_at_a_temp_file_name_hands_nothing_over(scene: Scene, monkeypatch: pytest.MonkeyPatch):
    """The moment a package file's temp file is created, the user renames it away and puts a symlink
    to a root-owned 0600 file at its name. Its mode and owner are set through the open file, never
    by name, and the rename that would put the symlink in place is refused: the root file keeps
    its owner, mode and bytes."""
    secret = scene.system / "secret"
    real_open = os.open
    stolen: list[str] = []

    def open_and_attack(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        name = os.fspath(path)
        where = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(name)
        if flags & os.O_CREAT and name.endswith(".ernie-tmp") and f"/{STATE}" not in where and not stolen:
            temp = os.path.join(where, os.path.basename(name))
            stolen.append(temp)
            attacker(f"mv '{temp}' '{temp}.stolen' && ln -s '{secret}' '{temp}'")
        return fd

    pristine = tree(scene.site)
    monkeypatch.setattr(os, "open", open_and_attack)
    result = cli("apply", "--site", scene.site, "--patches", scene.patches, ALLOW)
    monkeypatch.undo()
    assert stolen, "no package temp file was created: the attack never ran"
    scene.system_unchanged()
    assert result.code == 7, result.stdout + result.stderr
    assert f"refusing {scene.site / TRANSFORMER}: the file ernie-patch wrote was replaced at its temp name" \
        in result.reason, result.reason
    assert "nothing was changed" in result.stderr, result.stderr
    for leftover in scene.site.rglob("*.stolen"):
        leftover.unlink()
    assert tree(scene.site) == {k: v for k, v in pristine.items()}, changed(pristine, tree(scene.site))
    assert not os.path.lexists(stolen[0]), "the planted symlink was left in the package"


def test_files_written_as_root_keep_the_attackers_ownership_not_roots(scene: Scene):
    """What apply writes over the user's files stays the user's (owner kept through fchown), and a
    file it creates is root's: nothing of the user's becomes root's, nothing of root's the user's."""
    assert cli(*_op("apply", scene)).code == 0
    for relpath in (TRANSFORMER, DISPATCH, OMNI_PIPELINE, OMNI_RECORD):
        assert (scene.site / relpath).stat().st_uid == ATTACKER, relpath
    assert (scene.site / CREATED).stat().st_uid == 0


def test_a_symlink_put_at_a_staged_temp_name_before_its_rename_is_refused(scene: Scene):
    """Every new content is staged (and fsynced) before the first rename; held after the first
    rename, the user replaces the other staged temp files with symlinks to the root-owned secret.
    Each rename is checked to have put the file that was written in place: the run refuses and
    rolls back, and no symlink is left in the package."""
    pristine = tree(scene.site)
    process = spawn(*_op("apply", scene), env={PAUSE_ENV: "file-1-written"})
    wait_stopped(process)
    temps = [p for p in scene.site.rglob("*.ernie-tmp") if f"/{STATE}/" not in str(p)]
    assert temps, "no staged temp file to attack"
    for temp in temps:
        attacker(f"rm -f '{temp}' && ln -s '{scene.system / 'secret'}' '{temp}'")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    scene.system_unchanged()
    assert process.returncode == 7, stderr
    assert "was replaced at its temp name" in stderr, stderr
    links = [p for p in scene.site.rglob("*") if p.is_symlink()]
    assert links == [], f"a symlink was left in the package: {links}"
    assert tree(scene.site) == pristine, changed(pristine, tree(scene.site))


@pytest.mark.parametrize("kind", ["symlink", "inner-symlink"])
def test_directories_swapped_before_the_recovering_run_starts(scene: Scene, kind: str):
    """An apply is killed midway; before the next run the user swaps the directories for symlinks,
    into the system tree or to where the real ones were moved inside the package. The recovering
    run enters no directory through a symlink, wherever it leads: it refuses, keeps its journal,
    and once the directories are back the run after recovers the site."""
    pristine = tree(scene.site)
    assert run(*_op("apply", scene), env={"ERNIE_PATCHER_TEST_KILL_AT": "file-5-written"}).code == -9
    scene.swap(kind)
    status = run("status", "--site", scene.site, "--patches", scene.patches)
    scene.system_unchanged()
    assert status.code == 7, status.stdout + status.stderr
    assert "outside package" in status.stderr if kind == "symlink" else "it is a symlink" in status.stderr, \
        status.stderr
    assert (scene.site / STATE / "journal.json").exists(), "the journal went while its files were out of reach"
    scene.unswap()
    assert _outcome(scene, pristine, pristine) == "pristine"
    scene.system_unchanged()


def _set_id_or_shared(path: Path) -> bool:
    """Whether PATH has a set-id or sticky bit, or is root's and writable by group or others."""
    st = path.lstat()
    return bool(st.st_mode & 0o7000) or (st.st_uid == 0 and bool(st.st_mode & 0o022))


def test_no_mode_is_copied_from_what_the_user_controls(scene: Scene):
    """Root-owned directories, but the user owns the .py files of the directory where the patch set
    creates one, made set-id and world-writable. The file root creates is root's, 0o755 at most;
    the files root rewrites keep the user as owner and lose the set-id bits. Without that, the
    created file was a root-owned 06777 file: a root shell for the user."""
    for dirpath, dirnames, filenames in os.walk(scene.site):
        for name in [*dirnames, *filenames, "."]:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)
    ernie_image = (scene.site / CREATED).parent
    for module in ernie_image.glob("*.py"):
        os.chown(module, ATTACKER, ATTACKER)
        attacker(f"chmod 6777 '{module}'")
    result = cli("apply", "--site", scene.site, "--patches", scene.patches)
    assert result.code == 0, result.stdout + result.stderr
    created = scene.site / CREATED
    assert created.stat().st_uid == 0 and not _set_id_or_shared(created), oct(created.stat().st_mode)
    rewritten = scene.site / OMNI_PIPELINE
    assert rewritten.stat().st_uid == ATTACKER and not rewritten.stat().st_mode & 0o7000
    assert not [p for p in scene.site.rglob("*") if p.stat().st_uid == 0 and _set_id_or_shared(p)]


def test_a_file_removed_after_planning_is_never_made_again_as_roots(scene: Scene):
    """The user makes RECORD a set-id copy of a program, then removes it while apply is held after
    writing its journal: the registration is decided from the RECORD planning read, so the run
    refuses instead of writing a root-owned file with the user's bytes and mode."""
    record = scene.site / OMNI_RECORD
    attacker(f"chmod 4755 '{record}'")
    process = spawn(*_op("apply", scene), env={PAUSE_ENV: "journal-written"})
    wait_stopped(process)
    attacker(f"rm -f '{record}'")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 7, stderr
    assert f"refusing {record}: it was removed since this run planned" in stderr, stderr
    assert not [p for p in scene.site.rglob("*") if p.stat().st_uid == 0 and _set_id_or_shared(p)]
    assert not record.exists(), "apply made the removed RECORD again"


def test_revert_force_of_a_removed_set_id_file_makes_it_roots_without_set_id(scene: Scene):
    """The user makes a patched file 06777, apply keeps their ownership; the user removes it and
    revert --force puts the original back: root's, without set-id bits or group and world write."""
    target = scene.site / TRANSFORMER
    attacker(f"chmod 6777 '{target}'")
    assert cli(*_op("apply", scene)).code == 0
    attacker(f"rm -f '{target}'")
    result = cli("revert", "--site", scene.site, "--force", ALLOW)
    assert result.code == 0, result.stdout + result.stderr
    assert target.exists() and not _set_id_or_shared(target), oct(target.stat().st_mode)


def _all_roots(site: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(site):
        for name in [*dirnames, *filenames, "."]:
            os.chown(Path(dirpath) / name, 0, 0, follow_symlinks=False)


def test_a_site_below_a_directory_another_user_owns_is_refused(scene: Scene):
    """Root's own tree, but it lies in a directory the user owns (a deploy user's home): the user
    could swap the whole site for a symlink to another root-owned tree. Named in status, refused."""
    _all_roots(scene.site)
    home = scene.site.parent / "home"
    home.mkdir()
    os.rename(scene.site, home / "site")
    os.chown(home, ATTACKER, ATTACKER)
    site = home / "site"
    status = cli("status", "--site", site, "--patches", scene.patches)
    assert f"package directories another user can write: {home} (owned by uid 1001)" in status.stdout
    before = owned_tree(site)
    result = cli("apply", "--site", site, "--patches", scene.patches)
    assert result.code == 7 and f"refusing to write as root in {home}: it is owned by uid 1001" in result.reason
    assert owned_tree(site) == before


def test_the_state_directory_moved_away_mid_run_rolls_back_through_the_one_held(scene: Scene):
    """A root-owned tree in a world-writable site directory (allowed): while apply is held after
    its second write, the user moves .ernie-patcher away. The run keeps using the state directory
    it opened (journal, originals), refuses to write a manifest nobody would find, and puts every
    file back: the site ends pristine, not patched with its state gone."""
    _all_roots(scene.site)
    scene.site.chmod(0o777)
    pristine = tree(scene.site)
    process = spawn(*_op("apply", scene), env={PAUSE_ENV: "file-2-written"})
    wait_stopped(process)
    attacker(f"mv '{scene.site / STATE}' '{scene.site / '.hidden'}'")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 7, stderr
    assert f"refusing {scene.site / STATE}: it is another directory than the one this run locked" in stderr
    assert "every file written so far was put back" in stderr, stderr
    now = {k: v for k, v in tree(scene.site).items() if not k.startswith(".hidden")}
    assert now == pristine, changed(pristine, now)
    assert not (scene.site / ".hidden" / "journal.json").exists()


def test_the_lock_file_is_the_runs_own(scene: Scene):
    """Nobody else may open the lock to flock it and lock every root run out."""
    _all_roots(scene.site)
    assert cli("apply", "--site", scene.site, "--patches", scene.patches).code == 0
    lock = scene.site / STATE / "lock"
    assert lock.stat().st_mode & 0o777 == 0o600
    refused = subprocess.run(["/bin/sh", "-c", f"exec 3< '{lock}'"], user=ATTACKER, group=ATTACKER,
                             capture_output=True, text=True)
    assert refused.returncode != 0, "the user could open the lock file"


def test_an_original_only_its_owner_may_read_is_not_stored_readable_by_all(scene: Scene):
    _all_roots(scene.site)
    (scene.site / DISPATCH).chmod(0o600)
    assert cli("apply", "--site", scene.site, "--patches", scene.patches).code == 0
    objects = scene.site / STATE / "objects"
    digest = hashlib.sha256((scene.system / "models" / "attention_dispatch.py").read_bytes()).hexdigest()
    assert (objects / digest).stat().st_mode & 0o777 == 0o400


def test_revert_refused_as_root_writes_nothing_first(scene: Scene):
    """revert --force on the user's tree without the option: refused before any copy is saved or
    any stored original dropped."""
    assert cli(*_op("apply", scene)).code == 0
    (scene.site / DISPATCH).write_bytes((scene.site / DISPATCH).read_bytes() + b"# edited\n")
    before = owned_tree(scene.site)
    result = cli("revert", "--site", scene.site, "--force")
    assert result.code == 7 and "refusing to write as root" in result.reason
    assert owned_tree(scene.site) == before, changed(before, owned_tree(scene.site))

"""SIGKILL during apply, revert and recovery: the next run leaves every file pristine or patched.

Two ways of killing: the test-only checkpoint hook (every checkpoint of apply and revert, and
inside recovery), and a seeded loop of kills after random delays.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faultkit import (KILL_ENV, PAUSE_ENV, STATE, SUMMARY, WRITTEN, changed, cli, debris, fault_set, run, spawn, states,
                      tree, wait_stopped)
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target
from support.tree import snapshot

APPLY_CHECKPOINTS = ["journal-written", *[f"file-{n}-written" for n in range(1, len(WRITTEN) + 1)],
                     "manifest-written", "journal-removed"]
SEED = int(os.environ.get("ERNIE_PATCHER_FAULT_SEED", "20240917"))
KILLS = int(os.environ.get("ERNIE_PATCHER_FAULT_KILLS", "12"))


@dataclass
class World:
    """One real site shared by this module's tests, with its pristine and patched trees."""

    site: Path
    patches: Path
    empty: dict
    pristine: dict
    patched: dict
    durations: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("crash")
    site = install_target(root / "site", DIFFUSERS, VLLM_OMNI)
    patches = fault_set(site, root / "set")
    empty, pristine = snapshot(site), tree(site)
    durations = {}
    for op in ("apply", "revert"):
        started = time.monotonic()
        process = spawn(*_args(op, site, patches))
        assert process.wait() == 0, process.communicate()[1]
        durations[op] = time.monotonic() - started
        if op == "apply":
            patched = tree(site)
    assert snapshot(site) == empty
    return World(site, patches, empty, pristine, patched, durations)


def _args(op: str, site: Path, patches: Path) -> list:
    return [op, "--site", site] + (["--patches", patches] if op == "apply" else [])


def consistent(world: World) -> str:
    """Run the next ernie-patch (status, which recovers) and check files, status and verify agree."""
    found = states(world.site, world.patches)
    assert debris(world.site) == [], "an interrupted write left temporary files behind"
    current = tree(world.site)
    state = world.site / STATE
    assert not (state / "journal.json").exists(), "the next run did not finish the recovery"
    if current == world.pristine:
        assert found == ["not-applied"] * 3
        assert cli("verify", "--site", world.site, "--patches", world.patches).code == 1
        assert not (state / "manifest.json").exists()
        return "pristine"
    assert current == world.patched, f"half-patched: {changed(world.pristine, current)}"
    assert found == ["applied"] * 3
    assert cli("verify", "--site", world.site, "--patches", world.patches).code == 0
    assert (state / "manifest.json").exists()
    return "patched"


def bring_to(world: World, wanted: str) -> None:
    if consistent(world) != wanted:
        op = "apply" if wanted == "patched" else "revert"
        assert cli(*_args(op, world.site, world.patches)).code == 0
    assert consistent(world) == wanted


@pytest.mark.parametrize("point", APPLY_CHECKPOINTS)
def test_apply_killed_at_checkpoint(world: World, point: str):
    bring_to(world, "pristine")
    killed = run(*_args("apply", world.site, world.patches), env={KILL_ENV: point})
    assert killed.code == -9, f"the hook did not fire at {point}: {killed.stderr}"
    written = int(point.split("-")[1]) if point.startswith("file-") else 0
    if written:
        now = tree(world.site)
        assert changed(world.pristine, now), "the kill came before any file was written"
    expected = "patched" if point == "journal-removed" else "pristine"
    assert consistent(world) == expected


@pytest.mark.parametrize("point", APPLY_CHECKPOINTS)
def test_revert_killed_at_checkpoint(world: World, point: str):
    bring_to(world, "patched")
    killed = run("revert", "--site", world.site, env={KILL_ENV: point})
    assert killed.code == -9, f"the hook did not fire at {point}: {killed.stderr}"
    expected = "pristine" if point == "journal-removed" else "patched"
    assert consistent(world) == expected
    if expected == "pristine":
        assert cli("revert", "--site", world.site).code == 0
        assert snapshot(world.site) == world.empty


@pytest.mark.parametrize("restored", [1, 3])
def test_recovery_killed_midway_is_finished_by_the_run_after(world: World, restored: int):
    bring_to(world, "pristine")
    assert run(*_args("apply", world.site, world.patches), env={KILL_ENV: "file-4-written"}).code == -9
    again = run("status", "--site", world.site, "--patches", world.patches, env={KILL_ENV: f"restore-{restored}"})
    assert again.code == -9, "the recovery checkpoint did not fire"
    assert (world.site / STATE / "journal.json").exists()
    assert consistent(world) == "pristine"


@pytest.mark.parametrize("op", ["apply", "revert"])
def test_recovery_killed_between_its_manifest_and_the_journal_removal_is_finished_by_the_run_after(
        world: World, op: str):
    """Recovery writes back the manifest of before the interrupted run, then removes the journal:
    killed between the two, the journal is still there and the run after recovers again, to the
    state before the interrupted run (its manifest included)."""
    before = "pristine" if op == "apply" else "patched"
    bring_to(world, before)
    assert run(*_args(op, world.site, world.patches), env={KILL_ENV: "manifest-written"}).code == -9
    again = run("status", "--site", world.site, "--patches", world.patches,
                env={KILL_ENV: "restored-manifest-written"})
    assert again.code == -9, "the recovery checkpoint did not fire"
    assert (world.site / STATE / "journal.json").exists(), "the journal went before the manifest was put back"
    assert consistent(world) == before


def test_random_kills_during_apply_and_revert(world: World):
    """A third of the kills land at a random moment of the whole run; the rest inside the write phase
    (a few milliseconds, too short to hit by timing alone): the run is held (test-only SIGSTOP hook)
    after a random one of its writes and killed there after a random delay. Each is followed by a
    check."""
    rng = random.Random(SEED)
    bring_to(world, "pristine")
    outcome = {"pristine": 0, "patched": 0}
    interrupted = finished = 0
    for number in range(KILLS):
        op = "apply" if outcome_of(world) == "pristine" else "revert"
        if number % 3:
            point = f"file-{rng.randint(1, len(WRITTEN))}-written"
            process = spawn(*_args(op, world.site, world.patches), env={PAUSE_ENV: point})
            wait_stopped(process)
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            process = spawn(*_args(op, world.site, world.patches))
            time.sleep(rng.uniform(0.0, 1.1 * world.durations[op]))
        process.kill()
        process.communicate()
        finished += process.returncode == 0
        interrupted += (world.site / STATE / "journal.json").exists()
        if rng.random() < 0.25:
            follow = spawn("status", "--site", world.site, "--patches", world.patches)
            time.sleep(rng.uniform(0.0, world.durations["revert"]))
            follow.kill()
            follow.communicate()
        outcome[consistent(world)] += 1
    SUMMARY.append(f"random kills (seed {SEED}): {KILLS} runs, {interrupted} left a journal, "
          f"{finished} finished before the kill; the next run found {outcome}")
    assert interrupted >= 1, "no kill landed inside a transaction: the loop proved nothing"
    bring_to(world, "pristine")
    assert cli("revert", "--site", world.site).code == 0
    assert snapshot(world.site) == world.empty


def outcome_of(world: World) -> str:
    return "patched" if tree(world.site) == world.patched else "pristine"


LOADED_MARK = ("import sys, importlib.machinery as m\n"
               "print([('FAULT_MARK' in m.SourceFileLoader('checked', p).get_code('checked').co_names) "
               "for p in sys.argv[1:]])\n")


@pytest.mark.parametrize("how", ["killed", "terminated"])
def test_an_interrupted_apply_on_unchecked_hash_bytecode_leaves_the_original_code_running(tmp_path: Path, how: str):
    """A release compiled in unchecked-hash mode (the interpreter never compares it with the source):
    apply writes such bytecode for each patched file; interrupted after the third file, the
    recovery (killed) or the rollback (SIGTERM) puts the sources back and must remove that
    bytecode, else Python keeps running the patched code over the original source."""
    import signal
    import subprocess
    import sys

    site = install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)
    patches = fault_set(site, tmp_path / "set")
    sources = [str(site / relpath) for relpath in WRITTEN[:3]]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", *sources],
                   check=True)
    pristine = tree(site)
    if how == "killed":
        assert run(*_args("apply", site, patches), env={KILL_ENV: "file-3-written"}).code == -9
        assert run("status", "--site", site, "--patches", patches).code == 0
    else:
        process = spawn(*_args("apply", site, patches), env={PAUSE_ENV: "file-3-written"})
        wait_stopped(process)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        assert process.wait() == 143, process.communicate()
    assert not [p for p in changed(pristine, tree(site)) if p.endswith(".py")], "a source was not put back"
    loaded = subprocess.run([sys.executable, "-B", "-c", LOADED_MARK, *sources], capture_output=True, text=True,
                            check=True)
    assert loaded.stdout.strip() == "[False, False, False]", \
        f"the interpreter still loads the patched code after the {how} apply was undone: {loaded.stdout}"

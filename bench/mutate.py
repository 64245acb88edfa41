"""Mutation check: break the engine one way at a time and see the core tests notice.

Each mutation is an exact text replacement in one file of a scratch copy of the checkout (the
working tree is never touched). The replaced text must occur exactly once, else the mutation is
reported as an ERROR: a target that moved away must not pass as "caught". Each mutation runs only
the tests meant to catch it, with -x, so a run stops at the first failure.

    python bench/mutate.py            # every mutation, a Markdown table on stdout
    python bench/mutate.py NAME ...   # only these
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__", "*.egg-info")
PYTEST = ["-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:randomly"]

HUNKS = "ernie_patcher/patchset/hunks.py"
T_HUNKS = "tests/engine/test_hunks.py"
T_LIFE = "tests/engine/test_lifecycle.py"
T_DISC = "tests/engine/test_discovery.py"
T_CRASH = "tests/faults/test_crash_recovery.py"
T_HOSTILE = "tests/faults/test_hostile_patchsets.py"
T_RACES = "tests/faults/test_root_races.py"
T_VERDICT = "tests/engine/test_one_verdict.py"
T_PROVES = "tests/engine/test_verify_proves.py"
FAST = "ernie_patcher/core/fastpath.py"


def row(name: str) -> str:
    """The differential table's test of row NAME: the fast path and the engine give one verdict."""
    return f"{T_VERDICT}::test_fast_path_and_engine_give_one_verdict[{name}]"



@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("last context line ignored", HUNKS,
             "for i, expected in enumerate(block))", "for i, expected in enumerate(block[:-1]))",
             (f"{T_HUNKS}::test_conflict_when_an_edge_context_line_differs",)),
    Mutation("first context line ignored", HUNKS,
             "return all(lines[at + i] == expected for i, expected in enumerate(block))",
             "return all(lines[at + i] == expected for i, expected in enumerate(block) if i)",
             (f"{T_HUNKS}::test_conflict_when_an_edge_context_line_differs",)),
    Mutation("later hunk may match before the previous output", HUNKS,
             "if low <= at <= high:", "if at <= high:",
             (f"{T_HUNKS}::test_later_hunk_never_matches_before_the_previous_hunks_output",)),
    Mutation("offset of earlier hunks not carried", HUNKS,
             "delta += len(new) - len(old) + (at - expected)",
             "delta += len(new) - len(old)",
             (f"{T_HUNKS}::test_a_shift_found_by_the_first_hunk_is_carried_to_the_next",
              f"{T_HUNKS}::test_offset_is_found_and_reported")),
    Mutation("offset search unbounded", HUNKS,
             "for distance in range(max_offset + 1):", "for distance in range(max_offset + 10**4):",
             (f"{T_HUNKS}::test_offset_search_is_bounded",)),
    Mutation("CRLF not kept", HUNKS, "crlf = _uses_crlf(lines)", "crlf = False",
             (f"{T_HUNKS}::test_crlf_file_keeps_its_line_endings",)),
    Mutation("edited .patch file not drifted", "ernie_patcher/core/engine.py",
             "if patch.state == APPLIED and recorded and recorded.patch_sha256 != patch.spec.digest():",
             "if False:",
             ("tests/faults/test_drift_reinstall.py::test_patch_file_edited_after_apply_marks_the_patch_drifted",)),
    Mutation("hand edit after apply not drifted", "ernie_patcher/core/assess.py",
             "if digest != entry.before and self._differs_from_release(package, relpath, current):",
             "if False:",
             ("tests/faults/test_drift_reinstall.py::test_hand_edit_after_apply",)),
    Mutation("temp file not fsynced before rename", "ernie_patcher/fs/fsops.py",
             "            os.fchmod(handle.fileno(), mode)\n            os.fsync(handle.fileno())\n",
             "            os.fchmod(handle.fileno(), mode)\n",
             ("tests/engine/test_fsops.py",)),
    Mutation("staged files not fsynced before they are renamed", "ernie_patcher/core/transaction.py",
             "        fsync_staged(list(staged.values()))\n", "",
             ("tests/engine/test_fsops.py",)),
    Mutation("manifest after journal removal", "ernie_patcher/core/transaction.py",
             '    state.write_manifest(manifest)\n    checkpoint("manifest-written")\n'
             '    state.remove(state.journal_path)\n',
             '    state.remove(state.journal_path)\n    state.write_manifest(manifest)\n'
             '    checkpoint("manifest-written")\n',
             (f"{T_CRASH}::test_apply_killed_at_checkpoint",)),
    Mutation("recovery restores nothing", "ernie_patcher/core/transaction.py",
             "if _put(state, path, entry):", "if False:",
             (f"{T_LIFE}::test_crash_between_files_is_recovered", f"{T_CRASH}::test_apply_killed_at_checkpoint")),
    Mutation("version gate off", "ernie_patcher/core/assess.py",
             "            if not self.allow_untested:\n", "            if False:\n",
             (f"{T_LIFE}::test_version_gate_refuses_then_allow_untested_tries",)),
    Mutation("stale bytecode kept", "ernie_patcher/core/transaction.py",
             "                install(staged.pop(number - 1), sync_dir=False, drop_bytecode=True)\n",
             "                install(staged.pop(number - 1), sync_dir=False)\n",
             (f"{T_DISC}::test_stale_bytecode_is_removed_including_unchecked_hash",)),
    Mutation("no fresh bytecode", "ernie_patcher/core/transaction.py",
             "compiled += filter(None, [bytecode.write(write.path, write.relpath, write.data, write.code, flags,",
             "compiled += filter(None, [None and bytecode.write(write.path, write.relpath, write.data, write.code, flags,",
             (f"{T_DISC}::test_after_apply_and_revert_importing_the_written_modules_compiles_nothing",)),
    Mutation("bytecode in timestamp mode whatever the release used", "ernie_patcher/fs/bytecode.py",
             "    if flags & HASH_BASED:\n        header += source_hash(data)\n    else:\n",
             "    flags = 0\n    if False:\n        header += source_hash(data)\n    else:\n",
             (f"{T_DISC}::test_stale_bytecode_is_removed_including_unchecked_hash",)),
    Mutation("created files not in RECORD", "ernie_patcher/core/plan.py",
             "if not created or package.dist_info is None or package.editable:", "if True:",
             (f"{T_DISC}::test_python_option_patches_another_venv_and_pip_uninstall_removes_created_file",
              f"{T_DISC}::test_revert_undoes_the_record_registration_exactly")),
    Mutation("unknown series keys accepted", "ernie_patcher/patchset/series.py",
             "    if unknown:\n        raise _fail(where, f\"unknown key(s)", "    if False:\n        raise _fail(where, f\"unknown key(s)",
             (T_HOSTILE, "-k", "unknown")),
    Mutation("'..' paths accepted", "ernie_patcher/patchset/series.py",
             'or ".." in pure.parts ', "",
             (T_HOSTILE, "-k", "dotdot or outside")),
    Mutation("no lock", "ernie_patcher/fs/fsops.py",
             "fcntl.flock(self._fd, flag | fcntl.LOCK_NB)", "(flag | fcntl.LOCK_NB)",
             ("tests/faults/test_env_faults.py", "-k", "lock")),
    Mutation("file mode not kept", "ernie_patcher/core/plan.py",
             "before_mode = _current_mode(file.path, file.relpath) if", "before_mode = 0o644 if",
             (f"{T_LIFE}::test_mode_and_owner_are_kept",)),
    Mutation("symlinked targets followed", "ernie_patcher/core/assess.py",
             "if not inside or path.is_symlink():", "if False:",
             (f"{T_HOSTILE}::test_symlink_in_package_pointing_outside_is_refused",)),
    Mutation("compile workers' results out of order", "ernie_patcher/fs/compilepool.py",
             "return [results[i] if i in results else compile_one(path, data) for i, (path, data) in enumerate(sources)]",
             "return [results[i] if i in results else compile_one(path, data) for i, (path, data) in reversed(list(enumerate(sources)))]",
             ("tests/engine/test_compilepool.py::test_workers_give_what_compiling_here_gives_in_the_same_order",)),
    Mutation("package directories entered through a symlink", "ernie_patcher/fs/safeio.py",
             "_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC",
             "_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC",
             (f"{T_RACES}::test_directories_swapped_before_the_recovering_run_starts[inner-symlink]",)),
    Mutation("a directory swapped since planning written through", "ernie_patcher/fs/safeio.py",
             "        if pinned != identity:\n", "        if False:\n",
             (f"{T_RACES}::test_directories_swapped_while_apply_writes[file-1-written-directory]",)),
    Mutation("temp file's owner set by name", "ernie_patcher/fs/safeio.py",
             "            if owner is not None:\n                _fchown(fd, owner)\n",
             "            if owner is not None:\n                os.chown(temp, *owner, dir_fd=self.fd)\n",
             (f"{T_RACES}::test_a_symlink_planted_at_a_temp_file_name_hands_nothing_over",)),
    Mutation("rename not checked to have put the written file in place", "ernie_patcher/fs/safeio.py",
             "        if found is None or not stat.S_ISREG(found.st_mode) or (found.st_dev, found.st_ino) != staged.identity:\n"
             "            raise self._replaced(name)\n",
             "",
             (f"{T_RACES}::test_a_symlink_put_at_a_staged_temp_name_before_its_rename_is_refused",)),
    Mutation("root writes in a tree another user can write", "ernie_patcher/core/engine.py",
             "    if os.geteuid() != 0 or allowed or not pins.user_writable:\n",
             "    if True:\n",
             (f"{T_RACES}::test_root_refuses_a_tree_another_user_can_write_and_status_names_it",)),
    Mutation("directories apply created left behind", "ernie_patcher/core/transaction.py",
             "        parents |= {(root, _parent_dir(str(p.relative_to(root)))) for p in remove_empty_dirs(root, created, released)}\n",
             "",
             ("tests/engine/test_new_directories.py::"
              "test_new_subpackage_applies_imports_verifies_and_reverts_to_the_same_tree",)),
    # What an independent check found surviving the core tier (issue 24), each with the test that
    # now kills it; the fast path's are run through the entry point users run.
    Mutation("no O_NOFOLLOW on state reads", "ernie_patcher/fs/safeio.py",
             "_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC",
             "_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC",
             ("tests/faults/test_state_attacks.py::"
              "test_a_symlink_swapped_in_between_lstat_and_open_of_a_state_file_is_refused",)),
    Mutation("fast path without the patch-file digest", FAST,
             '_need(sha256(_read(patch_dir / shown["file"]) or b"") == recorded["patch_sha256"])',
             '_read(patch_dir / shown["file"])', (row("chosen patch file edited"),)),
    Mutation("fast path without the version check", FAST,
             '_need(info and location and info["version"] == version)', "_need(info and location)",
             (row("patch record of another version"),)),
    Mutation("fast path without the probe-memo digest", FAST,
             ' and memo["file_sha256"] == digest)', ")", (row("probed-only file broken"),)),
    Mutation("fast path without the shared lock", FAST,
             'with Lock(state_dir / "lock", exclusive=False):', "with open(os.devnull):",
             (f"{T_VERDICT}::test_a_run_holding_the_lock_is_waited_for_by_neither_path",)),
    Mutation("fast path without the RECORD-rows check", FAST,
             "            _check_originals(described, manifest, state)\n", "",
             (row("stored original of another file (RECORD disagrees)"),)),
    Mutation("fast path: patched-file digest replaced by 'exists'", FAST,
             'and digest == entry["after"])', "and digest is not None)",
             (row("patched file without probes edited by hand"),)),
    Mutation("RECORD original always taken as the release's plus apply's rows", "ernie_patcher/core/originals.py",
             '"""Whether CURRENT is ORIGINAL plus RECORD rows of files apply created, and nothing else."""\n',
             '"""Whether CURRENT is ORIGINAL plus RECORD rows of files apply created, and nothing else."""\n'
             "    return True\n", (row("RECORD original without a release row"),)),
    Mutation("recovery removes the journal before writing the manifest", "ernie_patcher/core/transaction.py",
             '    state.write_manifest(manifest)\n    checkpoint("restored-manifest-written")\n'
             "    state.remove(state.journal_path)\n",
             '    state.remove(state.journal_path)\n    checkpoint("restored-manifest-written")\n'
             "    state.write_manifest(manifest)\n",
             (f"{T_CRASH}::test_recovery_killed_between_its_manifest_and_the_journal_removal_is_finished_by_the_run_after",)),
    Mutation("no directory fsync after rename", "ernie_patcher/core/transaction.py",
             "    sync_directories(touched)\n", "",
             ("tests/engine/test_fsops.py::test_apply_fsyncs_each_directory_it_renamed_into_before_the_manifest_says_so",)),
    Mutation("checked-hash bytecode written as unchecked-hash", "ernie_patcher/fs/bytecode.py",
             'header = MAGIC_NUMBER + flags.to_bytes(4, "little")',
             'header = MAGIC_NUMBER + (flags & HASH_BASED).to_bytes(4, "little")',
             (f"{T_PROVES}::test_a_checked_hash_release_gets_checked_hash_bytecode_so_a_later_hand_edit_runs",)),
    Mutation("quick path's engine fallback exits 0 under -q", "ernie_patcher/cli/quick.py",
             "    sys.exit(int(report.exit_code))", '    sys.exit(0 if options["quiet"] else int(report.exit_code))',
             (f"{T_VERDICT}::test_verify_quiet_exits_with_the_engines_code_when_the_engine_answers",)),
    Mutation("created file's RECORD row with the digest of empty bytes", "ernie_patcher/core/plan.py",
             '_record_line(c.relpath, c.after or b"")', '_record_line(c.relpath, b"")', (row("applied as recorded"),)),
    Mutation("recovery and rollback keep the bytecode of restored files", "ernie_patcher/core/transaction.py",
             "            if entry.digest is not None:\n"
             "                remove_bytecode(path, entry.relpath)\n", "",
             (f"{T_CRASH}::test_an_interrupted_apply_on_unchecked_hash_bytecode_leaves_the_original_code_running",)),
    # The checks issue 24 added: each guarded by a test through the entry point.
    Mutation("engine does not check bytecode", "ernie_patcher/core/assess.py",
             'if path.suffix != ".py":\n            return ""\n        if path not in self._bytecode:',
             'if True:\n            return ""\n        if path not in self._bytecode:',
             (f"{T_PROVES}::test_verify_names_bytecode_the_interpreter_would_run_instead_and_revert_then_apply_clears_it",)),
    Mutation("loadable bytecode trusted without its recorded code digest", "ernie_patcher/core/bytecodecheck.py",
             'if fact["same"] is None and fact["level"] == 0 and _recorded(fact, reference):',
             'if fact["same"] is None:',
             (row("release code as timestamp bytecode with the patched file's mtime and size"),)),
    Mutation("verify does not check what revert needs", "ernie_patcher/core/engine.py",
             "problems = revert_problems(env, manifest, state) if manifest else []", "problems = []",
             (f"{T_PROVES}::test_verify_names_a_missing_stored_original_and_a_missing_record_row",)),
    Mutation("fast path without the manifest rules", FAST,
             "_need(manifest_problem(document) is None)", "_need(isinstance(document, dict))",
             (row("mode a string"),)),
    Mutation("fast path without the variant files", FAST,
             "                _variant_files(shown, patch_dir)\n", "", (row("unchosen variant file deleted"),)),
    Mutation("fast path without the probe coverage", FAST,
             '_need({probe["key"] for probe in shown["probes"]} == set(recorded["probes"]))', "",
             (row("answer lists no probes, probed-only file broken"),)),
    Mutation("fast path gives up on no exception", FAST,
             "    except Exception:  # the engine reads the same input again and says what is wrong with it\n"
             "        return None\n", "", (row("manifest nested 100 000 deep"),)),
]


@dataclass(frozen=True)
class Outcome:
    mutation: Mutation
    verdict: str  # caught / SURVIVED / ERROR
    detail: str
    seconds: float


def _first_failure(output: str) -> str:
    match = re.search(r"^FAILED (\S+?(?:\[[^\]]*\])?)(?: - |$)", output, re.MULTILINE)
    return match.group(1).split("/")[-1] if match else "?"


def _run_tests(scratch: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *PYTEST, *tests], cwd=scratch, capture_output=True, text=True,
                          env=_env(scratch), timeout=1800)


def _env(scratch: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}


def run_one(scratch: Path, mutation: Mutation) -> Outcome:
    """Mutate, run the mutation's tests, put the file back (in the scratch copy)."""
    path = scratch / mutation.file
    original = path.read_text()
    found = original.count(mutation.old)
    if found != 1:
        return Outcome(mutation, "ERROR", f"target text found {found} times in {mutation.file}", 0.0)
    path.write_text(original.replace(mutation.old, mutation.new))
    start = time.monotonic()
    try:
        done = _run_tests(scratch, mutation.tests)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    if done.returncode == 0:
        return Outcome(mutation, "SURVIVED", "", seconds)
    if done.returncode == 1:
        return Outcome(mutation, "caught", _first_failure(done.stdout), seconds)
    return Outcome(mutation, "ERROR", f"pytest exit {done.returncode}: {done.stdout.strip()[-200:]}", seconds)


def _baseline(scratch: Path, mutations: list[Mutation]) -> None:
    """The selected tests must pass unmutated, or a 'caught' would mean nothing."""
    for mutation in mutations:
        done = _run_tests(scratch, mutation.tests)
        if done.returncode != 0:
            sys.exit(f"error: tests for {mutation.name!r} fail without any mutation:\n{done.stdout[-2000:]}")


def _imports_from(scratch: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import ernie_patcher.patchset.hunks as m; print(m.__file__)"],
                           cwd=scratch, capture_output=True, text=True, env=_env(scratch), check=True)
    if not probe.stdout.strip().startswith(str(scratch)):
        sys.exit(f"error: the scratch copy is not what gets imported ({probe.stdout.strip()})")


def table(outcomes: list[Outcome]) -> str:
    rows = ["| mutation | result | time |", "|---|---|---|"]
    for o in outcomes:
        result = f"caught by `{o.detail}`" if o.verdict == "caught" else f"**{o.verdict}** {o.detail}".strip()
        rows.append(f"| {o.mutation.name} | {result} | {o.seconds:.1f}s |")
    return "\n".join(rows)


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    if names and len(chosen) != len(names):
        sys.exit(f"error: unknown mutation(s); known: {', '.join(m.name for m in MUTATIONS)}")
    scratch = Path(tempfile.mkdtemp(prefix="ernie-mutate-"))
    try:
        shutil.copytree(ROOT, scratch, dirs_exist_ok=True, ignore=COPY_IGNORE)
        _imports_from(scratch)
        _baseline(scratch, chosen)
        outcomes = [run_one(scratch, m) for m in chosen]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(outcomes))
    bad = [o for o in outcomes if o.verdict != "caught"]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} caught", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

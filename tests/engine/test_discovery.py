"""Issue contract 5-7: discovery without importing targets (normal, editable, --python), stale
bytecode removal, and created files registered for pip uninstall."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from support.cli import OMNI_PIPELINE, ROOT, TRANSFORMER, cli
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset
from support.realpkgs import DIFFUSERS, VLLM_OMNI, make_venv, sdist
from support.tree import snapshot

CREATED = "vllm_omni/diffusion/models/ernie_image/extra_helpers.py"


def omni_set(import_root: Path, directory: Path) -> Path:
    diff = file_diff(import_root, OMNI_PIPELINE, insert_after("import torch", "OMNI_MARK = 'omni-mark'\n"))
    diff += new_file_diff(CREATED, ["def helper():\n", "    return 1\n"])
    return write_patchset(directory, [PatchDef("omni", "vllm-omni", "vllm_omni", diff, versions="==0.20.0",
                                               probes=[{"file": OMNI_PIPELINE, "kind": "string", "value": "omni-mark"}])])


def purelib(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_python_option_patches_another_venv_and_pip_uninstall_removes_created_file(tmp_path: Path):
    python = make_venv(tmp_path / "venv", VLLM_OMNI)
    site = purelib(python)
    patches = omni_set(site, tmp_path / "set")
    status = cli("status", "--python", python, "--patches", patches, "--json").json()
    assert status["python"] == str(python) or Path(status["python"]).resolve() == python.resolve()
    assert status["patches"][0]["installed_version"] == "0.20.0"
    assert cli("apply", "--python", python, "--patches", patches).code == 0
    assert b"omni-mark" in (site / OMNI_PIPELINE).read_bytes()
    assert (site / ".ernie-patcher" / "manifest.json").exists()
    record = (site / "vllm_omni-0.20.0.dist-info" / "RECORD").read_text()
    assert f"{CREATED},sha256=" in record
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "vllm-omni"], check=True)
    assert not (site / CREATED).exists(), "pip uninstall left the file the patch created"
    assert not (site / "vllm_omni").exists()


def test_revert_undoes_the_record_registration_exactly(tmp_path: Path):
    python = make_venv(tmp_path / "venv", VLLM_OMNI)
    site = purelib(python)
    patches = omni_set(site, tmp_path / "set")
    record = site / "vllm_omni-0.20.0.dist-info" / "RECORD"
    original = record.read_bytes()
    assert cli("apply", "--python", python, "--patches", patches).code == 0
    assert record.read_bytes() != original
    assert cli("revert", "--python", python).code == 0
    assert record.read_bytes() == original


def test_editable_install_is_found_and_patched_in_its_source_tree(tmp_path: Path):
    source = tmp_path / "src"
    with tarfile.open(sdist(*VLLM_OMNI)) as archive:
        archive.extractall(source, filter="data")
    tree = next(source.iterdir())
    python = make_venv(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(tree)], check=True)
    patches = omni_set(tree, tmp_path / "set")
    status = cli("status", "--python", python, "--patches", patches, "--json").json()
    assert status["patches"][0]["files"][0]["path"] == str(tree / OMNI_PIPELINE)
    assert cli("apply", "--python", python, "--patches", patches).code == 0
    assert b"omni-mark" in (tree / OMNI_PIPELINE).read_bytes()
    assert (tree / CREATED).exists()
    record = purelib(python) / "vllm_omni-0.20.0.dist-info" / "RECORD"
    assert CREATED not in record.read_text(), "an editable install's RECORD does not list source files"
    assert cli("verify", "--python", python, "--patches", patches).code == 0
    assert cli("revert", "--python", python).code == 0
    assert b"omni-mark" not in (tree / OMNI_PIPELINE).read_bytes()
    assert not (tree / CREATED).exists()


def test_discovery_and_apply_never_import_the_targets(tmp_path: Path, site: Path):
    patches = omni_set(site, tmp_path / "set")
    script = (
        "import json, sys\n"
        "from ernie_patcher.cli.commands import main\n"
        "for args in (['status'], ['apply'], ['verify'], ['revert']):\n"
        "    try:\n"
        f"        main(args + ['--site', {str(site)!r}] + (['--patches', {str(patches)!r}] if args[0] != 'revert' else []))\n"
        "    except SystemExit:\n"
        "        pass\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_npu', 'diffusers', 'vllm', 'vllm_omni'))\n"
        "print(json.dumps(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_stale_bytecode_is_removed_including_unchecked_hash(site: Path, tmp_path: Path):
    patches = omni_set(site, tmp_path / "set")
    target = site / OMNI_PIPELINE
    other = site / TRANSFORMER
    for mode in ("timestamp", "unchecked-hash"):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-f", "--invalidation-mode", mode,
                        "-o", "0", "-o", "1", str(target), str(other)], check=True)
    cache = target.parent / "__pycache__"
    assert any(p.name.startswith("pipeline_ernie_image.") for p in cache.iterdir())
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    fresh = Path(importlib.util.cache_from_source(str(target)))
    assert [p for p in cache.iterdir() if p.name.startswith("pipeline_ernie_image.")] == [fresh], \
        "the stale bytecode (both optimisation levels) is gone, only the fresh one is there"
    assert unchecked_hash_of(fresh) == importlib.util.source_hash(target.read_bytes()), \
        "the fresh bytecode keeps the release's unchecked-hash mode, for the patched bytes"
    assert any(p.name.startswith("transformer_ernie_image.") for p in (other.parent / "__pycache__").iterdir()), \
        "bytecode of files the patch does not touch must stay"
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-f", "--invalidation-mode", "unchecked-hash",
                    "-o", "1", str(target)], check=True)
    assert cli("revert", "--site", site).code == 0
    assert [p for p in cache.iterdir() if p.name.startswith("pipeline_ernie_image.")] == [fresh]
    assert unchecked_hash_of(fresh) == importlib.util.source_hash(target.read_bytes())


def unchecked_hash_of(pyc: Path) -> bytes:
    """The source hash an unchecked-hash .pyc of this interpreter names (asserting its header)."""
    header = pyc.read_bytes()[:16]
    assert header[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(header[4:8], "little") == 0b01
    return header[8:16]


def test_after_apply_and_revert_importing_the_written_modules_compiles_nothing(site: Path):
    """pip compiled the release (timestamp bytecode); apply and revert leave valid bytecode for every
    file they write: the import system loads it and never calls source_to_code."""
    written = [site / TRANSFORMER, site / OMNI_PIPELINE]
    check = ("import sys, importlib.machinery as m\n"
             "calls = []\n"
             "original = m.SourceFileLoader.source_to_code\n"
             "m.SourceFileLoader.source_to_code = lambda self, *a, **k: calls.append(a[1]) or original(self, *a, **k)\n"
             "for path in sys.argv[1:]:\n"
             "    m.SourceFileLoader('checked', path).get_code('checked')\n"
             "print(calls)\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, written)], check=True)
    for command in ("apply", "revert"):
        assert cli(command, "--site", site).code == 0
        done = subprocess.run([sys.executable, "-B", "-c", check, *map(str, written)], capture_output=True,
                              text=True, check=True)
        assert done.stdout.strip() == "[]", f"after {command}, compiled again: {done.stdout}"


def test_missing_package_is_exit_3(tmp_path: Path):
    from support.realpkgs import install_target

    only_diffusers = install_target(tmp_path / "site", DIFFUSERS)
    patches = omni_set(install_target(tmp_path / "ref", VLLM_OMNI), tmp_path / "set")
    before = snapshot(only_diffusers)
    result = cli("apply", "--site", only_diffusers, "--patches", patches)
    assert result.code == 3 and "vllm-omni is not installed" in result.stderr
    assert snapshot(only_diffusers) == before


def test_a_symlinked_pycache_is_never_followed_out_of_the_package(site: Path, tmp_path: Path):
    patches = omni_set(site, tmp_path / "set")
    target = site / OMNI_PIPELINE
    cache = target.parent / "__pycache__"
    shutil.rmtree(cache, ignore_errors=True)
    outside = tmp_path / "outside-cache"
    outside.mkdir()
    bait = outside / "pipeline_ernie_image.cpython-311.pyc"
    bait.write_bytes(b"not ours")
    cache.symlink_to(outside, target_is_directory=True)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert bait.read_bytes() == b"not ours", "apply deleted a file outside the package"

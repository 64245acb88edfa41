"""`ernie-patch selftest` for real, on the CPU through the fake NPU device, after `ernie-patch apply`.

Each diffusers release gets a fresh `pip install --no-deps --target` tree of the real wheel, patched by
the CLI itself; the selftest runs this tier's interpreter (torch, no torch_npu, no vllm-omni) on it. The tree
also gets the tier's mindiesd 3.1.0 (a link to the overlay's package): the selftest runs with `-I`, so the
target has MindIE-SD exactly when its --site or its own site-packages does.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ernie_patcher.selftest.runtime import sp
from ernie_patcher.selftest.runtime.device import Device
from tests.numerics.conftest import DIFFUSERS_PATCHES, REPO
from tests.support.realpkgs import install_target

ROPE_FILE = "diffusers/models/transformers/transformer_ernie_image.py"
ROPE_CALL = 'torch_npu.npu_rotary_mul(x, cos_, sin_, rotary_mode="half")'
KERNEL_CHECKS = {"rope", "fusion_attention[none]", "fusion_attention[all-valid[B,Skv]]",
                 "fusion_attention[padding[B,Skv]]", "fusion_attention[padding[B,1,1,Skv]]"}
MODEL_CHECKS = {"model[rope_full]", "model[rope_partial]", "model[unmasked_long]"}


def ernie_patch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The CLI as a new process of this tier's interpreter (which is also the selftest's target)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ernie_patcher", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def applied_site(tmp_path_factory: pytest.TempPathFactory, diffusers_version: str) -> Path:
    """A fresh tree of the real diffusers DIFFUSERS_VERSION after `ernie-patch apply --site`."""
    site = install_target(tmp_path_factory.mktemp(f"selftest-{diffusers_version}") / "site",
                          ("diffusers", diffusers_version))
    only = [arg for patch in DIFFUSERS_PATCHES for arg in ("--only", patch)]
    applied = ernie_patch("apply", "--site", str(site), *only)
    assert applied.returncode == 0, applied.stderr
    with_mindiesd(site)
    return site


def with_mindiesd(site: Path) -> None:
    """The tier's own mindiesd package and einops (which it imports) linked into SITE, so the target has them."""
    for name in ("mindiesd", "einops"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"the tier's {name} (mindiesd overlay) is not on the path"
        (site / name).symlink_to(Path(spec.origin).parent, target_is_directory=True)


def selftest(site: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    run = ernie_patch("selftest", "--site", str(site), "--json", *args)
    return run.returncode, json.loads(run.stdout), run.stderr


def _by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in document["selftest"]["checks"]}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_selftest_passes_after_apply(applied_site: Path, dtype: str) -> None:
    """Every check passed or skipped with its reason; the fp32 run also asks for --sp 2, which this tier
    (no vllm-omni) must report as skipped, never as passed."""
    sp_args = ("--sp", "2") if dtype == "fp32" else ()
    code, document, stderr = selftest(applied_site, "--dtype", dtype, *sp_args)
    assert code == 0, (stderr, document)
    assert document["ok"] and document["error"] is None
    assert document["selftest"]["device"].startswith("cpu (fake npu device")
    assert "MindIE-SD's own code" in document["selftest"]["device"]
    checks = _by_name(document)
    passed = KERNEL_CHECKS | MODEL_CHECKS | ({"laser_attention"} if dtype == "bf16" else set())
    for name in passed:
        check = checks[name]
        assert check["status"] == "passed", check
        assert check["error"] <= check["tolerance"], check
    for check in checks.values():
        assert check["status"] in ("passed", "skipped"), check
        if check["status"] == "skipped":
            assert check["detail"] and check["error"] is None, check
    assert set(checks) == passed | {"laser_attention", "sp"}
    if dtype == "fp32":
        assert checks["laser_attention"]["status"] == "skipped"
        assert "float16/bfloat16" in checks["laser_attention"]["detail"]
        assert checks["sp"]["status"] == "skipped" and checks["sp"]["detail"] == "vllm_omni is not installed here"
    else:
        assert checks["sp"]["status"] == "skipped" and "not requested" in checks["sp"]["detail"]


def test_selftest_names_the_rope_check_when_the_patched_rope_is_broken(applied_site: Path, tmp_path: Path) -> None:
    """cos and sin swapped in the applied apply_rotary_emb_npu: non-zero exit, the error names `rope`."""
    broken = tmp_path / "site"
    shutil.copytree(applied_site, broken, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    target = broken / ROPE_FILE
    text = target.read_text(encoding="utf-8")
    assert text.count(ROPE_CALL) == 1
    target.write_text(text.replace(ROPE_CALL, ROPE_CALL.replace("cos_, sin_", "sin_, cos_")), encoding="utf-8")

    code, document, _ = selftest(broken)
    assert code == 8
    assert not document["ok"]
    assert document["error"]["reason"].startswith("selftest failed: rope")
    rope = _by_name(document)["rope"]
    assert rope["status"] == "failed" and rope["error"] > rope["tolerance"]

    plain = ernie_patch("selftest", "--site", str(broken))
    assert plain.returncode == 8
    assert plain.stderr.splitlines()[0].startswith("error: selftest failed: rope")


ROPE_ANGLES = ("    cos_ = torch.cos(freqs_cis).to(x.dtype)\n    sin_ = torch.sin(freqs_cis).to(x.dtype)\n")


def test_selftest_fails_when_rope_angles_are_rounded_to_bf16(applied_site: Path, tmp_path: Path) -> None:
    """The angles rounded to the dtype before cos/sin in the applied apply_rotary_emb_npu: at ERNIE-Image's real
    positions (up to 512 rad, where a bf16 angle is off by up to 1 rad) `rope` fails in bf16."""
    broken = tmp_path / "site"
    shutil.copytree(applied_site, broken, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    target = broken / ROPE_FILE
    text = target.read_text(encoding="utf-8")
    assert text.count(ROPE_ANGLES) == 1
    target.write_text(text.replace(ROPE_ANGLES, ROPE_ANGLES.replace("(freqs_cis)", "(freqs_cis.to(x.dtype))")),
                      encoding="utf-8")
    code, document, _ = selftest(broken, "--dtype", "bf16")
    assert code == 8
    rope = _by_name(document)["rope"]
    assert rope["status"] == "failed" and rope["error"] > 4 * rope["tolerance"], rope


def test_selftest_before_apply_is_an_environment_error_naming_apply(diffusers_version: str, tmp_path: Path) -> None:
    """The real runtime on a release's pristine diffusers: no check can mean anything, so exit 7 (not 8,
    which says the patched code computes wrong numbers) with apply as the next step."""
    site = install_target(tmp_path / "site", ("diffusers", diffusers_version))
    code, document, stderr = selftest(site, "--dtype", "fp32")
    assert code == 7, (stderr, document)
    assert document["error"]["kind"] == "environment"
    assert "patches are not applied" in document["error"]["reason"]
    assert "ernie-patch apply" in document["error"]["hint"]


def test_device_npu_without_an_npu_is_an_environment_error(applied_site: Path) -> None:
    run = ernie_patch("selftest", "--site", str(applied_site), "--device", "npu")
    assert run.returncode == 7
    assert "no usable NPU" in run.stderr.splitlines()[0]


def _device(kind: str, count: int) -> Device:
    return Device(kind, kind, count)


def test_sp_check_skip_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipped with the reason: not requested, N < 2, no vllm_omni, fewer NPUs than N; else it runs."""
    assert "not requested" in sp.skip_reason(_device("cpu", 1), None)
    assert "N >= 2" in sp.skip_reason(_device("cpu", 1), 1)
    assert sp.skip_reason(_device("cpu", 1), 2) == "vllm_omni is not installed here"
    monkeypatch.setattr(sp.importlib.util, "find_spec", lambda name: object())
    assert sp.skip_reason(_device("npu", 2), 4) == "--sp 4 needs 4 NPUs, 2 visible"
    assert sp.skip_reason(_device("npu", 4), 4) is None
    assert sp.skip_reason(_device("cpu", 1), 4) is None  # gloo processes on the CPU: no device limit

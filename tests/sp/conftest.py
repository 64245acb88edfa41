"""Fixtures of the sequence-parallel tier: real vllm-omni trees and multi-process gloo runs.

The tier runs in one cached environment per vllm-omni release (tests/sp/requirements/): the
release under test is the vllm-omni that environment has installed, with the vllm and diffusers
it was installed with. vllm-omni is never imported by the test process itself. Each tree is a
fresh `pip install --no-deps --target` of that release's real wheel (tests/support/realpkgs.py),
pristine or patched, and each run starts WORLD_SIZE worker processes (tests/sp/sp_worker.py)
over gloo on 127.0.0.1 with that tree first on PYTHONPATH, ahead of the environment's own
vllm-omni. Runs are session fixtures: several tests read the same run.

ERNIE_SP_PATCHES (comma-separated patch ids) applies only those patches to the "patched" tree,
to show which tests depend on which patch.

ERNIE_SP_PORT_FROM=VERSION proves a ported variant instead of the built-in one: omni-sp-transformer
is carried from vllm-omni VERSION onto the release under test by `ernie-patch port` (in a copy of
the built-in set without the variant that covers that release), and the patched tree gets it, e.g.
`ERNIE_SP_PORT_FROM=0.28.0 make test-sp-0.30.0`. Its figures go to a results file of their own.
"""
from __future__ import annotations

import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

import pytest

from ernie_patcher.selftest.runtime.sp import free_port, wait_ranks
from tests.support.realpkgs import CACHE, install_target, wheel

WORKER = Path(__file__).resolve().parent / "sp_worker.py"
OMNI_PATCHES = ("omni-latent-sync", "omni-ulysses", "omni-sp-transformer")
RESULTS = CACHE / "sp-results"
"""One JSON file per release with the figures its last SP tier run measured (bench/version_matrix.py reads them)."""
FIGURES: dict[str, Any] = {}
LAUNCH_TIMEOUT_S = 420
ALL_MODES = "npu,cuda,npu-bf16,npu-laser"
"""Transformer runs of the patched SP=1/2/4 runs (sp_worker.MODES): fp32 SDPA on NPU and CUDA, bf16
through vllm-omni's NPU attention backend with MindIE-SD's fused_attn_score and laser operators
(SP=1 also runs bf16 on SDPA, the NPU backend's yardstick)."""
TAIL_CHARS = 4000
PORT_FROM = os.environ.get("ERNIE_SP_PORT_FROM")
PORTED = "omni-sp-transformer"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this tier, saying why, in an environment without vllm / vllm-omni / torch."""
    missing = [name for name in ("torch", "vllm", "vllm_omni") if find_spec(name) is None]
    if not missing:
        return
    if os.environ.get("ERNIE_PATCHER_TIER") == "sp":
        raise pytest.UsageError(f"the SP tier's environment is broken (missing: {', '.join(missing)})")
    marker = pytest.mark.skip(
        reason=f"SP tier needs an environment from tests/sp/requirements/ (missing: {', '.join(missing)})"
    )
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


def omni_release() -> tuple[str, str]:
    """The vllm-omni release under test: the one this tier's environment has installed."""
    try:
        return ("vllm-omni", version("vllm-omni"))
    except PackageNotFoundError:
        raise pytest.UsageError("the SP tier's environment has no vllm-omni installed") from None


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Measured figures a test wants in the release's results file (name -> JSON value)."""
    return FIGURES


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Write this release's measured figures and the run's outcome to RESULTS (SP tier runs only)."""
    if os.environ.get("ERNIE_PATCHER_TIER") != "sp" or not FIGURES:
        return
    release = version("vllm-omni")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = getattr(reporter, "stats", {})
    outcomes = {kind: len({report.nodeid for report in stats.get(kind, [])}) for kind in ("passed", "failed", "skipped")}
    record = {
        "vllm-omni": release,
        "stack": {name: version(name) for name in ("vllm", "diffusers", "torch", "transformers")},
        "collected": session.testscollected,
        "failed": session.testsfailed,
        "outcomes": outcomes,
        "selection": [str(arg) for arg in session.config.args] + session.config.option.keyword.split(),
        "measured": time.strftime("%Y-%m-%d", time.gmtime()),
        "figures": FIGURES,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"vllm-omni-{release}" + (f"-{PORTED}-ported-from-{PORT_FROM}" if PORT_FROM else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def apply_patches(site: Path, patch_ids: Sequence[str], patches: Path | None = None) -> None:
    """Apply the patches PATCH_IDS (of the set PATCHES, default the built-in one) to the install tree
    SITE with the project's own engine, all or nothing, without --allow-untested (the one place this
    tier applies patches): the release must be inside each patch's declared range, and the engine
    picks the variant for it."""
    from ernie_patcher.core.engine import Target, apply

    report = apply(Target(site=site, patches=patches), only=tuple(patch_ids))
    if report.error is not None:
        raise RuntimeError(f"ernie-patch apply failed: {report.error.reason}")
    assert {p.spec.id for p in report.patches if p.state == "applied"} >= set(patch_ids)


def selected_patches() -> list[str]:
    names = os.environ.get("ERNIE_SP_PATCHES")
    return [n.strip() for n in names.split(",") if n.strip()] if names is not None else list(OMNI_PATCHES)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-TAIL_CHARS:] if path.exists() else "(no log)"


def launch(site: Path, out: Path, world_size: int, *worker_args: str) -> list[dict[str, Any]]:
    """Run WORLD_SIZE workers on the tree SITE; the per-rank results they saved, by rank."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world_size),
        PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        VLLM_LOGGING_LEVEL="WARNING",
        OMP_NUM_THREADS="1",
    )
    procs = []
    for rank in range(world_size):
        log = (out / f"rank{rank}.log").open("w")
        cmd = [sys.executable, str(WORKER), *worker_args, "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    codes = wait_ranks(procs, LAUNCH_TIMEOUT_S)
    if any(code != 0 for code in codes):
        logs = "\n".join(f"--- rank {r} (exit {c}) ---\n{_tail(out / f'rank{r}.log')}" for r, c in enumerate(codes))
        raise AssertionError(f"SP workers failed: {' '.join(worker_args)}\n{logs}")
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    for result in results:
        assert Path(result["vllm_omni_file"]).resolve().is_relative_to(site.resolve()), (
            f"worker imported vllm-omni from {result['vllm_omni_file']}, not from the tree under test {site}"
        )
    return results


@pytest.fixture(scope="session")
def pristine_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_target(tmp_path_factory.mktemp("omni") / "pristine", omni_release())


@pytest.fixture(scope="session")
def patch_set(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The patch set the patched tree gets: None (the built-in one), or with ERNIE_SP_PORT_FROM a copy
    whose omni-sp-transformer variant for the release under test is the one `port` made."""
    if not PORT_FROM:
        return None
    from ernie_patcher.authoring.port import PortRequest, port_patch
    from ernie_patcher.patchset.series import load_series
    from tests.support.patchsets import builtin_copy

    name, release = omni_release()
    covering = tuple(v.file for v in load_series().variants(PORTED) if v.covers(release))
    patches = builtin_copy(tmp_path_factory.mktemp("ported") / "set", drop=covering)
    ported = port_patch(PortRequest(PORTED, release, from_version=PORT_FROM, from_wheel=wheel(name, PORT_FROM),
                                    to_wheel=wheel(name, release), patches=patches))
    if ported.error is not None:
        raise pytest.UsageError(f"port of {PORTED} from {PORT_FROM} onto {release} stopped: {ported.error.reason}: "
                                + "; ".join(ported.error.details))
    return patches


@pytest.fixture(scope="session")
def patched_site(tmp_path_factory: pytest.TempPathFactory, patch_set: Path | None) -> Path:
    site = install_target(tmp_path_factory.mktemp("omni") / "patched", omni_release())
    apply_patches(site, selected_patches(), patch_set)
    return site


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, pristine_site: Path, patched_site: Path):
    """runs(name) -> per-rank results of one named multi-process run, started on first use."""
    plans: dict[str, tuple[Path, int, tuple[str, ...]]] = {
        "patched-sp1": (
            patched_site,
            1,
            ("--sp", "1", "--modes", f"{ALL_MODES},npu-sdpa-bf16", "--latents", "--cache-dit", "--mask-cases"),
        ),
        "patched-sp2": (patched_site, 2, ("--sp", "2", "--modes", ALL_MODES, "--latents", "--pipeline", "--cache-dit")),
        "patched-sp4": (patched_site, 4, ("--sp", "4", "--modes", ALL_MODES)),
        "patched-cfg2-sp2": (patched_site, 4, ("--sp", "2", "--cfg", "2", "--modes", "npu", "--latents", "--pipeline")),
        "pristine-sp1": (pristine_site, 1, ("--sp", "1", "--modes", "cuda")),
        "pristine-sp2": (pristine_site, 2, ("--sp", "2", "--modes", "cuda")),
    }
    done: dict[str, list[dict[str, Any]] | Exception] = {}

    def run(name: str) -> list[dict[str, Any]]:
        if name not in done:
            site, world_size, args = plans[name]
            try:
                done[name] = launch(site, tmp_path_factory.mktemp(name), world_size, *args)
            except Exception as failure:
                done[name] = failure
        outcome = done[name]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return run

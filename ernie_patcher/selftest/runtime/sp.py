"""The sequence-parallel check: vllm-omni's patched ERNIE-Image transformer at SP=N against SP=1.

N worker processes (sp_worker.py) form one Ulysses group over the device's collective backend (HCCL on
an NPU, gloo on the CPU with a stand-in platform), one more runs SP=1; every rank's gathered output is
compared with the SP=1 output. The workers are started with this interpreter, `-I`, and the same
sys.path entries for this package and --site, so they import exactly what the selftest imports.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checks import CheckResult, Skip, measured
from .device import Device

DEFAULT_WORKER_TIMEOUT_S = 600.0  # ernie-patch passes the timeout its settings read (options["sp_timeout"])
# Relative bar (max abs difference / max |SP=1 output|), float32. Both runs execute the same ops on the
# same device in the same precision; Ulysses SP only moves tokens and heads between ranks (all-to-all is
# exact) and pads the sequence, and every op but attention is per token. What may differ is the
# accumulation order a kernel picks for the shorter per-rank shapes: a few roundings, each below 2^-11
# even if float32 matmuls or convolutions run in HF32 (11 significant bits). Measured on the CPU: 0. With
# the attention mask dropped at SP > 1 (a broken Ulysses path) the tiny model moves by 4.9e-3: 10x the bar.
SP_RELATIVE_BAR = 2.0**-11


def skip_reason(device: Device, sp_size: int | None) -> str | None:
    """Why the SP check cannot run here, or None when it can."""
    if not sp_size:
        return "not requested (--sp N runs vllm-omni's ERNIE-Image transformer at SP=N vs SP=1)"
    if sp_size < 2:
        return f"--sp {sp_size}: sequence parallelism needs N >= 2"
    if importlib.util.find_spec("vllm_omni") is None:
        return "vllm_omni is not installed here"
    if not device.fake and device.count < sp_size:
        return f"--sp {sp_size} needs {sp_size} NPUs, {device.count} visible"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bootstrap() -> str:
    """The -c program of a worker: this package's parent and --site on sys.path, then the worker."""
    return ("import json, sys, runpy; sys.path[:0] = [p for p in json.loads(sys.argv[1]) if p]; "
            f"sys.argv[1:2] = []; runpy.run_module('{__package__}.sp_worker', run_name='__main__')")


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> list[int | str]:
    """Each rank's exit code, in order; "timeout" for one still running after TIMEOUT s, when
    every rank is killed (the others wait on it in a collective)."""
    codes: list[int | str] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            codes.append("timeout")
    return codes


def _launch(world: int, device: Device, site: str | None, out: Path, timeout: float) -> list[dict[str, Any]]:
    """WORLD workers at SP=WORLD; the result each saved (rank order)."""
    root = str(Path(__file__).resolve().parents[len(__package__.split("."))])
    paths = json.dumps([site or "", root])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               VLLM_LOGGING_LEVEL="WARNING", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        log = (out / f"sp{world}-rank{rank}.log").open("w")
        args = [sys.executable, "-I", "-B", "-c", _bootstrap(), paths, json.dumps({"device": device.kind, "out": str(out)})]
        procs.append(subprocess.Popen(args, env={**env, "RANK": str(rank)}, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT))
    codes = wait_ranks(procs, timeout)
    if any(code != 0 for code in codes):
        tail = (out / f"sp{world}-rank0.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise AssertionError(f"SP={world} workers failed (exit codes {codes}): {' | '.join(tail)}")
    return [torch.load(out / f"sp{world}-rank{rank}.pt", weights_only=True) for rank in range(world)]


def check_sp(device: Device, sp_size: int | None, site: str | None, timeout: float | None = None) -> CheckResult:
    """SP=N against SP=1 on the patched vllm-omni, or skipped with the reason; each group of workers
    has TIMEOUT seconds."""
    reason = skip_reason(device, sp_size)
    if reason is not None:
        raise Skip(reason)
    assert sp_size is not None
    with tempfile.TemporaryDirectory(prefix="ernie-patch-selftest-sp-") as tmp:
        out = Path(tmp)
        (single,) = _launch(1, device, site, out, timeout or DEFAULT_WORKER_TIMEOUT_S)
        ranks = _launch(sp_size, device, site, out, timeout or DEFAULT_WORKER_TIMEOUT_S)
    reference = single["output"]
    error = max((rank["output"].double() - reference.double()).abs().max().item() for rank in ranks)
    relative = error / reference.abs().max().item()
    exchanges = min(int(rank["all_to_all"]) for rank in ranks)
    if exchanges == 0:
        raise AssertionError(f"SP={sp_size}: no all-to-all exchange took place: the run was not sequence-parallel")
    backend = "gloo (CPU platform reporting NPU)" if device.fake else "hccl"
    return measured("sp", relative, SP_RELATIVE_BAR, "rel",
                     f"vllm-omni ErnieImageTransformer2DModel SP={sp_size} vs SP=1 over {backend}, "
                     f"{exchanges} all-to-all exchanges per rank, every rank's output compared, float32")

"""Entry point of the selftest in the target interpreter: one JSON argument in, one JSON document out.

    python -I -c <bootstrap> DIR '{"device": "auto", "dtype": "bf16", "sp": 0, "site": null}'

Anything a library prints goes to stderr: file descriptor 1 is pointed at stderr for the whole run and
the document alone is written to the original stdout at the end.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

SCHEMA = 1


def _document(options: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    document: dict[str, Any] = {"schema": SCHEMA, "python": sys.executable,
                                "python_version": platform.python_version(), "error": None,
                                "device": None, "dtype": options["dtype"], "versions": {}, "checks": []}
    try:
        import torch
    except ImportError as exc:
        document["error"] = f"torch does not import in {sys.executable}: {exc}"
        return document
    from . import checks, diffusers_setup, sp
    from .device import DeviceUnavailable, open_device

    torch.manual_seed(checks.SEED)
    try:
        device = open_device(options["device"])
    except DeviceUnavailable as exc:
        document["error"] = f"--device npu: no usable NPU in {sys.executable}: {exc}"
        return document
    document["device"], document["versions"] = device.description, device.versions
    dtype = checks.DTYPES[options["dtype"]]
    diffusers_setup.prepare(device)
    document["error"] = checks.unapplied()
    if document["error"]:
        document["hint"] = "run `ernie-patch apply` for this interpreter's environment, then selftest"
        return document
    results = [checks.run_one(name, thunk) for name, thunk in checks.planned_checks(device, dtype)]
    results.append(checks.run_one("sp", lambda: sp.check_sp(device, options["sp"], options.get("site"),
                                                            options.get("sp_timeout"))))
    document["checks"] = [result.to_dict() for result in results]
    document["seconds"] = round(time.monotonic() - started, 3)
    return document


def main(argv: list[str]) -> int:
    options = json.loads(argv[0])
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if options.get("site"):
        sys.path.insert(0, options["site"])
    if options.get("threads"):
        import torch

        torch.set_num_threads(int(options["threads"]))
    document = _document(options)
    out.write(json.dumps(document, allow_nan=False, default=str) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

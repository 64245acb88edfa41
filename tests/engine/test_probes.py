"""Each probe kind, and `absent`, on small sources: the fact present passes, missing fails."""
from __future__ import annotations

import pytest

from ernie_patcher.patchset.probes import run_probe
from ernie_patcher.patchset.series import ProbeSpec

SOURCE = b'''
import torch.distributed as dist
from .sp import all_to_all_4D

class Proc:
    def __call__(self, attn, hidden):
        dist.broadcast(hidden, src=0)
        return all_to_all_4D(hidden, "heads")

if True:
    def guarded(x, y):
        return "laser"
'''

CASES = [
    (ProbeSpec("m.py", "class", name="Proc"), ProbeSpec("m.py", "class", name="Other")),
    (ProbeSpec("m.py", "method", name="Proc.__call__", params=("self", "attn", "hidden")),
     ProbeSpec("m.py", "method", name="Proc.__call__", params=("self", "attn"))),
    (ProbeSpec("m.py", "function", name="guarded", params=("x", "y")), ProbeSpec("m.py", "function", name="absent_fn")),
    (ProbeSpec("m.py", "call", name="dist.broadcast", within="Proc.__call__"),
     ProbeSpec("m.py", "call", name="broadcast", within="guarded")),
    (ProbeSpec("m.py", "string", value="laser", within="guarded"), ProbeSpec("m.py", "string", value="laser", within="Proc")),
    (ProbeSpec("m.py", "import", name="all_to_all_4D"), ProbeSpec("m.py", "import", name="npu_rotary_mul")),
]


@pytest.mark.parametrize("present, missing", CASES, ids=[c[0].kind for c in CASES])
def test_probe_passes_when_the_fact_holds_and_fails_when_it_does_not(present, missing):
    assert run_probe(present, SOURCE).passed
    assert not run_probe(missing, SOURCE).passed


def test_absent_inverts_and_a_missing_file_fails_unless_absent():
    gone = ProbeSpec("m.py", "function", name="absent_fn", absent=True)
    assert run_probe(gone, SOURCE).passed
    assert not run_probe(ProbeSpec("m.py", "class", name="Proc", absent=True), SOURCE).passed
    assert not run_probe(ProbeSpec("m.py", "class", name="Proc"), None).passed
    assert run_probe(gone, None).passed


def test_a_file_that_does_not_parse_fails_every_probe():
    assert not run_probe(ProbeSpec("m.py", "class", name="Proc"), b"class Proc(:\n").passed

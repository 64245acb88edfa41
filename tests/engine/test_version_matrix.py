"""`make matrix` (bench/version_matrix.py) on a machine whose SP results cache is empty keeps the SP
numerics the tracked bench/MATRIX.md records: it never rewrites a measured cell as 'not measured'."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from support.cli import ROOT


@pytest.fixture
def matrix_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("version_matrix", ROOT / "bench" / "version_matrix.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SP_RESULTS", tmp_path / "no-sp-results")  # a machine without SP tier runs
    return module


def test_matrix_keeps_measured_sp_cells_without_results(matrix_module, tmp_path: Path):
    tracked = ROOT / "bench" / "MATRIX.md"
    recorded = matrix_module.recorded_sp_cells(tracked)
    assert set(recorded) == {"0.20.0", "0.22.0", "0.24.0", "0.26.0", "0.28.0", "0.30.0"}
    assert all(cell.startswith("✅") for cell in recorded.values()), recorded
    assert [matrix_module.sp_numerics(v, recorded) for v in recorded] == list(recorded.values())
    assert matrix_module.sp_numerics("0.99.0", recorded) == "not measured"


def test_matrix_without_an_earlier_file_says_not_measured(matrix_module, tmp_path: Path):
    assert matrix_module.recorded_sp_cells(tmp_path / "none.md") == {}
    copy = tmp_path / "MATRIX.md"
    shutil.copyfile(ROOT / "bench" / "MATRIX.md", copy)
    copy.write_text(copy.read_text().replace("| SP numerics", "| sp removed"))
    assert matrix_module.recorded_sp_cells(copy) == {}
    assert matrix_module.sp_numerics("0.30.0", {}) == "not measured"

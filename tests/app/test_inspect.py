"""`medreport inspect`: text and JSON output, clean failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from app.cli import main

CT5N_PARENT = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests", "98892001")


def test_inspect_json(capsys):
    assert main(["inspect", CT5N_PARENT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [5, 16, 16]
    assert out["spacing_mm"][0] == pytest.approx(2.5)
    assert out["modality"] == "CT" and out["hu_min"] < out["hu_max"]
    assert out["series_uid"] and out["skipped_series"][0]["reason"].startswith("localizer")
    assert isinstance(out["warnings"], list)


def test_inspect_text(capsys):
    assert main(["inspect", CT5N_PARENT]) == 0
    out = capsys.readouterr().out
    assert "5 x 16 x 16" in out and "localizer" in out and "HU" in out


def test_inspect_bad_input_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"not dicom at all" * 20)
    r = subprocess.run([sys.executable, "-m", "app.cli", "inspect", str(bad)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert r.returncode == 2
    assert "not a DICOM file" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""

"""UI handlers as plain functions, and the Blocks app builds (app/ui.py)."""
from __future__ import annotations

import numpy as np
import pytest

from app.ui import build_app, list_examples, load_for_viewer, render_slice
from data.errors import MedreportError


def test_examples_are_listed_and_load(repo_root):
    ex = list_examples(repo_root / "examples")
    assert len(ex) >= 3
    st = load_for_viewer(str(ex[0]))
    assert st.facts["modality"] == "CT" and len(st.facts["shape_zyx"]) == 3
    # de-identified: no UID or patient field among the facts shown
    flat = repr(st.facts).lower()
    assert "patientname" not in flat and st.study.study_uid not in repr(st.facts)


def test_windows_render_differently(repo_root):
    st = load_for_viewer(str(list_examples(repo_root / "examples")[0]))
    z = st.study.volume.shape[0] // 2
    lung, bone = render_slice(st, z, "lung"), render_slice(st, z, "bone")
    assert lung.dtype == np.uint8 and lung.shape == st.study.volume.shape[1:]
    assert np.abs(lung.astype(int) - bone.astype(int)).mean() > 5
    assert render_slice(None, 0, "lung") is None
    assert render_slice(st, 10_000, "lung").shape == lung.shape  # z clipped, no IndexError


def test_empty_and_bad_uploads_give_clear_errors(tmp_path):
    with pytest.raises(MedreportError, match="Nothing was uploaded"):
        load_for_viewer(None)
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(MedreportError):
        load_for_viewer([str(bad)])


def test_app_builds(repo_root):
    app = build_app(repo_root / "examples")
    assert app is not None

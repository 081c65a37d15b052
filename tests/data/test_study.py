"""Study folders: companions, skipped files, dispatch by format, list inputs, errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _io_dicom import write_ct_series  # noqa: E402

from data.errors import EmptyStudyError, MultipleStudiesError, StudyError  # noqa: E402
from data.study import Study, StudyFiles, find_study_files, load_study  # noqa: E402


def _study_folder(tmp_path: Path) -> tuple[Path, object]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(4, 8, 8)).astype(np.float32)
    w = write_ct_series(tmp_path / "st" / "DICOM" / "S1", hu, rng=rng)
    (tmp_path / "st" / "history.txt").write_text("Cough for 3 weeks.")
    (tmp_path / "st" / "dictation.wav").write_bytes(b"RIFF....WAVE")
    (tmp_path / "st" / "reference.json").write_text("{}")
    (tmp_path / "st" / "History.docx").write_bytes(b"PK\3\4")
    (tmp_path / "st" / "readme.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "st" / ".DS_Store").write_bytes(b"x")
    return tmp_path / "st", w


def test_find_study_files_roles(tmp_path):
    folder, w = _study_folder(tmp_path)
    sf = find_study_files(folder)
    assert isinstance(sf, StudyFiles)
    assert sf.history.name == "history.txt" and sf.dictation.name == "dictation.wav" and sf.reference.name == "reference.json"
    assert sorted(sf.images) == sorted(w.files)
    reasons = {p.name: r for p, r in sf.ignored}
    assert "use .md, .pdf, .txt" in reasons["History.docx"]
    assert reasons["readme.pdf"] == "not an image file"
    assert ".DS_Store" in reasons


def test_companions_never_reach_the_image_loader(tmp_path, monkeypatch):
    folder, w = _study_folder(tmp_path)
    import data.dicom

    seen = []
    real = data.dicom.read_header
    monkeypatch.setattr(data.dicom, "read_header", lambda p, r: seen.append(p.name) or real(p, r))
    study = load_study(folder)
    assert isinstance(study, Study)
    np.testing.assert_array_equal(study.volume, w.hu)
    assert not {"history.txt", "dictation.wav", "reference.json", "History.docx", "readme.pdf"} & set(seen)
    assert any("non-image" in m for m in study.warnings)
    assert {f["file"] for f in study.skipped_files} >= {"History.docx", "readme.pdf"}


def test_list_of_files(tmp_path):
    folder, w = _study_folder(tmp_path)
    study = load_study([*w.files, folder / "history.txt"])
    np.testing.assert_array_equal(study.volume, w.hu)
    assert any(f["file"] == "history.txt" or f["file"].endswith("history.txt") for f in study.skipped_files)


def test_empty_inputs(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(EmptyStudyError, match="no image files"):
        load_study(tmp_path / "e")
    with pytest.raises(EmptyStudyError):
        load_study([])
    with pytest.raises(EmptyStudyError, match="does not exist"):
        load_study(tmp_path / "nope")
    (tmp_path / "zero.dcm").write_bytes(b"")
    with pytest.raises(EmptyStudyError, match="0 bytes"):
        load_study(tmp_path / "zero.dcm")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("x")
    with pytest.raises(EmptyStudyError, match="1 other files"):
        load_study(tmp_path / "t")


def test_folder_of_non_dicom_files(tmp_path):
    (tmp_path / "x1").write_bytes(b"nope" * 100)
    (tmp_path / "x2").write_bytes(b"nope" * 100)
    with pytest.raises(StudyError, match="none of the 2 files"):
        load_study(tmp_path)


def test_two_niftis_refused(tmp_path):
    nib = pytest.importorskip("nibabel")
    for n in ("a.nii", "b.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(tmp_path / n))
    with pytest.raises(MultipleStudiesError, match="2 NIfTI"):
        load_study(tmp_path)


def test_dicom_preferred_over_png_in_same_folder(tmp_path):
    from PIL import Image

    folder, w = _study_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "shot.png")
    study = load_study(folder)
    assert study.source_format == "dicom"
    assert any(f["file"] == "shot.png" for f in study.skipped_files)


def test_summary_keys(tmp_path):
    folder, w = _study_folder(tmp_path)
    s = load_study(folder).summary()
    for k in ("shape", "spacing_mm", "hu_min", "hu_max", "modality", "series_uid", "skipped_series", "warnings"):
        assert k in s
    assert s["shape"] == [4, 8, 8] and s["series_uid"] == w.series_uid
    assert s["hu_min"] == float(w.hu.min()) and s["hu_max"] == float(w.hu.max())

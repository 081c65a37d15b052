"""DICOM loading: pydicom's shipped files, sorting, rescale, picking, multi-frame, compression."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _io_dicom import (  # noqa: E402
    write_ct_series,
    write_enhanced_ct,
    write_localizer,
    write_radiograph,
    write_secondary_capture,
    write_sr,
)

from data.errors import (  # noqa: E402
    InconsistentSlicesError,
    MedreportError,
    MultipleStudiesError,
    NoPixelDataError,
    NotDicomError,
    NoUsableSeriesError,
    PixelDecodeError,
    StudyError,
    StudyTooLargeError,
)
from data.study import LoadLimits, load_study  # noqa: E402

TEST_FILES = os.path.dirname(get_testdata_file("CT_small.dcm"))


def _hu(rng, z=6, y=12, x=10):
    return rng.integers(-1024, 3000, size=(z, y, x)).astype(np.float32)


# ------------------------------------------------------------------ pydicom's own files
@pytest.mark.parametrize("path", sorted(p for p in get_testdata_files() if os.path.isfile(p)),
                         ids=lambda p: os.path.relpath(p, TEST_FILES))
def test_every_pydicom_test_file_loads_or_fails_with_our_error(path):
    try:
        study = load_study(path)
    except StudyError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert study.volume.dtype == np.float32 and study.volume.ndim == 3
    assert np.isfinite(study.volume).all()
    assert len(study.sop_uids) == study.volume.shape[0] == len(study.slice_positions_mm)
    assert study.kind in {"volume", "radiograph"}


def test_enough_pydicom_files_decode():
    ok = 0
    for p in get_testdata_files():
        if os.path.isfile(p):
            try:
                load_study(p)
                ok += 1
            except StudyError:
                pass
    assert ok >= 20


def test_ct5n_sorts_by_position_not_name():
    folder = os.path.join(TEST_FILES, "dicomdirtests", "98892001", "CT5N")
    study = load_study(folder)
    assert study.shape == (5, 16, 16)
    refs = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)]
    refs.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    expected = np.stack([pydicom.pixels.apply_modality_lut(d.pixel_array, d) for d in refs]).astype(np.float32)
    np.testing.assert_array_equal(study.volume, expected)
    assert study.sop_uids == [d.SOPInstanceUID for d in refs]
    assert np.all(np.diff(study.slice_positions_mm) > 0)
    assert study.spacing_mm[0] == pytest.approx(2.5)


def test_ct_small_hu_matches_pydicom():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = load_study(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(study.volume[0], pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert study.spacing_mm[1:] == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))


# ------------------------------------------------------------------ written series
def test_shuffled_names_random_instances_per_slice_intercepts_read_back_exactly(tmp_path):
    rng = np.random.default_rng(3)
    hu = _hu(rng, z=9)
    intercepts = [-1024.0, -1000.0, 0.0, -2048.0, -1024.0, 17.0, -3.0, -1024.0, -500.0]
    w = write_ct_series(tmp_path / "s", hu, rng=rng, intercepts=intercepts,
                        positions_mm=rng.permutation(np.arange(9) * 2.5))
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, w.hu)
    assert study.sop_uids == w.sop_uids
    assert study.series_uid == w.series_uid and study.study_uid == w.study_uid
    np.testing.assert_allclose(study.slice_positions_mm, w.positions + 50.0)
    assert study.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert study.warnings == []
    assert study.source_format == "dicom" and study.kind == "volume" and study.modality == "CT"
    np.testing.assert_allclose(study.direction, np.eye(3))
    assert study.origin_mm == pytest.approx((-100.0, -120.0, 50.0))


def test_slope_and_large_values_do_not_overflow_int16(tmp_path):
    # stored 30000 * slope 2 + 1000 = 61000 HU-units: far outside int16, exact in float32.
    hu = np.full((3, 4, 4), 61000.0, dtype=np.float32)
    hu[1] = -2000.0
    w = write_ct_series(tmp_path / "s", hu, intercepts=[1000.0, 0.0, 1000.0], slopes=[2.0, 1.0, 2.0])
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, w.hu)


def test_reversed_feet_first_orientation_sorts_along_normal(tmp_path):
    rng = np.random.default_rng(5)
    hu = _hu(rng, z=5)
    # rows along -x (patient right), columns along +y: normal = -z
    w = write_ct_series(tmp_path / "s", hu, rng=rng, iop=(-1, 0, 0, 0, 1, 0))
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, w.hu)
    np.testing.assert_allclose(study.direction[:, 2], [0, 0, -1])
    assert np.all(np.diff(study.slice_positions_mm) > 0)


def test_missing_duplicate_uneven_and_tilt_are_reported(tmp_path):
    rng = np.random.default_rng(6)
    hu = _hu(rng, z=6)
    write_ct_series(tmp_path / "gap", hu, rng=rng, positions_mm=[0, 2.5, 5, 7.5, 15, 17.5])
    assert any("missing" in w for w in load_study(tmp_path / "gap").warnings)
    write_ct_series(tmp_path / "dup", hu, rng=rng, positions_mm=[0, 2.5, 2.5, 5, 7.5, 10])
    s = load_study(tmp_path / "dup")
    assert any("duplicate" in w for w in s.warnings) and s.shape[0] == 5
    write_ct_series(tmp_path / "uneven", hu, rng=rng, positions_mm=[0, 2.5, 5.5, 7.5, 10, 12.5])
    assert any("uneven" in w for w in load_study(tmp_path / "uneven").warnings)
    write_ct_series(tmp_path / "tilt", hu, rng=rng, gantry_tilt_step=(0, 0.5, 0))
    assert any("gantry tilt" in w for w in load_study(tmp_path / "tilt").warnings)


def test_without_positions_falls_back_to_instance_number(tmp_path):
    rng = np.random.default_rng(7)
    hu = _hu(rng, z=4)
    write_ct_series(tmp_path / "s", hu, rng=rng, with_positions=False, random_instance=False)
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, hu)
    assert any("InstanceNumber" in w for w in study.warnings)


def test_localizer_two_ct_series_and_sr_pick_the_right_one(tmp_path):
    rng = np.random.default_rng(8)
    study_uid = pydicom.uid.generate_uid()
    write_localizer(tmp_path / "loc" / "a", study_uid)
    write_localizer(tmp_path / "loc" / "b", study_uid)
    thin = write_ct_series(tmp_path / "thin", _hu(rng, z=12), rng=rng, study_uid=study_uid, series_number=3,
                           description="Chest 1mm")
    write_ct_series(tmp_path / "thick", _hu(rng, z=4), rng=rng, study_uid=study_uid, series_number=4,
                    description="Chest 5mm")
    write_ct_series(tmp_path / "mip", _hu(rng, z=20), rng=rng, study_uid=study_uid, series_number=5,
                    description="MIP", image_type=("DERIVED", "SECONDARY", "AXIAL"))
    write_ct_series(tmp_path / "cor", _hu(rng, z=30), rng=rng, study_uid=study_uid, series_number=6,
                    description="Coronal", iop=(1, 0, 0, 0, 0, -1))
    write_sr(tmp_path / "sr.dcm", study_uid)
    write_secondary_capture(tmp_path / "sc.dcm", study_uid)
    (tmp_path / "notes.xml").write_text("<x/>")
    study = load_study(tmp_path)
    assert study.series_uid == thin.series_uid
    np.testing.assert_array_equal(study.volume, thin.hu)
    reasons = {s["description"]: s["reason"] for s in study.skipped_series}
    assert "localizer" in reasons["Topogram 0.6 T20f"]
    assert "structured report" in reasons["Dose Report"]
    assert "secondary capture" in reasons["Patient Protocol"]
    assert "not chosen" in reasons["Chest 5mm"] and "not chosen" in reasons["MIP"] and "non-axial" in reasons["Coronal"]
    assert "12 images" in study.picked_reason
    assert any(f["file"] == "notes.xml" for f in study.skipped_files)


def test_only_unusable_series_lists_what_was_found(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_localizer(tmp_path / "loc", uid)
    write_sr(tmp_path / "sr", uid)
    with pytest.raises(NoUsableSeriesError, match="localizer") as ei:
        load_study(tmp_path)
    assert "structured report" in str(ei.value)


def test_sr_alone_is_no_pixel_data(tmp_path):
    write_sr(tmp_path / "sr.dcm", pydicom.uid.generate_uid())
    with pytest.raises(NoPixelDataError, match="no pixel data"):
        load_study(tmp_path / "sr.dcm")


def test_several_studies_refused_without_uids(tmp_path):
    rng = np.random.default_rng(9)
    ws = [write_ct_series(tmp_path / f"s{i}", _hu(rng, z=3), rng=rng) for i in range(3)]
    with pytest.raises(MultipleStudiesError) as ei:
        load_study(tmp_path)
    msg = str(ei.value)
    assert msg.startswith("3 studies found: put each in its own folder")
    for w in ws:
        assert w.study_uid not in msg and w.series_uid not in msg


def test_inconsistent_slice_sizes(tmp_path):
    rng = np.random.default_rng(10)
    w = write_ct_series(tmp_path / "s", _hu(rng, z=4, y=8, x=8), rng=rng)
    ds = pydicom.dcmread(w.files[0])
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.zeros((4, 4), "<i2").tobytes()
    ds.save_as(w.files[0])
    with pytest.raises(InconsistentSlicesError, match="4x4"):
        load_study(tmp_path / "s")


def test_truncated_pixel_data_is_a_decode_error(tmp_path):
    with pytest.raises(PixelDecodeError, match="re-export"):
        load_study(get_testdata_file("MR_truncated.dcm"))


def test_not_dicom(tmp_path):
    p = tmp_path / "scan.dcm"
    p.write_bytes(b"hello, I am not DICOM" * 10)
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        load_study(p)


def test_volume_limit(tmp_path):
    rng = np.random.default_rng(11)
    write_ct_series(tmp_path / "s", _hu(rng, z=4), rng=rng)
    with pytest.raises(StudyTooLargeError, match="GiB"):
        load_study(tmp_path / "s", limits=LoadLimits(max_volume_bytes=100))


def test_enhanced_multiframe_ct(tmp_path):
    rng = np.random.default_rng(12)
    hu = _hu(rng, z=7)
    intercepts = [-1024.0, -1000.0, 0.0, -2048.0, -1024.0, 5.0, -1024.0]
    expected, series_uid = write_enhanced_ct(tmp_path / "mf.dcm", hu, intercepts=intercepts, rng=rng)
    study = load_study(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(study.volume, expected)
    assert study.source_format == "dicom-multiframe"
    assert study.spacing_mm == pytest.approx((3.0, 0.8, 0.8))
    assert study.series_uid == series_uid
    np.testing.assert_allclose(study.slice_positions_mm, 10.0 + np.arange(7) * 3.0)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian],
                         ids=lambda u: u.name)
def test_compressed_series_read_back_exactly(tmp_path, syntax):
    rng = np.random.default_rng(13)
    hu = _hu(rng, z=3, y=64, x=64)
    w = write_ct_series(tmp_path / "s", hu, rng=rng)
    for f in w.files:
        ds = pydicom.dcmread(f)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(f, enforce_file_format=True)
        else:
            ds.compress(syntax)
            ds.save_as(f, enforce_file_format=True)
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == syntax
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, w.hu)


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_16.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "693_J2KI.dcm"])
def test_shipped_compressed_syntaxes_decode(name):
    from data.dicom import _decode, read_header

    path = get_testdata_file(name)
    ref = pydicom.dcmread(path).pixel_array
    ds, why = read_header(Path(path), name)
    assert why is None
    np.testing.assert_array_equal(_decode(ds, name), ref)
    try:
        study = load_study(path)
    except NoUsableSeriesError as exc:  # secondary captures / modality-less test images are refused by design
        assert "secondary capture" in str(exc) or "modality" in str(exc)
        return
    ds = pydicom.dcmread(path)
    ref = pydicom.pixels.apply_modality_lut(ref, ds).astype(np.float32)
    np.testing.assert_array_equal(study.volume[0], ref.reshape(study.volume.shape[1:]))


def test_radiograph_monochrome1_inverted(tmp_path):
    stored = np.tile(np.arange(64, dtype=np.uint16)[None] * 60, (32, 1))
    sop = write_radiograph(tmp_path / "m2" / "a.dcm", stored)
    write_radiograph(tmp_path / "m1" / "a.dcm", stored, monochrome1=True)
    a, b = load_study(tmp_path / "m2"), load_study(tmp_path / "m1")
    assert a.kind == b.kind == "radiograph" and a.shape == (1, 32, 64)
    assert a.sop_uids == [sop]
    assert a.volume[0, 0, 0] < a.volume[0, 0, -1] and b.volume[0, 0, 0] > b.volume[0, 0, -1]
    np.testing.assert_allclose(a.volume, 1.0 - b.volume, atol=1e-6)
    assert 0.0 <= a.volume.min() and a.volume.max() <= 1.0
    assert a.spacing_mm[1:] == (0.2, 0.2)


def test_radiograph_views_are_z(tmp_path):
    uid = pydicom.uid.generate_uid()
    write_radiograph(tmp_path / "pa.dcm", np.arange(32 * 32, dtype=np.uint16).reshape(32, 32), study_uid=uid)
    write_radiograph(tmp_path / "lat.dcm", np.arange(16 * 24, dtype=np.uint16).reshape(16, 24), study_uid=uid)
    study = load_study(tmp_path)
    assert study.kind == "radiograph" and study.shape[0] == 2
    assert any("resized" in w for w in study.warnings)


def test_metadata_and_repr_have_no_identifiers(tmp_path, caplog):
    rng = np.random.default_rng(14)
    w = write_ct_series(tmp_path / "s", _hu(rng, z=3), rng=rng)
    with caplog.at_level(logging.DEBUG):
        study = load_study(tmp_path / "s")
    text = repr(study.metadata) + repr(study) + caplog.text + repr(study.skipped_series) + repr(study.warnings)
    for secret in ("Doe", "SECRET-ID-123", "19700101", "ACC-999", "General Hospital", w.study_uid, w.series_uid, w.sop_uids[0]):
        assert secret not in text
    assert study.metadata["kvp"] == 120 and study.metadata["manufacturer"] == "ACME"
    assert study.metadata["patient_age_years"] == 54 and study.metadata["patient_sex"] == "F"


def test_errors_are_one_family():
    assert issubclass(StudyError, MedreportError)
    for cls in (InconsistentSlicesError, MultipleStudiesError, NoPixelDataError, NotDicomError,
                NoUsableSeriesError, PixelDecodeError, StudyTooLargeError):
        assert issubclass(cls, StudyError)


@pytest.mark.integration
def test_pydicom_data_package_files_if_installed():
    pd = pytest.importorskip("pydicom_data", reason="optional PyPI package pydicom-data not installed (not needed in CI)")
    root = Path(pd.__file__).parent
    files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size < 50 << 20]
    assert files, "pydicom-data is installed but holds no files: reinstall it (pip install --force-reinstall pydicom-data)"
    for p in files[:400]:
        try:
            s = load_study(p)
            assert np.isfinite(s.volume).all()
        except MedreportError:
            pass


def test_copy_of_folder_with_nested_dirs(tmp_path):
    src = os.path.join(TEST_FILES, "dicomdirtests", "98892001")
    shutil.copytree(src, tmp_path / "a" / "b")
    study = load_study(tmp_path)
    assert study.shape == (5, 16, 16)
    assert any("localizer" in s["reason"] for s in study.skipped_series)

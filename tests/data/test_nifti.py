"""NIfTI loading: HU values, (z, y, x) layout and the LPS convention shared with DICOM."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _io_dicom import write_ct_series  # noqa: E402

from data.errors import PixelDecodeError, StudyTooLargeError  # noqa: E402
from data.study import LoadLimits, load_study  # noqa: E402


def test_ras_identity_affine_becomes_lps_convention(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)   # (i, j, k)
    aff = np.diag([0.7, 0.8, 2.5, 1.0])                               # RAS: i -> R... is +x (left->?); nibabel RAS+
    aff[:3, 3] = [10, 20, 30]
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "v.nii.gz"))
    s = load_study(tmp_path / "v.nii.gz")
    assert s.source_format == "nifti" and s.kind == "volume" and s.modality == "CT"
    assert s.shape == (6, 5, 4)
    assert s.spacing_mm == pytest.approx((2.5, 0.8, 0.7))
    # Every voxel's LPS position must match the original affine's (RAS -> LPS flips x, y).
    for (k, j, i) in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = np.asarray(s.origin_mm) + s.direction @ (np.array([i, j, k]) * np.array(s.spacing_mm[::-1]))
        # find the original voxel with that value
        val = s.volume[k, j, i]
        oi, oj, ok = np.argwhere(data == val)[0]
        ras = aff[:3, :3] @ np.array([oi, oj, ok]) + aff[:3, 3]
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-6)
    # x toward patient left, y toward posterior, z toward superior
    assert s.direction[0, 0] > 0 and s.direction[1, 1] > 0 and s.direction[2, 2] > 0
    assert np.all(np.diff(s.slice_positions_mm) > 0)


def test_nifti_matches_dicom_geometry(tmp_path):
    """The same volume written as DICOM and as an equivalent NIfTI loads identically."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, size=(5, 6, 7)).astype(np.float32)    # (z, y, x)
    write_ct_series(tmp_path / "d", hu, rng=rng, spacing=(2.0, 0.5, 0.6), origin=(-10.0, -20.0, 30.0))
    d = load_study(tmp_path / "d")
    # DICOM LPS affine of (x, y, z) index -> LPS; NIfTI wants RAS.
    lps_aff = np.eye(4)
    lps_aff[:3, :3] = d.direction * np.array(d.spacing_mm[::-1])[None]
    lps_aff[:3, 3] = d.origin_mm
    ras_aff = np.diag([-1, -1, 1, 1]) @ lps_aff
    nib.save(nib.Nifti1Image(d.volume.transpose(2, 1, 0).astype(np.int16), ras_aff), str(tmp_path / "v.nii"))
    n = load_study(tmp_path / "v.nii")
    np.testing.assert_array_equal(n.volume, d.volume)
    np.testing.assert_allclose(n.direction, d.direction, atol=1e-6)
    np.testing.assert_allclose(n.origin_mm, d.origin_mm, atol=1e-4)
    np.testing.assert_allclose(n.spacing_mm, d.spacing_mm, atol=1e-6)
    np.testing.assert_allclose(n.slice_positions_mm, d.slice_positions_mm, atol=1e-4)


def test_scl_slope_applied(tmp_path):
    img = nib.Nifti1Image(np.full((3, 3, 3), 100, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "v.nii"))
    s = load_study(tmp_path / "v.nii")
    assert np.all(s.volume == 2 * 100 - 1024)


def test_corrupt_and_too_large(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(PixelDecodeError, match="NIfTI"):
        load_study(tmp_path / "bad.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(tmp_path / "v.nii"))
    with pytest.raises(StudyTooLargeError):
        load_study(tmp_path / "v.nii", limits=LoadLimits(max_volume_bytes=100))

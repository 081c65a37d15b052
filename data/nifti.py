"""NIfTI volumes (``.nii``, ``.nii.gz``) via nibabel, in the DICOM loader's convention.

nibabel's affine maps voxel (i, j, k) to RAS+ millimetres. We first reorient the image
(axis permutation and flips only, no resampling) to the closest "LPS" axis codes, so i runs
toward the patient's left, j toward posterior and k toward superior - the layout of an axial
DICOM series sorted by position. Then ``volume = data.transpose(2, 1, 0)`` gives (z, y, x),
and the affine is converted RAS -> LPS (negate the first two rows) so that
``direction[:, 0/1/2]`` are the LPS unit vectors of the x/y/z array axes and ``origin_mm``
the LPS position of voxel [0, 0, 0], exactly as for DICOM.

NIfTI stores no modality: we assume CT (values taken as Hounsfield units after the header's
``scl_slope``/``scl_inter``) and warn when the value range does not look like HU.
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.errors import PixelDecodeError, StudyTooLargeError, UnsupportedFormatError

if TYPE_CHECKING:
    from data.study import LoadLimits, Study

log = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def is_nifti(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith(".nii") or n.endswith(".nii.gz")


def load_nifti(path: Path, limits: "LoadLimits", skipped_files: list[dict] | None = None,
               warnings: list[str] | None = None) -> "Study":
    """Load one NIfTI file as a CT ``Study`` (float32 (z, y, x), LPS geometry)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    from data.study import Study

    warn = list(warnings or [])
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 2 or len(shape) > 5 or min(shape) < 1:
            raise UnsupportedFormatError(f"{path.name} has shape {shape}; expected a 3D volume")
        n_vox = int(np.prod(shape[:3]))
        if n_vox * 4 > limits.max_volume_bytes:
            raise StudyTooLargeError(
                f"{path.name} would need {n_vox * 4 / 2**30:.1f} GiB as float32 (limit "
                f"{limits.max_volume_bytes / 2**30:.1f} GiB); crop or downsample it"
            )
        if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
            warn.append(f"{path.name} is {len(shape)}D {shape}: using the first volume")
            img = img.slicer[..., 0] if len(shape) == 4 else img.slicer[..., 0, 0]
        elif len(shape) > 3:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape[:3]), img.affine, img.header)
        if len(img.shape) == 2:
            img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, img.header)
        affine = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            warn.append("NIfTI affine is missing or singular: assumed 1 mm isotropic, identity orientation")
            img = nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([-1.0, -1.0, 1.0, 1.0]), img.header)
            affine = img.affine
        # (i, j, k) -> closest of L, P, S; permutes/flips axes, never resamples.
        original_codes = "".join(str(c) for c in nib.aff2axcodes(affine))
        ornt = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
        img = img.as_reoriented(ornt)
        data_ijk = img.get_fdata(dtype=np.float32)                  # (i, j, k) = (x, y, z)
    except (StudyTooLargeError, UnsupportedFormatError):
        raise
    except MemoryError:
        raise StudyTooLargeError(f"{path.name}: not enough memory to load the volume") from None
    except (ImageFileError, EOFError, zlib.error, OSError, ValueError, IndexError, TypeError, Exception) as exc:
        raise PixelDecodeError(f"{path.name} could not be read as NIfTI ({exc.__class__.__name__}); re-export it") from None
    volume = np.ascontiguousarray(data_ijk.transpose(2, 1, 0))       # (z, y, x)
    del data_ijk
    if not np.all(np.isfinite(volume)):
        warn.append("non-finite voxel values replaced by the volume minimum")
        finite = volume[np.isfinite(volume)]
        np.nan_to_num(volume, copy=False, nan=float(finite.min()) if finite.size else 0.0,
                      posinf=float(finite.max()) if finite.size else 0.0,
                      neginf=float(finite.min()) if finite.size else 0.0)
    m_lps = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)[:3, :]   # (3, 4)
    spacing_xyz = np.linalg.norm(m_lps[:, :3], axis=0)
    direction = m_lps[:, :3] / np.where(spacing_xyz > 0, spacing_xyz, 1.0)
    origin = m_lps[:, 3]
    z = volume.shape[0]
    positions = origin @ direction[:, 2] + np.arange(z) * spacing_xyz[2]
    vmin, vmax = (float(volume.min()), float(volume.max())) if volume.size else (0.0, 0.0)
    if vmin >= 0 and vmax > 2000:
        warn.append("values look like raw stored values rather than Hounsfield units (no negative values); check the export")
    elif vmax <= 1.0 and vmin >= -1.0:
        warn.append("values lie in [-1, 1]: this NIfTI looks normalised, not in Hounsfield units")
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3 or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        warn.append("NIfTI axes are not orthogonal (sheared affine)")
    return Study(
        volume=volume,
        spacing_mm=(float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0])),
        origin_mm=tuple(float(v) for v in origin),
        direction=direction,
        modality="CT",
        kind="volume",
        series_description="",  # the header's free-text 'descrip' may hold anything: not copied
        study_uid=None, series_uid=None, sop_uids=[None] * z,
        slice_positions_mm=positions.astype(np.float64),
        source_format="nifti",
        picked_reason=f"NIfTI volume {path.name} (modality not stored: assumed CT)",
        skipped_series=[], skipped_files=list(skipped_files or []), warnings=warn,
        metadata={"n_files": 1, "nifti_axcodes_on_disk": original_codes},
    )

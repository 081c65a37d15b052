"""Writers for small synthetic DICOM objects used by the study-loading tests."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def _base(sop_class: str, study_uid: str, series_uid: str, modality: str, ts=ExplicitVRLittleEndian) -> Dataset:
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID-123"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-999"
    ds.InstitutionName = "General Hospital"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    return ds


def _pixels(ds: Dataset, stored: np.ndarray, signed: bool = True) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()


@dataclass
class WrittenSeries:
    hu: np.ndarray                 # (Z, Y, X) expected, sorted along the normal
    sop_uids: list[str]            # in sorted order
    series_uid: str
    study_uid: str
    files: list[Path]
    positions: np.ndarray          # (Z,) along the normal


def write_ct_series(folder: Path, hu: np.ndarray, *, spacing=(2.5, 0.7, 0.7), rng: np.random.Generator | None = None,
                    intercepts=None, slopes=None, study_uid: str | None = None, description: str = "Chest 2.5mm",
                    image_type=("ORIGINAL", "PRIMARY", "AXIAL"), iop=(1, 0, 0, 0, 1, 0), origin=(-100.0, -120.0, 50.0),
                    shuffle_names: bool = True, random_instance: bool = True, series_number: int = 3,
                    with_positions: bool = True, positions_mm=None, signed: bool = True, modality: str = "CT",
                    gantry_tilt_step=None) -> WrittenSeries:
    """Write ``hu`` (Z, Y, X, integer-valued) as single-frame CT files and return the expectation.

    Slice z sits at ``origin + z * spacing[0] * normal`` (or ``positions_mm`` along the normal).
    Per-slice ``intercepts``/``slopes`` are applied so that stored * slope + intercept == hu exactly.
    """
    rng = rng or np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    z = hu.shape[0]
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    iop_a = np.asarray(iop, dtype=float)
    normal = np.cross(iop_a[:3], iop_a[3:])
    pos = np.asarray(positions_mm if positions_mm is not None else np.arange(z) * spacing[0], dtype=float)
    intercepts = intercepts if intercepts is not None else [-1024.0] * z
    slopes = slopes if slopes is not None else [1.0] * z
    names = [f"IM{i:04d}" for i in range(z)]
    if shuffle_names:
        names = list(rng.permutation(names))
    instances = rng.permutation(np.arange(1, z + 1) * 7) if random_instance else np.arange(1, z + 1)
    files, sops = [], []
    for i in range(z):
        ds = _base(CTImageStorage, study_uid, series_uid, modality)
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(instances[i])
        if with_positions:
            p = np.asarray(origin) + pos[i] * normal
            if gantry_tilt_step is not None:
                p = p + i * np.asarray(gantry_tilt_step)
            ds.ImagePositionPatient = [f"{v:.6g}" for v in p]
            ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleSlope = f"{slopes[i]:g}"
        ds.RescaleIntercept = f"{intercepts[i]:g}"
        ds.KVP = 120
        ds.Manufacturer = "ACME"
        ds.ConvolutionKernel = "B30f"
        stored = (hu[i].astype(np.float64) - intercepts[i]) / slopes[i]
        assert np.allclose(stored, np.round(stored)), "hu must be representable"
        _pixels(ds, np.round(stored), signed=signed)
        path = folder / names[i]
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(ds.SOPInstanceUID)
    order = np.argsort(pos, kind="stable")
    return WrittenSeries(hu=hu[order], sop_uids=[sops[o] for o in order], series_uid=series_uid,
                         study_uid=study_uid, files=files, positions=pos[order])


def write_localizer(path: Path, study_uid: str, rows=16, cols=16) -> None:
    ds = _base(CTImageStorage, study_uid, generate_uid(), "CT")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Topogram 0.6 T20f"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImagePositionPatient = [-250, 0, 300]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [1, 1]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    _pixels(ds, np.zeros((rows, cols)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_sr(path: Path, study_uid: str) -> None:
    ds = _base(BASIC_TEXT_SR, study_uid, generate_uid(), "SR")
    ds.SeriesNumber = 99
    ds.SeriesDescription = "Dose Report"
    ds.ValueType = "CONTAINER"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_secondary_capture(path: Path, study_uid: str) -> None:
    ds = _base(SecondaryCaptureImageStorage, study_uid, generate_uid(), "CT")
    ds.SeriesNumber = 999
    ds.SeriesDescription = "Patient Protocol"
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    _pixels(ds, np.zeros((8, 8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_radiograph(path: Path, stored: np.ndarray, *, study_uid: str | None = None, monochrome1: bool = False) -> str:
    ds = _base(DX_STORAGE, study_uid or generate_uid(), generate_uid(), "DX")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Chest PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    _pixels(ds, stored, signed=False)
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def write_enhanced_ct(path: Path, hu: np.ndarray, *, spacing=(3.0, 0.8, 0.8), intercepts=None,
                      rng: np.random.Generator | None = None) -> tuple[np.ndarray, str]:
    """One enhanced multi-frame CT file; frames stored in a shuffled order with per-frame rescale.

    Returns (expected sorted HU volume, series uid).
    """
    rng = rng or np.random.default_rng(1)
    z = hu.shape[0]
    intercepts = intercepts if intercepts is not None else [-1024.0] * z
    perm = rng.permutation(z)                       # frame f holds slice perm[f]
    ds = _base(EnhancedCTImageStorage, generate_uid(), generate_uid(), "CT")
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Enhanced axial"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = z
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [spacing[1], spacing[2]]
    pm.SliceThickness = spacing[0]
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([po])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    frames = np.empty_like(hu, dtype=np.float64)
    for f in range(z):
        s = int(perm[f])
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, 10.0 + s * spacing[0]]
        item.PlanePositionSequence = Sequence([pp])
        pvt = Dataset()
        pvt.RescaleSlope = 1
        pvt.RescaleIntercept = intercepts[s]
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = Sequence([pvt])
        per.append(item)
        frames[f] = hu[s] - intercepts[s]
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    _pixels(ds, frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return hu, ds.SeriesInstanceUID

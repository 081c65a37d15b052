"""Write a phantom as a DICOM CT series (CT Image Storage, explicit VR little endian).

One file per slice, ``IM0001.dcm`` the most superior slice (as scanners number them). Stored
values are HU + 1024 (RescaleIntercept -1024, slope 1), 16 bits allocated, 12 stored. UIDs come
from ``pydicom.uid.generate_uid`` with entropy from the study seed, so the same seed gives the
same files byte for byte. Patient identity is an obvious fake; dates are drawn from the seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from data.synthetic.findings import Case

def _uid(case: Case, *parts: object) -> str:
    # pydicom's root prefix: with prefix=None generate_uid ignores the entropy and is random.
    return generate_uid(entropy_srcs=["medreport-synthetic", str(case.seed), case.id, *map(str, parts)])


def _encoder() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _encode(elem: DataElement) -> bytes:
    fp = _encoder()
    write_data_element(fp, elem)
    return fp.getvalue()


def write_series(case: Case, hu: np.ndarray, spacing: tuple[float, float, float], folder: Path) -> list[Path]:
    """Write ``hu`` (z ascending = inferior -> superior, y, x) as one series in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = hu.shape
    thk, px, _ = spacing
    rng = np.random.default_rng([case.seed, 11])
    year = int(rng.integers(2024, 2027))
    date = f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    study_uid, series_uid, for_uid = _uid(case, "study"), _uid(case, "series"), _uid(case, "frame")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "medreport synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST" + (" WITH CONTRAST" if case.contrast else " WITHOUT CONTRAST")
    ds.SeriesDescription = f"AXIAL {thk:g}MM"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = "SYNTHETIC-" + case.id
    ds.PatientBirthDate = ""
    ds.PatientSex = case.sex
    ds.PatientAge = f"{case.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{thk:g}"
    ds.KVP = str(case.acquisition.get("kvp", 120))
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [f"{px:g}", f"{px:g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    if case.contrast:
        ds.ContrastBolusAgent = "IODINATED CONTRAST"

    x0 = -(nx - 1) / 2 * px
    y0 = -(ny - 1) / 2 * px
    z_top = 0.0
    stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    # Encode the elements shared by every slice once (pydicom's own element writer), then per
    # slice only the few that change; a full Dataset.save_as per slice costs ~8 ms, this ~0.3 ms.
    # The result is byte-identical to save_as(enforce_file_format=True) (tests check it).
    dynamic = {0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010}
    static = [(int(e.tag), _encode(e)) for e in ds if int(e.tag) not in dynamic]
    # File meta: only MediaStorageSOPInstanceUID changes; the group length is recomputed.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(case, "sop", 0)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    probe = _encoder()
    write_file_meta_info(probe, meta, enforce_standard=True)  # fills version and implementation UIDs
    meta_static = [(int(e.tag), _encode(e)) for e in meta if int(e.tag) not in (0x00020000, 0x00020003)]
    paths = []
    for n in range(nz):
        k = nz - 1 - n  # IM0001 = most superior slice
        z = z_top - n * thk
        sop_uid = _uid(case, "sop", n)
        meta_elems = sorted(meta_static + [(0x00020003, _encode(DataElement(0x00020003, "UI", sop_uid)))])
        meta_body = b"".join(b for _, b in meta_elems)
        per = [
            (0x00080018, _encode(DataElement(0x00080018, "UI", sop_uid))),
            (0x00200013, _encode(DataElement(0x00200013, "IS", n + 1))),
            (0x00200032, _encode(DataElement(0x00200032, "DS", [f"{x0:.3f}", f"{y0:.3f}", f"{z:.3f}"]))),
            (0x00201041, _encode(DataElement(0x00201041, "DS", f"{z:.3f}"))),
            (0x7FE00010, _encode(DataElement(0x7FE00010, "OW", stored[k].tobytes()))),
        ]
        elems = sorted(static + per, key=lambda te: te[0])
        data = b"".join([b"\0" * 128, b"DICM", _encode(DataElement(0x00020000, "UL", len(meta_body))), meta_body,
                         *(b for _, b in elems)])
        path = folder / f"IM{n + 1:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


# make-dataset --compression: name -> transfer syntax (None: the uncompressed files as written)
COMPRESSIONS = {"explicit": None, "rle": RLELossless, "j2k": JPEG2000Lossless}


def compress_series(paths: list[Path], syntax: str) -> None:
    """Re-encode written slices in place with a lossless compressed transfer syntax (pydicom's
    encoders: RLE natively, JPEG 2000 through pylibjpeg-openjpeg), each file replaced atomically."""
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)
        tmp = p.with_name(p.name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(p)


"""DICOM series discovery, selection, geometry and fast pixel loading.

Two passes over the files:

1. **Headers** - ``dcmread(defer_size=...)`` parses every file once; the pixel data element
   is *deferred* (left on disk), so this pass is cheap and the datasets are kept for pass 2
   (no second header parse). Files are grouped by SeriesInstanceUID, every series is
   classified (localizer, dose report, SR, secondary capture, unsupported modality, ...) and
   the one to report on is picked: CT before radiographs before other modalities, then axial,
   then ORIGINAL, then most images.
2. **Pixels** - the output float32 volume is allocated once; worker threads decode each file
   (``Dataset.pixel_array`` via pydicom's decoders: pylibjpeg-libjpeg/-openjpeg/-rle or
   python-gdcm for compressed syntaxes) and write ``stored * slope + intercept`` straight into
   their slice of the volume, in float32 (no int16 overflow, no float64 intermediates).

Geometry convention (shared with NIfTI loading): the volume is (z, y, x); ``direction[:, 0]``
is the patient-LPS unit vector along +x (ImageOrientationPatient row cosines),
``direction[:, 1]`` along +y (column cosines) and ``direction[:, 2]`` the slice normal
(row x column); slices are sorted by ImagePositionPatient projected on that normal, so
``slice_positions_mm`` increases with z. ``origin_mm`` is the position of voxel [0, 0, 0].

Never log or put in messages UIDs or patient data: series are named by short labels.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from data.errors import (
    EmptyStudyError,
    InconsistentSlicesError,
    MultipleStudiesError,
    NoPixelDataError,
    NotDicomError,
    NoUsableSeriesError,
    PixelDecodeError,
    StudyTooLargeError,
    UnsupportedTransferSyntaxError,
)

if TYPE_CHECKING:
    from data.study import LoadLimits, Study

log = logging.getLogger(__name__)

# Volume modalities we load (CT is what the model is for; others load with a warning).
CT_MODALITIES = {"CT"}
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM", "OT"}
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "MG", "XR", "RF", "XA", "PX", "IO"}
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # (multi-frame) secondary capture image storage
_LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "scanogram", "pilot")
_DOSE_WORDS = ("dose", "radiation")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER = 2048  # bytes: larger values (the pixel data) stay on disk until decoded

# Which packages decode which transfer syntaxes (for error messages).
_DECODER_HINT = {
    "JPEG 2000": "pylibjpeg-openjpeg (or python-gdcm)",
    "JPEG-LS": "pylibjpeg-libjpeg (or python-gdcm)",
    "JPEG": "pylibjpeg-libjpeg (or python-gdcm)",
    "RLE": "pylibjpeg-rle (or pydicom's built-in RLE decoder)",
    "High-Throughput JPEG 2000": "pylibjpeg-openjpeg >= 2.2",
}

@dataclass
class _Frame:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    file_idx: int
    frame: int | None                  # None: single-frame file
    ipp: np.ndarray | None             # ImagePositionPatient (3,)
    iop: np.ndarray | None             # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    instance: int | None
    sop_uid: str | None
    rows: int
    cols: int


@dataclass
class _File:
    path: Path
    rel: str
    ds: Any                            # pydicom Dataset, pixel data deferred


@dataclass
class _Series:
    key: str
    label: str
    files: list[int] = field(default_factory=list)
    frames: list[_Frame] = field(default_factory=list)
    modality: str = ""
    description: str = ""
    reason: str | None = None          # why it is not usable; None = candidate
    multiframe: bool = False

    @property
    def n_images(self) -> int:
        return len(self.frames) if self.frames else len(self.files)


# --------------------------------------------------------------------------- header pass
def read_header(path: Path, rel: str) -> tuple[Any | None, str | None]:
    """Parse one file's header (pixel data deferred). Returns (dataset, None) or (None, reason)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, defer_size=_DEFER)
            except InvalidDicomError:
                # Old exports without the 128-byte preamble: accept only if it parses into an image.
                ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
                if "SOPClassUID" not in ds or not any(k in ds for k in _PIXEL_KEYWORDS):
                    return None, "not a DICOM file"
                if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
                    from pydicom.dataset import FileMetaDataset
                    from pydicom.uid import ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian

                    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
                    meta.TransferSyntaxUID = (
                        ImplicitVRLittleEndian if ds.is_implicit_VR
                        else ExplicitVRLittleEndian if ds.is_little_endian else ExplicitVRBigEndian
                    )
                    ds.file_meta = meta
            # Touch the attributes we rely on so parse errors surface here, not in pass 2.
            ds.get("SeriesInstanceUID")
            ds.get("Modality")
            meta = getattr(ds, "file_meta", None)
            if meta is not None:  # file-meta values are parsed lazily too
                meta.get("MediaStorageSOPClassUID")
                meta.get("TransferSyntaxUID")
        return ds, None
    except MemoryError:
        return None, "header too large to read"
    except BaseException as exc:  # noqa: BLE001 - corrupt input raises many types (even Rust panics)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        log.debug("unreadable DICOM header in %s: %s", rel, exc.__class__.__name__)
        return None, f"not a readable DICOM file ({exc.__class__.__name__})"


def _get(ds: Any, kw: str, default: Any = None) -> Any:
    try:
        v = ds.get(kw, default)
        return default if v is None or v == "" else v
    except Exception:
        return default


def _floats(v: Any, n: int) -> np.ndarray | None:
    try:
        a = np.asarray([float(x) for x in v], dtype=np.float64)
    except Exception:
        return None
    return a if a.shape == (n,) and np.all(np.isfinite(a)) else None


def _float(v: Any, default: float | None = None) -> float | None:
    try:
        try:
            f = float(v)
        except TypeError:
            f = float(v[0])
        return f if np.isfinite(f) else default
    except Exception:
        return default


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except Exception:
        return None


def _fg(item: Any, seq: str, kw: str) -> Any:
    """Attribute ``kw`` of the first item of functional-group sequence ``seq`` in ``item``."""
    if item is None:
        return None
    s = _get(item, seq)
    if not s:
        return None
    return _get(s[0], kw)


def _frames_of(ds: Any, file_idx: int) -> list[_Frame]:
    """All 2D frames a dataset holds, with their geometry and rescale."""
    rows, cols = _int(_get(ds, "Rows")) or 0, _int(_get(ds, "Columns")) or 0
    n = _int(_get(ds, "NumberOfFrames")) or 1
    sop = _get(ds, "SOPInstanceUID")
    sop = str(sop) if sop else None
    inst = _int(_get(ds, "InstanceNumber"))
    slope = _float(_get(ds, "RescaleSlope"), 1.0)
    intercept = _float(_get(ds, "RescaleIntercept"), 0.0)
    ps = _floats(_get(ds, "PixelSpacing") or _get(ds, "ImagerPixelSpacing") or [], 2)
    thick = _float(_get(ds, "SliceThickness"))
    ipp = _floats(_get(ds, "ImagePositionPatient") or [], 3)
    iop = _floats(_get(ds, "ImageOrientationPatient") or [], 6)
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame:  # enhanced multi-frame: per-frame values override shared ones
        shared_seq = _get(ds, "SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        out = []
        for i in range(n):
            item = per_frame[i] if i < len(per_frame) else None

            def look(seq: str, kw: str) -> Any:
                v = _fg(item, seq, kw)
                return v if v is not None else _fg(shared, seq, kw)

            f_ps = _floats(look("PixelMeasuresSequence", "PixelSpacing") or [], 2)
            f_slope = _float(look("PixelValueTransformationSequence", "RescaleSlope"), slope)
            f_int = _float(look("PixelValueTransformationSequence", "RescaleIntercept"), intercept)
            out.append(_Frame(
                file_idx, i,
                _floats(look("PlanePositionSequence", "ImagePositionPatient") or [], 3),
                _floats(look("PlaneOrientationSequence", "ImageOrientationPatient") or [], 6),
                tuple(f_ps) if f_ps is not None else (tuple(ps) if ps is not None else None),
                _float(look("PixelMeasuresSequence", "SliceThickness"), thick),
                f_slope if f_slope is not None else 1.0, f_int if f_int is not None else 0.0,
                i + 1, sop, rows, cols,
            ))
        return out
    if n > 1:  # classic multi-frame (NM, cine): frames in file order, positions unknown
        return [_Frame(file_idx, i, None, iop, tuple(ps) if ps is not None else None, thick,
                       slope, intercept, i + 1, sop, rows, cols) for i in range(n)]
    return [_Frame(file_idx, None, ipp, iop, tuple(ps) if ps is not None else None, thick,
                   slope, intercept, inst, sop, rows, cols)]


def _text(ds: Any, kw: str) -> str:
    v = _get(ds, kw, "")
    if isinstance(v, (list, tuple)) or (hasattr(v, "__iter__") and not isinstance(v, str)):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _image_type(ds: Any) -> list[str]:
    v = _get(ds, "ImageType") or _get(ds, "FrameType") or []
    if isinstance(v, str):
        v = v.split("\\")
    try:
        return [str(x).upper() for x in v]
    except Exception:
        return []


def _classify(series: _Series, files: list[_File]) -> None:
    """Set ``series.reason`` when the series is not something to report on."""
    ds0 = files[series.files[0]].ds
    sop_class = str(_get(ds0, "SOPClassUID", ""))
    desc = series.description.lower()
    itype = _image_type(ds0)
    has_pixels = any(k in ds0 for k in ("PixelData",))
    if not has_pixels:
        try:
            from pydicom.uid import UID

            name = UID(sop_class).name if sop_class else "unknown object"
        except Exception:
            name = "unknown object"
        if any(k in ds0 for k in ("FloatPixelData", "DoubleFloatPixelData")):
            series.reason = "float pixel data (parametric map) is not supported"
        elif series.modality == "SR" or "SR" in name or "Report" in name:
            series.reason = f"structured report, no images ({name})"
        else:
            series.reason = f"no pixel data ({name})"
        return
    if sop_class.startswith(_SC_PREFIX) or "SECONDARY" in itype and "SCREEN" in " ".join(itype):
        series.reason = "secondary capture (screenshot), not a scan"
        if any(w in desc for w in _DOSE_WORDS):
            series.reason = "dose report (secondary capture)"
        return
    if any(w in desc for w in _DOSE_WORDS) and series.n_images <= 3:
        series.reason = "dose report"
        return
    if "LOCALIZER" in itype or any(w in desc for w in _LOCALIZER_WORDS):
        series.reason = "localizer / scout image"
        return
    mod = series.modality
    if mod not in VOLUME_MODALITIES | RADIOGRAPH_MODALITIES:
        series.reason = f"modality {mod or 'unknown'} is not a CT, MR, PET/NM or radiograph image"
        return
    spp = _int(_get(ds0, "SamplesPerPixel")) or 1
    photo = str(_get(ds0, "PhotometricInterpretation", "")).upper()
    if spp != 1 or photo.startswith(("RGB", "YBR", "PALETTE")):
        series.reason = f"colour images ({photo or 'RGB'}) are not CT or radiograph data"
        return
    if (_int(_get(ds0, "BitsAllocated")) or 0) == 1:
        series.reason = "binary (1-bit) images are segmentations, not scans"
        return
    if not all(f.rows > 0 and f.cols > 0 for f in series.frames):
        series.reason = "images without Rows/Columns"
        return
    if mod in VOLUME_MODALITIES and series.n_images == 1 and series.frames[0].iop is not None:
        # A single CT image that is not axial is most likely a localizer without ImageType.
        n = np.cross(series.frames[0].iop[:3], series.frames[0].iop[3:])
        if mod == "CT" and abs(n[2]) < 0.5:
            series.reason = "single non-axial CT image (probably a localizer)"


def _is_radiograph(series: _Series) -> bool:
    return series.modality in RADIOGRAPH_MODALITIES


def _rank(series: _Series, files: list[_File]) -> tuple:
    mod_rank = 3 if series.modality in CT_MODALITIES else 2 if _is_radiograph(series) else 1
    iop = next((f.iop for f in series.frames if f.iop is not None), None)
    axial = 0
    if iop is not None:
        n = np.cross(iop[:3], iop[3:])
        axial = int(abs(n[2]) > 0.8)
    original = int((_image_type(files[series.files[0]].ds) or ["ORIGINAL"])[0] == "ORIGINAL")
    return (mod_rank, axial, original, series.n_images)


def _why(series: _Series, files: list[_File]) -> str:
    mod_rank, axial, original, n = _rank(series, files)
    bits = [series.modality or "unknown modality"]
    if not _is_radiograph(series):
        bits.append("axial" if axial else "non-axial")
    bits.append("ORIGINAL" if original else "DERIVED")
    bits.append(f"{n} image{'s' if n != 1 else ''}")
    return ", ".join(bits)


# --------------------------------------------------------------------------- geometry
def _sort_and_geometry(frames: list[_Frame], warn: list[str]) -> tuple[list[int], np.ndarray, float, np.ndarray, np.ndarray]:
    """Order frames along the slice normal. Returns (order, positions_mm, dz, direction, origin)."""
    iops = [f.iop for f in frames if f.iop is not None]
    iop = iops[0] if iops else None
    if iop is not None and any(not np.allclose(o, iop, atol=1e-3) for o in iops):
        counts = Counter(tuple(np.round(o, 3)) for o in iops)
        raise InconsistentSlicesError(
            f"the chosen series mixes {len(counts)} image orientations; it is not one volume. "
            "Export the axial reconstruction on its own"
        )
    if iop is not None:
        row, col = iop[:3] / max(np.linalg.norm(iop[:3]), 1e-9), iop[3:] / max(np.linalg.norm(iop[3:]), 1e-9)
        normal = np.cross(row, col)
        normal /= max(np.linalg.norm(normal), 1e-9)
    else:
        row, col, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
    direction = np.stack([row, col, normal], axis=1)
    have_pos = all(f.ipp is not None for f in frames)
    if have_pos and iop is not None:
        ipp = np.stack([f.ipp for f in frames])                      # (Z, 3)
        pos = ipp @ normal                                           # (Z,)
        inst = np.array([f.instance if f.instance is not None else 0 for f in frames])
        order = np.lexsort((inst, pos)).tolist()                     # by position, then InstanceNumber
        pos_sorted = pos[order]
        origin = ipp[order[0]]
    else:
        if len(frames) > 1:
            warn.append("slice positions missing: slices ordered by InstanceNumber / frame order, spacing from headers")
        key = [(f.instance if f.instance is not None else i) for i, f in enumerate(frames)]
        order = sorted(range(len(frames)), key=lambda i: key[i])
        pos_sorted = None
        origin = frames[order[0]].ipp if frames[order[0]].ipp is not None else np.zeros(3)

    dz = None
    if pos_sorted is not None and len(order) > 1:
        d = np.diff(pos_sorted)
        dup = d < 1e-3
        if dup.any():
            # Same position twice: keep the first (lowest InstanceNumber), say so.
            keep = np.concatenate([[True], ~dup])
            warn.append(f"{int(dup.sum())} duplicate slice position(s): kept the first image at each position")
            order = [o for o, k in zip(order, keep) if k]
            pos_sorted = pos_sorted[keep]
            d = np.diff(pos_sorted)
        if len(d):
            dz = float(np.median(d))
            if dz > 0:
                gaps = d > 1.5 * dz
                if gaps.any():
                    missing = int(np.round(d[gaps] / dz - 1).sum())
                    warn.append(f"about {missing} missing slice(s): {int(gaps.sum())} gap(s) larger than 1.5x the {dz:.2f} mm spacing")
                elif np.max(np.abs(d - dz)) > max(0.01 * dz, 0.01):
                    warn.append(f"uneven slice spacing: {d.min():.2f}-{d.max():.2f} mm (median {dz:.2f} mm used)")
            # Gantry tilt: slices step along a direction that is not the normal.
            ipp = np.stack([frames[o].ipp for o in order])
            step = ipp[-1] - ipp[0]
            if np.linalg.norm(step) > 0:
                cos = abs(float(step @ normal)) / float(np.linalg.norm(step))
                if cos < 0.9995:
                    tilt = float(np.degrees(np.arccos(min(cos, 1.0))))
                    warn.append(f"gantry tilt of about {tilt:.1f} degrees: the volume is sheared (not resampled)")
    if dz is None or not dz > 0:
        th = [f.thickness for f in frames if f.thickness]
        dz = float(th[0]) if th else 1.0
        if len(order) > 1 and pos_sorted is None:
            warn.append(f"slice spacing unknown: assumed {dz:g} mm from SliceThickness")
        pos_sorted = np.arange(len(order), dtype=np.float64) * dz + (float(origin @ normal) if origin is not None else 0.0)
    return order, np.asarray(pos_sorted, dtype=np.float64), dz, direction, np.asarray(origin, dtype=np.float64)


# --------------------------------------------------------------------------- pixel pass
def _check_decodable(ds: Any, rel: str) -> None:
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        raise PixelDecodeError(f"{rel}: the file meta has no Transfer Syntax UID; re-export the series from the PACS")
    if not ts.is_transfer_syntax:  # a corrupt or private UID: no decoder can be chosen for it
        raise UnsupportedTransferSyntaxError(
            f"{rel}: the Transfer Syntax UID in the file meta is not a known transfer syntax (corrupt or "
            "private); re-export the series from the PACS uncompressed or as JPEG/JPEG 2000"
        )
    if not ts.is_compressed:
        return
    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"{rel}: transfer syntax '{ts.name}' (e.g. video) cannot be decoded; export the series "
            "uncompressed or as JPEG/JPEG 2000"
        ) from None
    if not dec.is_available:
        hint = next((v for k, v in sorted(_DECODER_HINT.items(), key=lambda kv: -len(kv[0])) if k in ts.name), "pylibjpeg or python-gdcm")
        raise UnsupportedTransferSyntaxError(
            f"{rel}: pixel data is compressed as '{ts.name}' and no decoder is installed; install {hint}"
        )


def _decode(ds: Any, rel: str) -> np.ndarray:
    """Stored values of every frame, (F, R, C) or (R, C); PixelDecodeError on failure."""
    _check_decodable(ds, rel)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except MemoryError:
        raise StudyTooLargeError(f"{rel}: not enough memory to decode the pixel data") from None
    except BaseException as exc:  # noqa: BLE001 - Rust decoders (pylibjpeg-rle) panic with a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        tsn = getattr(ts, "name", "unknown transfer syntax")
        raise PixelDecodeError(
            f"{rel}: pixel data could not be decoded ({tsn}; {exc.__class__.__name__}). "
            "The file may be truncated or corrupt: re-export it from the PACS"
        ) from None
    finally:
        # Drop pydicom's cached copies: only our float32 volume should hold the pixels.
        for attr in ("_pixel_array", "_pixel_id"):
            if hasattr(ds, attr):
                try:
                    setattr(ds, attr, None if attr == "_pixel_array" else {})
                except Exception:
                    pass
        try:
            if "PixelData" in ds:
                del ds.PixelData
        except Exception:
            pass
    return arr


def _rescale_into(dst: np.ndarray, src: np.ndarray, slope: float, intercept: float) -> None:
    """dst[...] = src * slope + intercept, computed in float32 (exact for integer CT data)."""
    if slope == 1.0:
        np.copyto(dst, src, casting="unsafe")
    else:
        np.multiply(src, np.float32(slope), out=dst, dtype=np.float32, casting="unsafe")
    if intercept != 0.0:
        dst += np.float32(intercept)


def _fill_volume(files: list[_File], frames: list[_Frame], order: list[int], rows: int, cols: int,
                 workers: int, use_modality_lut: bool) -> np.ndarray:
    """Allocate (Z, rows, cols) float32 and decode every frame into its slot."""
    vol = np.empty((len(order), rows, cols), dtype=np.float32)   # (Z, Y, X)
    by_file: dict[int, list[tuple[int, _Frame]]] = {}
    for z, fi in enumerate(order):
        f = frames[fi]
        by_file.setdefault(f.file_idx, []).append((z, f))

    def work(item: tuple[int, list[tuple[int, _Frame]]]) -> None:
        file_idx, targets = item
        fobj = files[file_idx]
        arr = _decode(fobj.ds, fobj.rel)
        for z, f in targets:
            a = arr[f.frame] if f.frame is not None and arr.ndim == 3 else arr
            if a.shape != (rows, cols):
                raise PixelDecodeError(f"{fobj.rel}: decoded image is {a.shape}, expected {(rows, cols)}; the file is corrupt")
            if use_modality_lut:
                from pydicom.pixels import apply_modality_lut

                vol[z] = apply_modality_lut(a, fobj.ds)
            else:
                _rescale_into(vol[z], a, f.slope, f.intercept)

    items = list(by_file.items())
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(work, items):
                pass
    else:
        for it in items:
            work(it)
    return vol


# --------------------------------------------------------------------------- metadata
def _deidentified_metadata(ds: Any, files_used: int) -> dict:
    """A whitelist of technical facts; nothing that identifies a patient or an institution."""
    md: dict[str, Any] = {}
    for key, kw in (("manufacturer", "Manufacturer"), ("model", "ManufacturerModelName"),
                    ("body_part", "BodyPartExamined"), ("study_description", "StudyDescription"),
                    ("convolution_kernel", "ConvolutionKernel"), ("patient_position", "PatientPosition"),
                    ("photometric_interpretation", "PhotometricInterpretation")):
        v = _text(ds, kw)
        if v:
            md[key] = v
    for key, kw in (("kvp", "KVP"), ("tube_current_ma", "XRayTubeCurrent"), ("exposure_mas", "Exposure"),
                    ("slice_thickness_mm", "SliceThickness"), ("spacing_between_slices_mm", "SpacingBetweenSlices")):
        v = _float(_get(ds, kw))
        if v is not None:
            md[key] = v
    agent = _text(ds, "ContrastBolusAgent") or _text(ds, "ContrastBolusRoute")
    md["contrast_agent_present"] = bool(agent and agent.lower() not in {"none", "no", "n/a"})
    md["contrast_agent_stated"] = bool(agent)  # False: the header is silent (not the same as "none")
    md["image_type"] = _image_type(ds)
    sex = _text(ds, "PatientSex").upper()
    if sex in {"M", "F", "O"}:
        md["patient_sex"] = sex
    age = _text(ds, "PatientAge")
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        years = int(age[:3]) / {"D": 365.25, "W": 52.18, "M": 12, "Y": 1}[age[3]]
        md["patient_age_years"] = "90+" if years >= 90 else int(years)  # HIPAA safe harbour: ages >= 90 pooled
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None:
        md["transfer_syntax"] = getattr(ts, "name", str(ts))
    md["n_files"] = files_used
    return md


def _study_label(i: int, n_series: int, n_files: int, mods: set[str]) -> str:
    return f"study {i}: {n_series} series, {n_files} files ({', '.join(sorted(m for m in mods if m)) or 'unknown modality'})"


# --------------------------------------------------------------------------- entry point
def load_dicom(paths: list[Path], root: Path | None, limits: "LoadLimits",
               skipped_files: list[dict] | None = None, single_file: bool = False) -> "Study":
    """Load the best series among DICOM ``paths`` as a ``Study``.

    ``root`` is used to name files relatively in messages. ``skipped_files`` collects files
    that were not usable (from earlier stages too). ``single_file`` makes the errors specific
    (NotDicomError / NoPixelDataError) instead of "no usable series".

    pydicom's value validation is switched off while loading: it would *log* invalid values
    verbatim (names, UIDs) through pydicom's logger, and it costs time. This toggles a
    process-wide pydicom setting for the duration of the call.
    """
    from pydicom.config import disable_value_validation

    with disable_value_validation():
        return _load_dicom(paths, root, limits, skipped_files, single_file)


def _load_dicom(paths: list[Path], root: Path | None, limits: "LoadLimits",
                skipped_files: list[dict] | None, single_file: bool) -> "Study":
    from data.study import Study

    skipped_files = list(skipped_files or [])
    if len(paths) > limits.max_files:
        raise StudyTooLargeError(f"{len(paths)} files given, more than the limit of {limits.max_files}; upload one study")

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(root)) if root else p.name
        except ValueError:
            return p.name

    workers = limits.workers or min(8, os.cpu_count() or 1)
    rels = [rel(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        headers = list(pool.map(read_header, paths, rels))
    files: list[_File] = []
    not_dicom = []
    for p, r, (ds, why) in zip(paths, rels, headers):
        if ds is None:
            skipped_files.append({"file": r, "reason": why})
            not_dicom.append(r)
            continue
        if str(_get(ds, "MediaStorageSOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
            skipped_files.append({"file": r, "reason": "DICOMDIR index (the images are read directly)"})
            continue
        files.append(_File(p, r, ds))
    if not files:
        if single_file and not_dicom:
            raise NotDicomError(f"{not_dicom[0]} is not a DICOM file, NIfTI volume or PNG/JPEG image; check that you uploaded the right file")
        if not_dicom:
            raise EmptyStudyError(
                f"none of the {len(paths)} files is a readable DICOM image (e.g. {not_dicom[0]}); "
                "upload the DICOM export of the study"
            )
        raise EmptyStudyError("no DICOM files found; upload the DICOM export of the study")

    # ---- one study only
    studies: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        studies.setdefault(str(_get(f.ds, "StudyInstanceUID", "") or ""), []).append(i)
    if len([k for k in studies if k]) > 1:
        lines = []
        for j, (k, idx) in enumerate(sorted(studies.items(), key=lambda kv: -len(kv[1])), 1):
            n_series = len({str(_get(files[i].ds, "SeriesInstanceUID", "")) for i in idx})
            lines.append(_study_label(j, n_series, len(idx), {str(_get(files[i].ds, "Modality", "")) for i in idx}))
        raise MultipleStudiesError(f"{len(studies)} studies found: put each in its own folder ({'; '.join(lines)})")

    # ---- group into series
    groups: dict[str, _Series] = {}
    for i, f in enumerate(files):
        key = str(_get(f.ds, "SeriesInstanceUID", "") or f"(no series uid) {f.rel}")
        s = groups.get(key)
        if s is None:
            s = groups[key] = _Series(key=key, label="")
            s.modality = str(_get(f.ds, "Modality", "") or "").upper()
            s.description = _text(f.ds, "SeriesDescription")
        s.files.append(i)
        if any(k in f.ds for k in ("PixelData",)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fr = _frames_of(f.ds, i)
            except Exception:
                fr = []
            s.frames.extend(fr)
            s.multiframe |= len(fr) > 1
    series = sorted(groups.values(), key=lambda s: (_int(_get(files[s.files[0]].ds, "SeriesNumber")) or 10**9, s.description))
    for n, s in enumerate(series, 1):
        num = _int(_get(files[s.files[0]].ds, "SeriesNumber"))
        s.label = f"series {num if num is not None else n}"
        _classify(s, files)

    candidates = [s for s in series if s.reason is None]
    skipped_series = [{"series": s.label, "description": s.description, "modality": s.modality,
                       "n_images": s.n_images, "reason": s.reason} for s in series if s.reason]
    if not candidates:
        if single_file or all("no pixel data" in (s.reason or "") or "structured report" in (s.reason or "") for s in series):
            if all(s.reason and ("no pixel data" in s.reason or "structured report" in s.reason) for s in series):
                raise NoPixelDataError(
                    f"the DICOM {'file has' if len(files) == 1 else 'files have'} no pixel data "
                    f"({series[0].reason}); upload the image series, not the report"
                )
        found = "; ".join(f"{d['series']} '{d['description']}' ({d['modality']}, {d['n_images']} images): {d['reason']}"
                          for d in skipped_series)
        raise NoUsableSeriesError(f"no series to report on. Found: {found}. Upload the axial CT series (or a radiograph)")
    candidates.sort(key=lambda s: _rank(s, files), reverse=True)
    best = candidates[0]
    warn: list[str] = []
    picked_reason = f"{best.label} '{best.description}': {_why(best, files)}"
    if len(candidates) > 1:
        picked_reason += f"; chosen over {len(candidates) - 1} other candidate series (ranked CT > radiograph > other, axial, ORIGINAL, most images)"
    for s in candidates[1:]:
        if _is_radiograph(best) and _is_radiograph(s):
            continue
        skipped_series.append({"series": s.label, "description": s.description, "modality": s.modality,
                               "n_images": s.n_images, "reason": f"not chosen ({_why(s, files)})"})

    if _is_radiograph(best):
        views = [s for s in candidates if _is_radiograph(s)]
        return _load_radiographs(views, files, skipped_series, skipped_files, picked_reason, limits)

    frames = best.frames
    sizes = Counter((f.rows, f.cols) for f in frames)
    if len(sizes) > 1:
        desc = ", ".join(f"{n} x {r}x{c}" for (r, c), n in sizes.most_common())
        raise InconsistentSlicesError(
            f"{best.label} mixes slice sizes ({desc}); it is not one volume. Export a single reconstruction"
        )
    rows, cols = frames[0].rows, frames[0].cols
    order, pos, dz, direction, origin = _sort_and_geometry(frames, warn)
    nbytes = len(order) * rows * cols * 4
    if nbytes > limits.max_volume_bytes:
        raise StudyTooLargeError(
            f"{best.label} would need {nbytes / 2**30:.1f} GiB as float32 (limit {limits.max_volume_bytes / 2**30:.1f} GiB); "
            "upload a thinner selection or a thicker-slice reconstruction"
        )
    ds0 = files[best.files[0]].ds
    use_lut = "ModalityLUTSequence" in ds0 and "RescaleSlope" not in ds0
    vol = _fill_volume(files, frames, order, rows, cols, workers, use_lut)

    ps = next((f.pixel_spacing for f in frames if f.pixel_spacing is not None), None)
    if ps is None:
        warn.append("pixel spacing missing: assumed 1 mm")
        ps = (1.0, 1.0)
    if best.modality not in CT_MODALITIES:
        warn.append(f"modality {best.modality}: values are not Hounsfield units; the model is trained on CT")
    if any(w in best.description.lower() for w in ("mip", "minip", "mpr", "3d", "vr ")):
        warn.append("the chosen series looks like a reformat (MIP/MPR); the original axial series is preferable")
    tilt = _float(_get(ds0, "GantryDetectorTilt"))
    if tilt and abs(tilt) > 0.01 and not any("gantry tilt" in w for w in warn):
        warn.append(f"gantry tilt of {tilt:.1f} degrees recorded in the header")
    used_files = sorted({frames[o].file_idx for o in order})
    return Study(
        volume=vol,
        spacing_mm=(float(dz), float(ps[0]), float(ps[1])),
        origin_mm=tuple(float(v) for v in origin),
        direction=direction,
        modality=best.modality or "CT",
        kind="volume",
        series_description=best.description,
        study_uid=str(_get(ds0, "StudyInstanceUID")) if _get(ds0, "StudyInstanceUID") else None,
        series_uid=str(_get(ds0, "SeriesInstanceUID")) if _get(ds0, "SeriesInstanceUID") else None,
        sop_uids=[frames[o].sop_uid for o in order],
        slice_positions_mm=pos,
        source_format="dicom-multiframe" if best.multiframe else "dicom",
        picked_reason=picked_reason,
        skipped_series=skipped_series,
        skipped_files=skipped_files,
        warnings=warn,
        metadata=_deidentified_metadata(ds0, len(used_files)),
    )


def _load_radiographs(views: list[_Series], files: list[_File], skipped_series: list[dict],
                      skipped_files: list[dict], picked_reason: str, limits: "LoadLimits") -> "Study":
    """Every radiograph image of the study becomes one z index (a view), intensities in [0, 1]."""
    from data.image2d import normalise_radiograph, stack_views
    from data.study import Study

    images, sops, warn = [], [], []
    spacing = None
    for s in views:
        for fi in s.files:
            f = files[fi]
            arr = _decode(f.ds, f.rel)
            if arr.ndim == 3:
                warn.append(f"{f.rel}: {arr.shape[0]} frames, using the first")
                arr = arr[0]
            from pydicom.pixels import apply_modality_lut

            try:
                vals = apply_modality_lut(arr, f.ds).astype(np.float32, copy=False)
            except Exception:
                vals = arr.astype(np.float32)
            mono1 = str(_get(f.ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"
            images.append(normalise_radiograph(vals, invert=mono1))
            sops.append(str(_get(f.ds, "SOPInstanceUID")) if _get(f.ds, "SOPInstanceUID") else None)
            if spacing is None:
                ps = _floats(_get(f.ds, "PixelSpacing") or _get(f.ds, "ImagerPixelSpacing") or [], 2)
                spacing = tuple(ps) if ps is not None else None
    vol, resized = stack_views(images)
    if resized:
        warn.append(f"{len(images)} views of different sizes were resized to {vol.shape[1]}x{vol.shape[2]}")
    if spacing is None:
        warn.append("pixel spacing missing: assumed 1 mm")
        spacing = (1.0, 1.0)
    ds0 = files[views[0].files[0]].ds
    if len(images) > 1:
        picked_reason += f"; {len(images)} radiograph views, one per z index"
    return Study(
        volume=vol, spacing_mm=(1.0, float(spacing[0]), float(spacing[1])), origin_mm=(0.0, 0.0, 0.0),
        direction=np.eye(3), modality=views[0].modality, kind="radiograph",
        series_description=views[0].description,
        study_uid=str(_get(ds0, "StudyInstanceUID")) if _get(ds0, "StudyInstanceUID") else None,
        series_uid=str(_get(ds0, "SeriesInstanceUID")) if _get(ds0, "SeriesInstanceUID") else None,
        sop_uids=sops, slice_positions_mm=np.arange(len(images), dtype=np.float64),
        source_format="dicom", picked_reason=picked_reason, skipped_series=skipped_series,
        skipped_files=skipped_files, warnings=warn,
        metadata=_deidentified_metadata(ds0, len(images)),
    )

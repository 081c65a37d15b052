"""One entry point for every image source: ``load_study(path_or_paths) -> Study``.

Accepted: a study folder (DICOM at any depth, or one NIfTI, or PNG/JPEG views), a list of
files, a ``.zip`` of any of these (extracted safely, see ``data.archive``), one ``.nii`` /
``.nii.gz``, one ``.png``/``.jpg``, or one DICOM file. In a folder, ``history.*``,
``dictation.*`` and ``reference.*`` are companions (``find_study_files``) and never reach
the image loader; other non-image files are skipped with a warning.

Conventions (shared by all loaders):

* ``volume`` float32 (z, y, x). CT: Hounsfield units. Radiographs (``kind == "radiograph"``):
  intensities in [0, 1], one z index per view (z == 1 for a single image), no HU.
* ``direction`` 3x3: columns are the patient-LPS unit vectors of the x, y, z array axes
  (x: DICOM row direction, y: column direction, z: slice normal; NIfTI is converted).
  ``origin_mm``: LPS position of voxel [0, 0, 0]. ``slice_positions_mm``: position of each
  z index along the slice normal (increasing).
* ``spacing_mm`` is (z, y, x).
* ``metadata`` holds whitelisted technical facts only; UIDs are kept on the object for
  references (SR/FHIR outputs) and never logged (``repr`` omits them).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.archive import ZipLimits, extract_zip, is_junk, remove_tree
from data.errors import EmptyStudyError, MultipleStudiesError, StudyError

log = logging.getLogger(__name__)

COMPANION_SUFFIXES = {
    "history": {".txt", ".md", ".pdf"},
    "dictation": {".wav", ".flac", ".ogg", ".mp3"},
    "reference": {".txt", ".json"},
}
# Files with these suffixes are never images; anything else (".dcm", none, "1.2.3.45") may be DICOM.
NON_IMAGE_SUFFIXES = {
    ".txt", ".md", ".pdf", ".json", ".jsonl", ".xml", ".csv", ".tsv", ".html", ".htm", ".doc", ".docx",
    ".rtf", ".odt", ".xls", ".xlsx", ".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".exe", ".dll",
    ".ini", ".inf", ".log", ".py", ".sh", ".bat", ".cmd", ".yaml", ".yml", ".dump", ".icc", ".js",
    ".css", ".mp4", ".avi", ".mov", ".tar", ".7z", ".rar", ".gz", ".tgz", ".bz2", ".xz", ".lnk", ".url",
}


@dataclass(frozen=True)
class LoadLimits:
    """Safety limits for one study. ``workers``: decoding threads (None: up to 8, by CPU count)."""

    max_files: int = 20_000
    max_volume_bytes: int = 4 << 30          # float32 volume, 4 GiB (e.g. 4000 x 512 x 512)
    zip: ZipLimits = ZipLimits()
    workers: int | None = None


@dataclass
class StudyFiles:
    """What a study folder holds, by role."""

    images: list[Path]
    history: Path | None = None
    dictation: Path | None = None
    reference: Path | None = None
    ignored: list[tuple[Path, str]] = field(default_factory=list)


@dataclass(repr=False)
class Study:
    """A loaded study; see the module docstring for the conventions."""

    volume: np.ndarray                                  # float32 (z, y, x)
    spacing_mm: tuple[float, float, float]              # (z, y, x)
    origin_mm: tuple[float, float, float]               # LPS of voxel [0, 0, 0]
    direction: np.ndarray                               # 3x3, columns = LPS of x, y, z axes
    modality: str
    kind: str                                           # "volume" | "radiograph"
    series_description: str
    study_uid: str | None
    series_uid: str | None
    sop_uids: list[str | None]                          # one per z index
    slice_positions_mm: np.ndarray                      # (z,)
    source_format: str                                  # "dicom" | "dicom-multiframe" | "nifti" | "image2d"
    picked_reason: str
    skipped_series: list[dict] = field(default_factory=list)
    skipped_files: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # no UIDs, no pixel dump
        return (f"Study(kind={self.kind!r}, modality={self.modality!r}, shape={tuple(self.volume.shape)}, "
                f"spacing_mm={tuple(round(s, 3) for s in self.spacing_mm)}, source_format={self.source_format!r}, "
                f"warnings={len(self.warnings)})")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape)  # type: ignore[return-value]

    def summary(self) -> dict:
        """JSON-able description (what ``medreport inspect --json`` prints). Includes the series UID."""
        v = self.volume
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(float(s), 4) for s in self.spacing_mm],
            "hu_min": float(v.min()) if v.size else None,
            "hu_max": float(v.max()) if v.size else None,
            "values_are_hu": self.kind == "volume" and self.modality == "CT",
            "modality": self.modality,
            "kind": self.kind,
            "source_format": self.source_format,
            "series_description": self.series_description,
            "series_uid": self.series_uid,
            "picked_reason": self.picked_reason,
            "origin_mm": [round(float(s), 4) for s in self.origin_mm],
            "direction": np.round(self.direction, 6).tolist(),
            "slice_positions_mm": [round(float(p), 4) for p in (self.slice_positions_mm[[0, -1]] if len(self.slice_positions_mm) else [])],
            "skipped_series": self.skipped_series,
            "skipped_files": self.skipped_files,
            "warnings": self.warnings,
            "metadata": self.metadata,
        }


# --------------------------------------------------------------------------- files
def _companion_role(path: Path) -> tuple[str | None, str | None]:
    """(role, None) for a companion, (None, reason) for a misnamed one, (None, None) otherwise."""
    name = path.name.lower()
    stem, suffix = (name[:-len(path.suffix)] if path.suffix else name), path.suffix.lower()
    if stem in COMPANION_SUFFIXES:
        if suffix in COMPANION_SUFFIXES[stem]:
            return stem, None
        allowed = ", ".join(sorted(COMPANION_SUFFIXES[stem]))
        return None, f"{stem} file with unsupported type {suffix or '(none)'}: use {allowed}"
    return None, None


def _is_nonimage(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return False
    return path.suffix.lower() in NON_IMAGE_SUFFIXES


def find_study_files(folder: str | Path) -> StudyFiles:
    """Sort a study folder's files (any depth) into images, companions and ignored files."""
    folder = Path(folder)
    out = StudyFiles(images=[])
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX" and not d.startswith("."))
        for fn in sorted(filenames):
            paths.append(Path(dirpath) / fn)
    # Shallowest companion wins (a study's own history.txt over one in a sub-folder).
    paths.sort(key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    for p in paths:
        rel = p.relative_to(folder)
        if is_junk(str(rel)) or p.name.startswith("."):
            out.ignored.append((p, "system/hidden file"))
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(folder.resolve()):
            out.ignored.append((p, "symbolic link pointing outside the study folder"))
            continue
        role, why = _companion_role(p)
        if role:
            first = getattr(out, role)
            if first is None:
                setattr(out, role, p)
            elif role == "reference" and first.parent == p.parent and {first.suffix, p.suffix} == {".txt", ".json"}:
                # reference.txt beside reference.json is one reference in two forms: use the structured one.
                out.reference = first if first.suffix == ".json" else p
            else:
                out.ignored.append((p, f"second {role} file (using {getattr(out, role).relative_to(folder)})"))
            continue
        if why:
            out.ignored.append((p, why))
        elif p.suffix.lower() == ".zip":
            out.ignored.append((p, "archive inside the study folder (extract it, or upload it on its own)"))
        elif _is_nonimage(p):
            out.ignored.append((p, "not an image file"))
        else:
            out.images.append(p)
    out.images.sort()
    return out


# --------------------------------------------------------------------------- loading
def _is_zip(path: Path) -> bool:
    if path.suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return head[:4] == b"PK\x03\x04" and head[128:132] != b"DICM"
    except OSError:
        return False


def _load_images(images: list[Path], root: Path, limits: LoadLimits, skipped: list[dict], warnings: list[str],
                 single_file: bool) -> Study:
    from data.dicom import load_dicom
    from data.image2d import IMAGE2D_SUFFIXES, load_image2d
    from data.nifti import is_nifti, load_nifti

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(root))
        except ValueError:
            return p.name

    niftis = [p for p in images if is_nifti(p)]
    pics = [p for p in images if p.suffix.lower() in IMAGE2D_SUFFIXES and p not in niftis]
    dicoms = [p for p in images if p not in niftis and p not in pics]
    if dicoms:
        try:
            study = load_dicom(dicoms, root, limits, skipped_files=skipped, single_file=single_file and len(images) == 1)
        except EmptyStudyError:
            if not (niftis or pics):
                raise
            skipped.extend({"file": rel(p), "reason": "not a DICOM file"} for p in dicoms)
        else:
            for p in niftis + pics:
                study.skipped_files.append({"file": rel(p), "reason": "DICOM series preferred over NIfTI/PNG/JPEG in the same folder"})
            study.warnings[:0] = warnings
            return study
    if niftis:
        if len(niftis) > 1:
            raise MultipleStudiesError(f"{len(niftis)} NIfTI volumes found: put each in its own folder")
        for p in pics:
            skipped.append({"file": rel(p), "reason": "NIfTI volume preferred over PNG/JPEG in the same folder"})
        return load_nifti(niftis[0], limits, skipped_files=skipped, warnings=warnings)
    if pics:
        return load_image2d(pics, limits, skipped_files=skipped, warnings=warnings)
    raise EmptyStudyError("no image files found (DICOM, NIfTI, PNG or JPEG); upload the study's images")


def _load_folder(folder: Path, limits: LoadLimits, display_root: Path | None = None) -> Study:
    sf = find_study_files(folder)
    root = folder
    skipped, warnings = [], []
    n_other = 0
    for p, reason in sf.ignored:
        skipped.append({"file": str(p.relative_to(root)), "reason": reason})
        if reason != "system/hidden file":
            n_other += 1
    if n_other:
        warnings.append(f"{n_other} non-image file(s) skipped (see skipped_files)")
    if not sf.images:
        extra = f" ({len(sf.ignored)} other files ignored)" if sf.ignored else ""
        raise EmptyStudyError(f"no image files found in the study folder{extra}; it should hold DICOM, one NIfTI, or PNG/JPEG files")
    return _load_images(sf.images, root, limits, skipped, warnings, single_file=False)


def _load_zip(path: Path, limits: LoadLimits) -> Study:
    tmp = Path(tempfile.mkdtemp(prefix="medreport_zip_"))
    try:
        extract_zip(path, tmp, limits.zip)
        study = _load_folder(tmp, limits)
        study.metadata["archive"] = path.name
        return study
    finally:
        remove_tree(tmp)


def load_study(source: str | os.PathLike | list | tuple, *, limits: LoadLimits | None = None) -> Study:
    """Load a study from a folder, a list of files, a ``.zip``, a NIfTI, a PNG/JPEG or one DICOM file.

    Raises a ``data.errors.StudyError`` subclass with a message that says what to do.
    """
    limits = limits or LoadLimits()
    if isinstance(source, (list, tuple)):
        if not source:
            raise EmptyStudyError("an empty list of files was given; select the study's files")
        paths = [Path(p) for p in source]
        expanded: list[Path] = []
        skipped: list[dict] = []
        for p in paths:
            if p.is_dir():
                expanded.extend(q for q in sorted(p.rglob("*")) if q.is_file())
            elif p.is_file():
                expanded.append(p)
            else:
                raise EmptyStudyError(f"{p.name} does not exist; check the path")
        try:
            root = Path(os.path.commonpath([str(p.parent) for p in expanded])) if expanded else Path(".")
        except ValueError:
            root = Path(".")
        images = []
        for p in expanded:
            relname = str(p.relative_to(root)) if p.is_relative_to(root) else p.name
            role, why = _companion_role(p)
            if is_junk(relname) or p.name.startswith("."):
                skipped.append({"file": relname, "reason": "system/hidden file"})
            elif role or why:
                skipped.append({"file": relname, "reason": f"{role} file (not an image)" if role else why})
            elif _is_nonimage(p):
                skipped.append({"file": relname, "reason": "not an image file"})
            else:
                images.append(p)
        if len(images) == 1 and _is_zip(images[0]):
            return _load_zip(images[0], limits)
        if not images:
            raise EmptyStudyError("none of the given files is an image (DICOM, NIfTI, PNG or JPEG)")
        return _load_images(images, root, limits, skipped, [], single_file=len(images) == 1)

    path = Path(source)
    if not path.exists():
        raise EmptyStudyError(f"{path.name or str(path)} does not exist; check the path")
    if path.is_dir():
        return _load_folder(path, limits)
    if _is_zip(path):
        return _load_zip(path, limits)
    try:
        if path.stat().st_size == 0:
            raise EmptyStudyError(f"{path.name} is empty (0 bytes); re-export it")
    except OSError as exc:
        raise StudyError(f"{path.name} cannot be read ({exc.__class__.__name__}); check permissions") from None
    return _load_images([path], path.parent, limits, [], [], single_file=True)

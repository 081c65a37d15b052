"""Manifests (contracts.md) and adapters that turn public dataset layouts into them.

A manifest is JSONL, one study a line, paths relative to the manifest's folder::

    entries = read_manifest("data/manifest.jsonl")      # list[ManifestEntry], validated
    write_manifest(entries, "out/manifest.jsonl")
    problems = validate_entry(entry, root)               # [] when fine

Adapters (each returns entries; write them with ``write_manifest``):

* :func:`from_r2gen` - R2Gen ``annotation.json`` (IU X-Ray and MIMIC-CXR layouts)
* :func:`from_ct_rate` - CT-RATE ``*_reports.csv`` + ``train/train_1/train_1_a/train_1_a_1.nii.gz``
* :func:`from_table` - a generic CSV or JSONL with a column mapping

Labels of adapted datasets come from the report labeller (``data.labeler``).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data.errors import MedreportError
from data.report_format import SECTION_KEYS, empty_sections, format_report, parse_report
from data.vocab import Label, validate_label

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class ManifestError(MedreportError):
    """A manifest or source dataset that cannot be read as documented."""


def iter_jsonl(path: str | Path, error: type[MedreportError] = None) -> "Iterator[tuple[int, dict]]":
    """(line number, object) for each non-blank line of a JSONL file; a line that is not one JSON
    object raises ``error`` (default ManifestError) naming the file and line."""
    error = error or ManifestError
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path.name} line {n} is not valid JSON ({exc.msg}): each line must be one JSON object") from None
            if not isinstance(d, dict):
                raise error(f"{path.name} line {n} is not a JSON object: each line must be one {{...}} object")
            yield n, d


@dataclass
class Lesion:
    finding: str
    center_zyx_mm: list[float]
    radius_mm: float

    def to_dict(self) -> dict:
        return {"finding": self.finding, "center_zyx_mm": list(self.center_zyx_mm), "radius_mm": self.radius_mm}


@dataclass
class Fact:
    """A planted history fact. ``section`` / ``must_not_appear`` are optional extras of synthetic data."""

    kind: str
    text: str
    char_offset: int
    expect_in_report: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text, "char_offset": self.char_offset,
                "expect_in_report": self.expect_in_report, **self.extra}


@dataclass
class ManifestEntry:
    """One study of a manifest. Paths are relative to the manifest folder (``root``)."""

    id: str
    split: str
    study: str
    report: str = ""
    sections: dict[str, str] = field(default_factory=empty_sections)
    labels: list[Label] = field(default_factory=list)
    history: str | None = None
    history_text: str | None = None
    audio: str | None = None
    lesions: list[Lesion] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)
    root: Path | None = None  # the manifest's folder (not serialised)

    def path(self, rel: str | None) -> Path | None:
        """Absolute path of a relative manifest path."""
        if rel is None:
            return None
        p = Path(rel)
        return p if p.is_absolute() or self.root is None else self.root / p

    @property
    def study_path(self) -> Path:
        return self.path(self.study)

    def to_dict(self) -> dict:
        return {
            "id": self.id, "split": self.split, "study": self.study, "history": self.history,
            "history_text": self.history_text, "audio": self.audio, "report": self.report,
            "sections": {k: self.sections.get(k, "") for k in SECTION_KEYS},
            "labels": [lab.to_dict() for lab in self.labels],
            "lesions": [les.to_dict() for les in self.lesions],
            "facts": [f.to_dict() for f in self.facts],
        }

    @classmethod
    def from_dict(cls, d: dict, root: Path | None = None) -> "ManifestEntry":
        facts = []
        for f in d.get("facts") or []:
            extra = {k: v for k, v in f.items() if k not in ("kind", "text", "char_offset", "expect_in_report")}
            facts.append(Fact(f["kind"], f.get("text", ""), int(f.get("char_offset", -1)), f.get("expect_in_report", ""), extra))
        sections = empty_sections()
        sections.update({k: v or "" for k, v in (d.get("sections") or {}).items() if k in sections})
        return cls(
            id=str(d["id"]), split=d["split"], study=d["study"], report=d.get("report") or "",
            sections=sections, labels=[Label.from_dict(x) for x in d.get("labels") or []],
            history=d.get("history"), history_text=d.get("history_text"), audio=d.get("audio"),
            lesions=[Lesion(x["finding"], list(x["center_zyx_mm"]), float(x["radius_mm"])) for x in d.get("lesions") or []],
            facts=facts, root=root,
        )


_REQUIRED = ("id", "split", "study", "report", "sections", "labels")


def validate_entry(entry: ManifestEntry | dict, root: Path | None = None, check_files: bool = True) -> list[str]:
    """Problems with one entry (empty list = valid): schema, vocabulary, split, files present."""
    problems: list[str] = []
    if isinstance(entry, dict):
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            return [f"missing keys {missing}"]
        try:
            entry = ManifestEntry.from_dict(entry, root)
        except (KeyError, TypeError, ValueError) as exc:
            return [f"malformed entry: {exc}"]
    if entry.split not in SPLITS:
        problems.append(f"split {entry.split!r} not in {SPLITS}")
    for lab in entry.labels:
        problems += validate_label(lab)
    for f in entry.facts:
        if f.kind != "distractor" and entry.history and f.char_offset < 0:
            problems.append(f"fact {f.kind} has no char_offset")
    if check_files:
        root = root or entry.root
        for name, rel in (("study", entry.study), ("history", entry.history), ("audio", entry.audio)):
            if rel is not None:
                p = Path(rel) if Path(rel).is_absolute() or root is None else root / rel
                if not p.exists():
                    problems.append(f"{name} path not found: {rel}")
    return problems


def read_manifest(path: str | Path, validate: bool = True, check_files: bool = False) -> list[ManifestEntry]:
    """Entries of a JSONL manifest; with ``validate`` a bad line raises ManifestError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = path.parent
    out = []
    for n, d in iter_jsonl(path, ManifestError):
        if validate:
            problems = validate_entry(d, root, check_files=check_files)
            if problems:
                raise ManifestError(f"{path}:{n}: " + "; ".join(problems))
        out.append(ManifestEntry.from_dict(d, root))
    return out


def write_manifest(entries: list[ManifestEntry], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
    return path


def add_training_studies(primary: str | Path, extra: str | Path, out: str | Path, id_prefix: str) -> tuple[Path, int]:
    """Write the manifest ``out``: every entry of ``primary`` as it is, then every entry of
    ``extra`` as a *training* study (split "train", id ``id_prefix + id``), its paths rewritten
    relative to ``out``'s folder. The held-out splits stay ``primary``'s alone, so scores on them
    compare with models trained on ``primary``. Used to train on another geometry besides the
    demo data (``medreport demo-model --tiny-studies``). -> (out, how many entries were added)."""
    primary, extra, out = Path(primary), Path(extra), Path(out)
    first = [d for _, d in iter_jsonl(primary, ManifestError)]
    ids = {d["id"] for d in first}
    lines = [json.dumps(d, ensure_ascii=False) for d in first]
    added = 0
    for n, d in iter_jsonl(extra, ManifestError):
        d = dict(d, id=f"{id_prefix}{d['id']}", split="train")
        if d["id"] in ids:
            raise ManifestError(f"{extra}:{n}: id {d['id']} is also in {primary}; choose another id prefix")
        for key in ("study", "history", "audio"):
            if d.get(key) and not Path(d[key]).is_absolute():
                d[key] = os.path.relpath(extra.parent / d[key], out.parent)
        lines.append(json.dumps(d, ensure_ascii=False))
        added += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out, added


def _labels_of(sections: dict[str, str]) -> list[Label]:
    from data.labeler import label_text

    return label_text("\n".join(t for t in (sections.get("findings", ""), sections.get("impression", "")) if t))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# ---- R2Gen --------------------------------------------------------------------------------------
def from_r2gen(annotation: str | Path, images_dir: str | Path, manifest_dir: str | Path | None = None,
               label: bool = True) -> list[ManifestEntry]:
    """R2Gen ``annotation.json``: ``{"train": [{"id", "report", "image_path": [...], "split"}], "val", "test"}``.

    IU X-Ray image paths look like ``CXR2384_IM-0942/0.png`` and MIMIC-CXR ones like
    ``p10/p10000032/s50414267/<dicom_id>.jpg``; either way the study is the folder of the first
    image under ``images_dir`` (its views become slabs). The R2Gen report is the Findings text.
    """
    annotation, images_dir = Path(annotation), Path(images_dir)
    root = Path(manifest_dir) if manifest_dir else images_dir.parent
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read R2Gen annotation {annotation}: {exc}") from None
    if not isinstance(data, dict) or not any(k in data for k in SPLITS):
        raise ManifestError(f"{annotation}: expected an object with 'train'/'val'/'test' lists (R2Gen layout)")
    out = []
    for split in SPLITS:
        for item in data.get(split, []):
            paths = item.get("image_path") or []
            if not paths:
                raise ManifestError(f"{annotation}: study {item.get('id')} has no image_path")
            study = images_dir / Path(paths[0]).parent
            sid = str(item.get("id") or item.get("study_id"))
            sections = empty_sections()
            sections["findings"] = (item.get("report") or "").strip()
            out.append(ManifestEntry(
                id=sid, split=item.get("split", split) if item.get("split") in SPLITS else split,
                study=_rel(study, root), report=format_report(sections), sections=sections,
                labels=_labels_of(sections) if label else [], root=root,
            ))
    return out


# ---- CT-RATE ------------------------------------------------------------------------------------
_CT_RATE_COLS = {"clinical_information": "ClinicalInformation_EN", "technique": "Technique_EN",
                 "findings": "Findings_EN", "impression": "Impressions_EN"}


def _ct_rate_text(value: str | None) -> str:
    v = (value or "").strip()
    return "" if v.lower().rstrip(".") in ("not given", "") else v


def ct_rate_volume_path(volume_name: str) -> Path:
    """``train_1_a_1.nii.gz`` -> ``train/train_1/train_1_a/train_1_a_1.nii.gz`` (CT-RATE layout)."""
    stem = volume_name[: -len(".nii.gz")] if volume_name.endswith(".nii.gz") else volume_name
    parts = stem.split("_")
    if len(parts) < 4:
        raise ManifestError(f"unexpected CT-RATE VolumeName {volume_name!r}: expected like train_1_a_1.nii.gz")
    split_dir = parts[0]
    return Path(split_dir) / "_".join(parts[:2]) / "_".join(parts[:3]) / f"{stem}.nii.gz"


def from_ct_rate(reports_csv: str | Path, volumes_dir: str | Path, manifest_dir: str | Path | None = None,
                 split: str | None = None, label: bool = True) -> list[ManifestEntry]:
    """CT-RATE ``*_reports.csv`` (``VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
    Impressions_EN``); volumes under ``volumes_dir`` as ``train/train_1/train_1_a/train_1_a_1.nii.gz``.
    "Not given." means empty. The clinical information also serves as inline ``history_text``.
    ``split`` defaults to train for ``train_*`` volumes and val for ``valid_*``."""
    reports_csv, volumes_dir = Path(reports_csv), Path(volumes_dir)
    root = Path(manifest_dir) if manifest_dir else volumes_dir.parent
    out = []
    with open(reports_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"VolumeName", *_CT_RATE_COLS.values()}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ManifestError(f"{reports_csv}: CT-RATE reports need columns {sorted(need)}, found {reader.fieldnames}")
        for row in reader:
            name = row["VolumeName"].strip()
            sections = empty_sections()
            for key, col in _CT_RATE_COLS.items():
                sections[key] = _ct_rate_text(row.get(col))
            sp = split or ("val" if name.startswith("valid") else "test" if name.startswith("test") else "train")
            out.append(ManifestEntry(
                id=name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name, split=sp,
                study=_rel(volumes_dir / ct_rate_volume_path(name), root), report=format_report(sections),
                sections=sections, labels=_labels_of(sections) if label else [],
                history_text=sections["clinical_information"] or None, root=root,
            ))
    return out


# ---- generic table ------------------------------------------------------------------------------
DEFAULT_COLUMNS = {"id": "id", "study": "study", "split": "split", "report": "report", "history": "history",
                   "history_text": "history_text", "audio": "audio", **{k: k for k in SECTION_KEYS}}


def from_table(path: str | Path, columns: dict[str, str] | None = None, manifest_dir: str | Path | None = None,
               default_split: str = "train", label: bool = True) -> list[ManifestEntry]:
    """A CSV (``.csv``/``.tsv``) or JSONL table, one study a row. ``columns`` maps our field names
    (``id study split report history history_text audio`` and the section keys) to the table's;
    unmapped fields are looked up under their own name. Needs ``id`` and ``study`` and either a
    ``report`` or section columns; relative paths are taken relative to the table's folder."""
    path = Path(path)
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    src_root = path.parent
    root = Path(manifest_dir) if manifest_dir else src_root
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ManifestError(f"{path}: expected a .csv, .tsv or .jsonl table")
    out = []
    for n, row in enumerate(rows, 1):
        get = lambda k: (row.get(cols[k]) if row.get(cols[k]) not in ("",) else None)  # noqa: E731
        if get("id") is None or get("study") is None:
            raise ManifestError(f"{path} row {n}: needs '{cols['id']}' and '{cols['study']}' (map them with columns=...)")
        sections = empty_sections()
        if any(get(k) for k in SECTION_KEYS):
            for k in SECTION_KEYS:
                sections[k] = (get(k) or "").strip()
        elif get("report"):
            sections = parse_report(get("report"))
        else:
            raise ManifestError(f"{path} row {n}: no report text (column '{cols['report']}' or section columns)")

        def rel(k):
            v = get(k)
            if v is None:
                return None
            p = Path(v)
            return _rel(p if p.is_absolute() else src_root / p, root)

        split = get("split") or default_split
        if split not in SPLITS:
            raise ManifestError(f"{path} row {n}: split {split!r} not in {SPLITS}")
        out.append(ManifestEntry(
            id=str(get("id")), split=split, study=rel("study"), report=get("report") or format_report(sections),
            sections=sections, labels=_labels_of(sections) if label else [], history=rel("history"),
            history_text=get("history_text"), audio=rel("audio"), root=root,
        ))
    return out

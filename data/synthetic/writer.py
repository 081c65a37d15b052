"""Write a synthetic dataset: study folders plus ``manifest.jsonl`` (contracts.md).

Study folder ``studies/<id>/``: ``IM0001.dcm``... (one series), ``history.txt`` (optional),
``dictation.wav`` (optional, 16 kHz), ``reference.txt`` (formatted report) and
``reference.json`` (sections + labels). Each study is a pure function of ``(seed, index)``, so
the output is identical for a seed whatever the number of workers.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.report_format import format_report
from data.synthetic import dictation
from data.synthetic.dicom_writer import COMPRESSIONS, compress_series, write_series
from data.synthetic.findings import sample_case
from data.synthetic.histories import dictation_text, write_history
from data.synthetic.phantom import PHANTOM_VERSIONS, render
from data.synthetic.reports import write_sections
from data.vocab import FINDING_NAMES, Label

log = logging.getLogger(__name__)

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test

# The bundled showcase sample (examples/): a fixed mix for the first studies of a run.
SHOWCASE: tuple[dict, ...] = (
    {"split": "train", "normal": True, "history_tokens": 400, "prior_nodule": False, "malignancy": False,
     "lobectomy": False, "contrast_allergy": False, "has_history": True, "has_audio": True},
    {"split": "test", "prior_nodule": True, "malignancy": True, "history_tokens": 2000, "has_history": True,
     "has_audio": True, "lobectomy": False, "contrast_allergy": False, "normal": False},
    {"split": "val", "findings": ["pleural_effusion", "cardiomegaly"], "has_audio": False, "has_history": True,
     "history_tokens": 600, "prior_nodule": False, "malignancy": False, "lobectomy": False, "contrast_allergy": False,
     "normal": False},
    {"split": "test", "findings": ["pneumothorax", "mass"], "has_history": False, "has_audio": True,
     "prior_nodule": False, "malignancy": False, "lobectomy": False, "contrast_allergy": False, "normal": False},
    {"split": "train", "findings": ["consolidation", "lymphadenopathy", "fracture"], "contrast_allergy": True,
     "lobectomy": True, "history_tokens": 900, "has_history": True, "has_audio": True, "prior_nodule": False,
     "malignancy": False, "normal": False},
    {"split": "train", "findings": ["emphysema", "hiatal_hernia", "nodule"], "history_tokens": 300, "has_history": True,
     "has_audio": True, "prior_nodule": False, "malignancy": False, "lobectomy": False, "contrast_allergy": False,
     "normal": False},
)


@dataclass
class DatasetConfig:
    """Options of one ``make-dataset`` run."""

    n: int = 100
    seed: int = 0
    size: str = "demo"
    history_tokens: tuple[int, int] = (200, 16000)
    audio: bool = True
    showcase: bool = False  # first len(SHOWCASE) studies follow the fixed showcase mix
    normal_fraction: float = 0.3
    # Put every study in this split (e.g. "test": a fixed held-out subset, written with the test
    # split's reserved report templates); None: train / val / test by seed (SPLIT_FRACTIONS).
    split: str | None = None
    # data.synthetic.phantom.render's version: 1 = the shipped demo model's data (sessions 1-10),
    # 2 = mediastinal fat, so that enlarged lymph nodes are visible.
    phantom_version: int = 1
    # DICOM transfer syntax of the written slices: "explicit" (uncompressed little endian), or a
    # lossless compression as scanners and PACS send it: "rle" (RLE Lossless) or "j2k" (JPEG 2000
    # lossless, about 45 % of the bytes: the bundled examples).
    compression: str = "explicit"

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        if self.split not in (None, "train", "val", "test"):
            raise ValueError(f"split must be train, val or test (or None for the usual mix), got {self.split!r}")
        if self.phantom_version not in PHANTOM_VERSIONS:
            raise ValueError(f"phantom_version must be one of {PHANTOM_VERSIONS}, got {self.phantom_version!r}")


def split_of(seed: int, index: int) -> str:
    u = np.random.default_rng([seed, index, 1]).random()
    return "train" if u < SPLIT_FRACTIONS[0] else "val" if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1] else "test"


def all_labels(present: list[Label]) -> list[dict]:
    """Manifest labels: every vocabulary finding once; the present ones with their attributes."""
    by = {lab.finding: lab for lab in present if lab.present}
    return [by[n].to_dict() if n in by else Label(n, False).to_dict() for n in FINDING_NAMES]


def generate_study(cfg: DatasetConfig, index: int, out: Path) -> dict:
    """Render and write study ``index``; return its manifest entry."""
    study_seed = int(np.random.default_rng([cfg.seed, index]).integers(0, 2**31 - 1))
    rng = np.random.default_rng(study_seed)
    force = dict(SHOWCASE[index]) if cfg.showcase and index < len(SHOWCASE) else {}
    split = force.pop("split", None) or cfg.split or split_of(cfg.seed, index)
    sid = f"syn{index:05d}"
    case = sample_case(rng, sid, study_seed, split, cfg.size, cfg.history_tokens, cfg.normal_fraction,
                       p_no_audio=0.1 if cfg.audio else 1.0, force=force)
    if not cfg.audio:
        case.has_audio = False
    ph = render(case, cfg.phantom_version)
    case.labels = ph.labels  # with below_resolution marked

    folder = out / "studies" / sid
    paths = write_series(case, ph.hu, ph.spacing, folder)
    if COMPRESSIONS[cfg.compression] is not None:
        compress_series(paths, COMPRESSIONS[cfg.compression])
    rel = f"studies/{sid}"
    history_rel = audio_rel = None
    facts = []
    if case.has_history:
        text, facts = write_history(case, np.random.default_rng([study_seed, 2]))
        (folder / "history.txt").write_text(text, encoding="utf-8")
        history_rel = f"{rel}/history.txt"
    if case.has_audio:
        audio = dictation.synthesize(dictation_text(case, np.random.default_rng([study_seed, 3])),
                                     np.random.default_rng([study_seed, 4]))
        dictation.write_wav(folder / "dictation.wav", audio)
        audio_rel = f"{rel}/dictation.wav"
    sections = write_sections(case, np.random.default_rng([study_seed, 5]))
    report = format_report(sections)
    labels = all_labels(case.labels)
    (folder / "reference.txt").write_text(report, encoding="utf-8")
    (folder / "reference.json").write_text(json.dumps({"sections": sections, "labels": labels}, indent=1), encoding="utf-8")
    return {
        "id": sid, "split": split, "study": rel, "history": history_rel, "history_text": None, "audio": audio_rel,
        "report": report, "sections": sections, "labels": labels, "lesions": ph.lesions,
        "facts": [f.to_dict() for f in facts],
    }


def _work(args: tuple[DatasetConfig, int, str]) -> dict:
    cfg, index, out = args
    return generate_study(cfg, index, Path(out))


def write_dataset(out: Path, cfg: DatasetConfig, workers: int | None = None, progress: bool = True) -> Path:
    """Write ``cfg.n`` studies under ``out`` and ``out/manifest.jsonl``; return the manifest path."""
    out = Path(out)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    if cfg.audio and not dictation.available():
        raise RuntimeError("no speech synthesizer found")
    reuse = _reusable_entries(out, cfg)
    _write_config(out, cfg)
    todo = [i for i in range(cfg.n) if f"syn{i:05d}" not in reuse]
    if reuse:
        log.info("reusing %d studies already written with the same settings; generating %d", cfg.n - len(todo), len(todo))
    workers = max(1, min(workers or os.cpu_count() or 1, max(len(todo), 1)))
    jobs = [(cfg, i, str(out)) for i in todo]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=len(todo), unit="study", disable=not progress) if tqdm else None
    entries: list[dict] = []
    if workers == 1:
        for j in jobs:
            entries.append(_work(j))
            if bar:
                bar.update(1)
    else:
        ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
        with ctx.Pool(workers) as pool:
            for e in pool.imap(_work, jobs, chunksize=1):
                entries.append(e)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    by_id = {e["id"]: e for e in entries}
    by_id.update({sid: reuse[sid] for sid in reuse if int(sid[3:]) < cfg.n})
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(cfg.n):
            f.write(json.dumps(by_id[f"syn{i:05d}"], ensure_ascii=False) + "\n")
    os.replace(tmp, manifest)
    return manifest


_CONFIG_FILE = "dataset_config.json"


def _config_key(cfg: DatasetConfig) -> dict:
    """The settings that decide a study's content (``n`` only decides how many)."""
    key = {"seed": cfg.seed, "size": cfg.size, "history_tokens": list(cfg.history_tokens), "audio": cfg.audio,
           "showcase": cfg.showcase, "normal_fraction": cfg.normal_fraction}
    if cfg.split:  # only when set: datasets written before the option existed stay reusable
        key["split"] = cfg.split
    if cfg.phantom_version != 1:  # likewise
        key["phantom_version"] = cfg.phantom_version
    if cfg.compression != "explicit":  # likewise
        key["compression"] = cfg.compression
    return key


def _write_config(out: Path, cfg: DatasetConfig) -> None:
    (out / _CONFIG_FILE).write_text(json.dumps(_config_key(cfg), indent=1) + "\n", encoding="utf-8")


def _reusable_entries(out: Path, cfg: DatasetConfig) -> dict[str, dict]:
    """Manifest entries of an earlier run into ``out`` with the same settings, whose study folder is
    complete: each study is a pure function of (settings, index), so growing a dataset (a larger
    ``n``) only writes the studies that are new."""
    manifest, conf = out / "manifest.jsonl", out / _CONFIG_FILE
    if not (manifest.is_file() and conf.is_file()):
        return {}
    try:
        if json.loads(conf.read_text(encoding="utf-8")) != _config_key(cfg):
            return {}
        entries = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return {}
    return {e["id"]: e for e in entries if (out / e["study"] / "reference.json").is_file()}

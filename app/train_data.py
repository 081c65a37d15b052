"""Training data: a manifest -> model inputs, decoder sequences and finding labels.

* :func:`load_manifest_for_training` reads and checks a manifest, listing *every* problem
  (unreadable lines, bad entries, missing files, an empty train split) in one error.
* :class:`StudyCache` keeps each study's preprocessed arrays (slabs, log-mel) on disk as
  uncompressed ``.npz`` (float16 pixels, read back with ``allow_pickle=False``), so epochs after
  the first never decode DICOM or audio again. The key covers the source files' size and mtime
  and the preprocessing settings: editing a study or changing the model geometry re-decodes it.
* :class:`ReportDataset` gives :class:`Example` items (``StudyInputs`` + the decoder sequence
  ``[BOS] history [REPORT] report [EOS]`` + label indices); :func:`collate_examples` pads them
  into ``ModelInputs`` with ``ids``, ``lm_labels`` and ``labels``.

History length policy in training (the *length curriculum* sets ``max_history_tokens``): a
record longer than the cap is cropped to the cap. ``crop="facts"`` keeps windows centred on the
manifest's planted facts (so the report's history-derived sentences stay supported by the
prefix) and fills the rest with the record's tail; ``crop="tail"`` keeps the most recent tokens.
Crops are drawn from ``numpy.random.default_rng([seed, epoch, index])``: reproducible and
independent of worker processes and of resuming. Inference never crops (the decoder reads all).

Shape legend: S slabs, H/W slab size, M mel bins, T frames, K findings.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.decoder import spans_to_mask
from data.errors import MedreportError
from data.finding_prompt import known_locations, record_locations, record_prior_nodule_mm, study_acquisition
from data.history_digest import digest_ids
from multimodal.heads import SIDES, FindingLabels, coarse_location, side_index
from multimodal.model import ModelInputs, StudyInputs, collate, config_prompt_ids, digest_spans
from multimodal.presets import ModelConfig

log = logging.getLogger(__name__)

# Training studies whose acquisition line is replaced by "unknown" (model.acquisition_prompt), so
# that the decoder also learns to write a technique section without one (NIfTI, PNG, silent headers).
ACQUISITION_DROPOUT = 0.1
NODULE_SIZE_KEYS = ("any", "left", "right")  # the order of a cached "nodule_mm" array
CACHE_VERSION = 3  # 2: the study's spacing and volume shape are cached too (token targets); 3: its acquisition line


def study_detector_locations(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Where the detectors placed a finding, from a study's cached arrays (data.detectors; {} when
    they did not run or placed nothing)."""
    from data.detectors import locations_dict

    return (locations_dict(arrays["detector_locations"]) or {}) if "detector_locations" in arrays else {}


def study_evidence(arrays: dict[str, np.ndarray]) -> dict[str, float] | None:
    """The detector evidence of a study's cached arrays ({finding: score}, data.detectors; None
    when the detectors did not run or found nothing to read)."""
    from data.detectors import evidence_dict

    return evidence_dict(arrays["evidence"]) if "evidence" in arrays else None


class TrainDataError(MedreportError):
    """A manifest or study that cannot be used for training; the message lists what is wrong."""


# ----------------------------------------------------------------------------- manifest checks


def load_manifest_for_training(path: str | Path, max_listed: int = 20) -> list:
    """Entries of ``path``; raise :class:`TrainDataError` listing all problems found.

    Checks: the file exists and every line is a valid entry (schema, vocabulary, split), every
    referenced study / history / audio file exists, and the train split is not empty.
    """
    from data.datasets import ManifestEntry, validate_entry

    path = Path(path)
    if not path.is_file():
        hint = " (give the manifest.jsonl file, not its folder)" if path.is_dir() else ""
        raise TrainDataError(f"manifest not found: {path}{hint}; build one with 'medreport make-dataset --out DIR'")
    problems: list[str] = []
    entries = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {n}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(d, dict):
                problems.append(f"line {n}: not a JSON object")
                continue
            bad = validate_entry(d, path.parent, check_files=True)
            if bad:
                problems.append(f"line {n} (id {d.get('id', '?')}): " + "; ".join(bad))
                continue
            entries.append(ManifestEntry.from_dict(d, path.parent))
    if not problems and not entries:
        problems.append("the manifest has no entries")
    elif not problems and not any(e.split == "train" for e in entries):
        problems.append("no entry has split 'train'")
    if problems:
        shown = problems[:max_listed]
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise TrainDataError(
            f"{path} cannot be used for training ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
            + "\n  ".join(shown) + more + "\nFix or remove these lines (paths are relative to the manifest's folder)."
        )
    return entries


# ----------------------------------------------------------------------------- preprocessing + cache


@dataclass(frozen=True)
class PreprocessConfig:
    """What the encoders expect (read from the model config)."""

    n_slabs: int
    image_size: int
    n_mels: int
    audio: bool = True  # False: ignore dictations (image + history only)
    mip_windows: tuple[str, ...] = ()  # extra MIP channels (ImageEncoderConfig.mip_windows)
    # also run the classical detectors (data.detectors: lung nodules measured, the vertebral
    # bodies' attenuation; ~0.6 s a demo study): evaluation and calibration of a model whose
    # nodule call carries its size (model.nodule_size_prompt) or whose heads fuse the detectors'
    # evidence (heads.detector_evidence); not training (whose calls carry the labelled sizes)
    run_detectors: bool = False

    @classmethod
    def from_model(cls, cfg: ModelConfig, audio: bool = True) -> "PreprocessConfig":
        return cls(cfg.image.max_slabs, cfg.image.image_size, cfg.audio.n_mels, audio, tuple(cfg.image.mip_windows))

    def key(self) -> str:
        mip = "-mip_" + "_".join(self.mip_windows) if self.mip_windows else ""
        # det2: nodule sizes by the ball fit (session 27) and data.detectors' evidence; det3: the
        # lymph-node detector's evidence and station too (session 28)
        nm = "-det3" if self.run_detectors else ""
        return f"v{CACHE_VERSION}-s{self.n_slabs}-i{self.image_size}-m{self.n_mels}{mip}{nm}"


def _stamp(p: Path | None) -> str:
    """Size + mtime of a file or of all files under a folder (cheap change detection)."""
    if p is None:
        return "-"
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return ";".join(f"{q.name}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files)


class StudyCache:
    """Preprocessed study arrays on disk (``<dir>/<settings>/<hash>.npz``); ``None`` dir = no cache."""

    def __init__(self, directory: str | Path | None, pre: PreprocessConfig):
        self.pre = pre
        self.dir = Path(directory) / pre.key() if directory else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, entry) -> Path:
        audio = entry.path(entry.audio) if self.pre.audio else None
        h = hashlib.sha1(f"{entry.id}|{_stamp(entry.study_path)}|{_stamp(audio)}".encode()).hexdigest()[:20]
        return self.dir / f"{h}.npz"

    def arrays(self, entry) -> dict[str, np.ndarray]:
        """pixels float16 (S, C, H, W), z_mm (S,), z_index_range (S, 2) and, with audio, mel float16 (M, T)."""
        f = self._file(entry) if self.dir is not None else None
        if f is not None and f.is_file():
            try:
                with np.load(f, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError) as exc:  # a torn write from a killed run: rebuild it
                log.warning("cache file %s unreadable (%s); rebuilding", f.name, exc)
        arrs = self._compute(entry)
        if f is not None:
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrs)
            os.replace(tmp, f)  # atomic: concurrent ranks / workers never see half a file
        return arrs

    def _compute(self, entry) -> dict[str, np.ndarray]:
        from data.preprocess import make_slabs
        from data.study import load_study

        study = load_study(entry.study_path)
        slabs = make_slabs(study, self.pre.n_slabs, (self.pre.image_size, self.pre.image_size),
                           mip_windows=self.pre.mip_windows)
        out = {
            "pixels": slabs.pixels.astype(np.float16),  # values in [0, 1]: float16 keeps ~1e-3
            "z_mm": slabs.z_mm.astype(np.float32),
            "z_index_range": slabs.z_index_range.astype(np.int64),
            "spacing_zyx": np.asarray(study.spacing_mm, dtype=np.float64),  # mm, as load_study measured it
            "shape_zyx": np.asarray(study.shape, dtype=np.int64),
            # data.finding_prompt.study_acquisition: contrast and slice thickness from the header
            "acquisition": np.asarray(study_acquisition(study)),
        }
        if self.pre.run_detectors:  # nodule_mm: [any, left, right] whole mm, NaN where nothing was measured
            from data.detectors import evidence_array, locations_array, read_study

            reading = read_study(study)
            out["nodule_mm"] = np.asarray([reading.sizes_mm.get(k, np.nan) for k in NODULE_SIZE_KEYS], dtype=np.float32)
            out["evidence"] = evidence_array(reading.evidence)  # [len(DETECTOR_FINDINGS)], NaN = none
            out["detector_locations"] = locations_array(reading.locations)  # [1] node station index, -1 = none
        if self.pre.audio and entry.audio:
            from data.audio import AudioConfig, load_audio, log_mel

            acfg = AudioConfig(n_mels=self.pre.n_mels)
            wave = load_audio(entry.path(entry.audio), acfg.sample_rate, acfg.max_seconds)
            out["mel"] = log_mel(wave, acfg)[0].astype(np.float16)  # (M, T)
        return out


def _fill_one(job: tuple["StudyCache", object]) -> tuple[str, str | None]:
    cache, entry = job
    torch.set_num_threads(1)
    try:
        cache.arrays(entry)
        return entry.id, None
    except Exception as exc:  # noqa: BLE001 - reported per study; training reports it again if used
        return entry.id, f"{type(exc).__name__}: {exc}"


def fill_cache(cache: StudyCache, entries: Sequence, workers: int = 0, progress: bool = True) -> dict[str, str]:
    """Preprocess ``entries`` into ``cache`` ahead of training, ``workers`` processes in parallel
    (0 = all cores). Like the dataset build this is data preparation: it takes the DICOM
    decoding out of the timed optimizer steps. Returns ``{id: error}`` for studies that failed."""
    import multiprocessing as mp

    from tqdm.auto import tqdm

    if cache.dir is None:
        return {}
    todo = [e for e in entries if not cache._file(e).is_file()]
    errors: dict[str, str] = {}
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    bar = tqdm(total=len(todo), desc="preprocess", unit="study", disable=not progress)
    jobs = [(cache, e) for e in todo]
    with mp.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.imap_unordered(_fill_one, jobs, chunksize=4) if pool else map(_fill_one, jobs)
        for sid, err in results:
            if err:
                errors[sid] = err
            bar.update(1)
    bar.close()
    for sid, err in errors.items():
        log.warning("study %s could not be preprocessed: %s", sid, err)
    return errors


def token_targets(lesions, z_index_range_S2: np.ndarray, spacing_zyx: Sequence[float], shape_yx: Sequence[int],
                  grid: int, finding_names: Sequence[str]) -> np.ndarray:
    """Which image tokens show which finding: float32 [S*G*G, K], 1 where the lesion's sphere
    (centre, radius in array mm) meets the token's box (its slab's slices x its grid cell).

    Tokens follow ``ImageEncoder.tokens_from_features``: slab by slab, cells row-major (y, x).
    A dense, localised target for the image encoder (synthetic data knows where every lesion is):
    far more signal per study than one label per finding."""
    S, G, K = len(z_index_range_S2), grid, len(finding_names)
    out = np.zeros((S, G, G, K), dtype=np.float32)
    index = {n: k for k, n in enumerate(finding_names)}
    sz, sy, sx = (float(v) for v in spacing_zyx)
    Y, X = shape_yx
    cy = np.arange(G + 1) * (Y / G) * sy  # [G+1] cell edges in mm
    cx = np.arange(G + 1) * (X / G) * sx
    for les in lesions or ():
        k = index.get(les.finding if hasattr(les, "finding") else les["finding"])
        if k is None:
            continue
        c = les.center_zyx_mm if hasattr(les, "center_zyx_mm") else les["center_zyx_mm"]
        r = float(les.radius_mm if hasattr(les, "radius_mm") else les["radius_mm"])
        z0 = z_index_range_S2[:, 0] * sz - sz / 2  # [S] slab extent in mm (slice centres at i * sz)
        z1 = z_index_range_S2[:, 1] * sz - sz / 2
        dz = np.maximum(np.maximum(z0 - c[0], c[0] - z1), 0.0)  # [S] distance from the centre to the box
        dy = np.maximum(np.maximum(cy[:-1] - c[1], c[1] - cy[1:]), 0.0)  # [G]
        dx = np.maximum(np.maximum(cx[:-1] - c[2], c[2] - cx[1:]), 0.0)  # [G]
        d2 = dz[:, None, None] ** 2 + dy[None, :, None] ** 2 + dx[None, None, :] ** 2  # [S, G, G]
        out[..., k] = np.maximum(out[..., k], (d2 <= r * r).astype(np.float32))
    return out.reshape(S * G * G, K)


def dense_grid(cfg: ModelConfig) -> int:
    """Cells per side of the dense-loss targets: the finest of ``heads.dense_stages`` at the
    encoder's slab size (128-pixel slabs, layer2 at stride 8: 16)."""
    red = min(cfg.image.stage_reduction(i) for i in cfg.heads.dense_stages)
    if cfg.image.image_size % red:
        raise ValueError(f"image_size {cfg.image.image_size} is not a multiple of the dense stage stride {red}")
    return cfg.image.image_size // red


# ----------------------------------------------------------------------------- examples


@dataclass
class Example:
    id: str
    study: StudyInputs
    ids: list[int]  # [BOS] history [REPORT] report [EOS]
    n_prefix: int  # tokens up to and including [REPORT] (not predicted)
    present_K: np.ndarray  # 1 / 0 / -1 unknown
    side_K: np.ndarray  # class index / -100
    location_K: np.ndarray  # class index / -100
    token_targets_NK: np.ndarray | None = None  # [S*G*G, K] (heads.token_loss_weight > 0)
    n_prompt: int = 0  # finding-prompt tokens right before [REPORT] (model.finding_prompt)
    dense_targets_SGGK: np.ndarray | None = None  # [S, G, G, K] on the dense grid (heads.dense_loss_weight > 0)
    fact_spans: tuple[tuple[int, int], ...] = ()  # [start, end) in ids of planted-fact phrases
    fact_weight: float = 1.0  # LM loss weight on those tokens (model.fact_weight)
    finding_spans: tuple[tuple[int, int], ...] = ()  # [start, end) in ids of sentences stating a present finding
    finding_weight: float = 1.0  # LM loss weight on those tokens (model.finding_weight)


def below_resolution(labels) -> set[str]:
    """Findings present but marked ``below_resolution`` (scored apart: contracts.md, Sizes)."""
    return {lab.finding for lab in labels if lab.present and (lab.attributes or {}).get("below_resolution")}


def finding_targets(labels, finding_names: Sequence[str], locations: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Manifest labels -> (present_K, side_K, location_K) in head order; unknown = -1 / -100."""
    K = len(finding_names)
    present = np.full(K, -1, dtype=np.int64)
    side = np.full(K, -100, dtype=np.int64)
    loc = np.full(K, -100, dtype=np.int64)
    index = {n: k for k, n in enumerate(finding_names)}
    for lab in labels:
        k = index.get(lab.finding)
        if k is None or lab.present is None:
            continue
        present[k] = int(bool(lab.present))
        if lab.present:
            side[k] = side_index(lab.side) if lab.side in SIDES else -100
            c = coarse_location(lab.location)
            loc[k] = locations.index(c) if lab.location and c in locations else -100
    return present, side, loc


def call_feature_masks(entries, finding_names: Sequence[str], locations: Sequence[str],
                       min_share: float = 0.5) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """(call_sides, call_locations) for ``HeadsConfig``: per finding, whether at least ``min_share``
    of its present labels in ``entries`` carry a side / a location the heads know, i.e. whether the
    training context (built from labels) has that one-hot for it. A finding never present counts
    as carrying both (the heads' calls decide)."""
    K = len(finding_names)
    n, with_side, with_loc = np.zeros(K), np.zeros(K), np.zeros(K)
    for e in entries:
        present, side, loc = finding_targets(e.labels, finding_names, locations)
        on = present == 1
        n += on
        with_side += on & (side >= 0)
        with_loc += on & (loc >= 0)
    sides = tuple(bool(c == 0 or s >= min_share * c) for s, c in zip(with_side, n))
    locs = tuple(bool(c == 0 or s >= min_share * c) for s, c in zip(with_loc, n))
    return sides, locs


def fill_call_feature_masks(heads, entries) -> str | None:
    """Set ``heads.call_sides`` / ``call_locations`` (a ``HeadsConfig``) from ``entries``' labels
    when the finding context is on and they are not set yet (a new run, or a model saved before
    they existed); returns what was set, in words, or None when nothing changed."""
    if not heads.finding_context or heads.call_sides or heads.call_locations:
        return None
    heads.call_sides, heads.call_locations = call_feature_masks(entries, heads.finding_names, heads.locations)
    without = lambda mask: ", ".join(n for n, m in zip(heads.finding_names, mask) if not m) or "none"  # noqa: E731
    return f"no side for {without(heads.call_sides)}; no location for {without(heads.call_locations)}"


def fact_spans(tok, report_ids: Sequence[int], phrases: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` positions in ``report_ids`` of each phrase (every occurrence), matched as
    token sequences: the phrase after a space (mid-sentence) and capitalised (at a section or
    line start), since the tokenizer codes a word's leading space and case. A phrase the report
    does not contain gives no span."""
    ids = list(report_ids)
    out: set[tuple[int, int]] = set()
    for ph in phrases:
        ph = ph.strip()
        if not ph:
            continue
        for variant in {" " + ph, ph, ph[:1].upper() + ph[1:], " " + ph[:1].upper() + ph[1:]}:
            seq = tok.tk.encode(variant, add_special_tokens=False).ids
            n = len(seq)
            if n == 0:
                continue
            out.update((i, i + n) for i in range(len(ids) - n + 1) if ids[i: i + n] == seq)
    return sorted(out)


def finding_sentence_spans(tok, sections: dict[str, str], present: set[str],
                           keys: Sequence[str] = ("findings", "impression")) -> list[tuple[int, int]]:
    """``[start, end)`` positions, in ``tok.encode_report(sections)``, of the sentences of the
    ``keys`` sections that the labeller reads as stating one of the ``present`` findings (e.g.
    "Cardiomegaly." in the heart line, "3. Cardiomegaly." in the impression; not "No pericardial
    effusion."). A token belongs to a sentence when it holds one of its characters."""
    from data.labeler import label_sentence, split_sentences
    from data.report_format import SECTION_KEYS

    out: list[tuple[int, int]] = []
    pos = 0
    for key in SECTION_KEYS:
        pos += 1  # the section marker
        text = (sections.get(key) or "").strip()
        if not text:
            continue
        enc = tok.tk.encode(text, add_special_tokens=False)
        if key in keys and present:
            starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)  # char span of each token
            ends = np.asarray([o[1] for o in enc.offsets], dtype=np.int64)    # (a leading space belongs to it)
            cursor = 0
            for sent in split_sentences(text):
                a = text.find(sent, cursor)
                if a < 0:
                    continue
                b = cursor = a + len(sent)
                if any(lab.present and lab.finding in present for lab in label_sentence(sent)):
                    # tokens that hold a character of [a, b): first end past a, last start before b
                    i, j = int(np.searchsorted(ends, a, "right")), int(np.searchsorted(starts, b, "left"))
                    if j > i:
                        out.append((pos + i, pos + j))
        pos += len(enc.ids)
    return out


def label_calls(labels, sizes: bool = False, rng: np.random.Generator | None = None,
                size_dropout: float = 0.0) -> list[tuple]:
    """The findings a study's labels say are present, as finding-prompt calls ``(name, side,
    coarse location)``: what the heads would call if they were right (the prompt's teacher).
    ``sizes``: a nodule's call also carries its labelled size (``model.nodule_size_prompt``; the
    measurement's teacher), left out for a ``size_dropout`` share (draws from ``rng``)."""
    from data.finding_prompt import MEASURED

    out = []
    for lab in labels:
        if not lab.present:
            continue
        call = (lab.finding, lab.side, coarse_location(lab.location))
        if sizes and lab.finding in MEASURED and lab.size_mm is not None:
            keep = rng is None or size_dropout <= 0 or rng.random() >= size_dropout
            call = (*call, float(round(lab.size_mm))) if keep else call
        out.append(call)
    return out


def history_text(entry) -> str | None:
    from data.history import read_history

    if entry.history:
        return read_history(entry.path(entry.history))
    return entry.history_text or None


def crop_history(ids: list[int], cap: int, fact_tokens: Sequence[int], rng: np.random.Generator,
                 mode: str = "facts", window: int = 48) -> list[int]:
    """At most ``cap`` history tokens (the module docstring states the policy)."""
    if len(ids) <= cap:
        return list(ids)
    if mode == "tail" or not fact_tokens:
        return list(ids[len(ids) - cap:])
    keep = np.zeros(len(ids), dtype=bool)
    w = max(8, min(window, cap // max(1, len(fact_tokens))))
    for t in sorted(fact_tokens):
        a = int(np.clip(t - w // 4 - rng.integers(0, max(1, w // 4)), 0, len(ids)))
        keep[a: a + w] = True
        if keep.sum() >= cap:
            break
    rest = cap - int(keep.sum())
    if rest > 0:  # fill with the most recent tokens not yet kept
        free = np.flatnonzero(~keep)
        keep[free[len(free) - rest:]] = True
    idx = np.flatnonzero(keep)[:cap]
    return [ids[i] for i in idx]


class ReportDataset(torch.utils.data.Dataset):
    """Examples of one split. ``max_history_tokens`` and ``epoch`` may be changed between epochs."""

    def __init__(self, entries, tokenizer, model_cfg: ModelConfig, cache: StudyCache, *, seed: int = 0,
                 max_history_tokens: int = 512, max_report_tokens: int = 512, crop: str = "facts",
                 memo_history: bool = True):
        if crop not in ("facts", "tail"):
            raise ValueError("crop must be 'facts' or 'tail'")
        self.entries = list(entries)
        self.tok = tokenizer
        self.cfg = model_cfg
        self.cache = cache
        self.seed = seed
        self.max_history_tokens = max_history_tokens
        self.max_report_tokens = max_report_tokens
        self.crop = crop
        self.epoch = 0
        # Keep each record's tokens and digest in memory (int32: ~32 KB for a 8K-token record).
        self.memo_history = memo_history
        self._history_memo: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def history_ids(self, entry, rng: np.random.Generator | None = None, parts=None) -> tuple[list[int], int]:
        """Tokenised, cropped history of ``entry`` (no special tokens) and the length of the
        history digest at its end (``model.history_digest_words``; 0 = none). The digest is
        taken from the whole record and counts toward the cap; the record fills the rest."""
        parts = self._history_parts(entry) if parts is None else parts
        if not parts:
            return [], 0
        ids_arr, facts, dig_all = parts[:3]
        dig = dig_all[: self.max_history_tokens]
        cap = self.max_history_tokens - len(dig)
        ids = ids_arr.tolist()
        facts = facts if (len(ids) > cap and self.crop == "facts") else []
        body = crop_history(ids, cap, facts, rng if rng is not None else np.random.default_rng(0), self.crop) if cap else []
        return body + dig, len(dig)

    def _history_parts(self, entry) -> tuple[np.ndarray, list[int], list[int], dict[str, str], float | None] | None:
        """The record's token ids, the token positions of its planted facts, its digest's token ids,
        the locations it states (``data.finding_prompt.record_locations``) and the prior lung
        nodule size it states (``record_prior_nodule_mm``); None without a record. They depend only on the record and the tokenizer, not on
        the cap or the epoch, so they are kept per study (``memo_history``): reading, tokenising
        and digesting a record of up to 16K tokens again every epoch took ~25 of the ~38 ms an
        example costs, a sixth of a demo training step (session 19, ``runs/s19/getitem_prof.py``)."""
        key = (entry.id, entry.history, entry.history_text)  # ids need not be unique in a user's manifest
        hit = self._history_memo.get(key)
        if hit is not None:
            return hit
        text = history_text(entry)
        if not text:
            return None
        dig = digest_ids(self.tok, text, self.cfg.history_digest_words)
        enc = self.tok.tk.encode(text, add_special_tokens=False)
        starts = np.asarray([o[0] for o in enc.offsets])
        facts = [int(np.searchsorted(starts, f.char_offset, side="right") - 1)
                 for f in entry.facts if f.char_offset >= 0 and f.kind != "distractor"]
        parts = (np.asarray(enc.ids, dtype=np.int32), facts, dig, record_locations(text), record_prior_nodule_mm(text))
        if self.memo_history:
            self._history_memo[key] = parts
        return parts

    def study_inputs(self, entry, rng: np.random.Generator | None = None,
                     arrays: dict[str, np.ndarray] | None = None) -> StudyInputs:
        a = self.cache.arrays(entry) if arrays is None else arrays
        parts = self._history_parts(entry) or ()
        hist, n_digest = self.history_ids(entry, rng, parts)
        acq = None
        if self.cfg.acquisition_prompt and "acquisition" in a:
            acq = str(a["acquisition"])
            if rng is not None and rng.random() < ACQUISITION_DROPOUT:  # as for a NIfTI or a silent header
                acq = None
        locations, placed = known_locations(parts[3] if parts else None, study_detector_locations(a))
        return StudyInputs(
            pixels=a["pixels"].astype(np.float32), z_mm=a["z_mm"], z_index_range=a["z_index_range"],
            mel=a["mel"].astype(np.float32) if "mel" in a else None, history_ids=hist or None, digest_len=n_digest,
            acquisition=acq, record_locations=locations, detector_located=placed,
            prior_nodule_mm=parts[4] if parts else None,
            nodule_mm={k: float(v) for k, v in zip(NODULE_SIZE_KEYS, a["nodule_mm"]) if np.isfinite(v)} or None
            if "nodule_mm" in a else None,
            evidence=study_evidence(a),
        )

    def __getitem__(self, i: int) -> Example:
        e = self.entries[i]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        arrays = self.cache.arrays(e)
        study = self.study_inputs(e, rng, arrays)
        report = self.tok.encode_report(e.sections)[: self.max_report_tokens]
        with_calls = not (self.cfg.finding_prompt_dropout > 0 and rng.random() < self.cfg.finding_prompt_dropout)
        calls = label_calls(e.labels, self.cfg.nodule_size_prompt, rng, self.cfg.nodule_size_dropout)
        prompt = config_prompt_ids(self.tok, self.cfg, calls, study.acquisition, with_calls)
        prefix = [self.tok.bos_id, *(study.history_ids or []), *prompt, self.tok.report_id]
        present, side, loc = finding_targets(e.labels, self.cfg.heads.finding_names, self.cfg.heads.locations)
        tt = None
        if self.cfg.heads.token_loss_weight > 0:
            tt = token_targets(e.lesions, arrays["z_index_range"], arrays["spacing_zyx"], arrays["shape_zyx"][1:],
                               self.cfg.image.grid, self.cfg.heads.finding_names)
        dense = None
        if self.cfg.heads.dense_loss_weight > 0:
            G = dense_grid(self.cfg)
            dense = token_targets(e.lesions, arrays["z_index_range"], arrays["spacing_zyx"], arrays["shape_zyx"][1:],
                                  G, self.cfg.heads.finding_names).reshape(-1, G, G, self.cfg.heads.num_findings)
        spans: tuple[tuple[int, int], ...] = ()
        if self.cfg.fact_weight != 1.0 and e.facts:
            phrases = [f.expect_in_report for f in e.facts if f.kind != "distractor" and f.expect_in_report]
            spans = tuple((len(prefix) + a, len(prefix) + b) for a, b in fact_spans(self.tok, report, phrases))
        fspans: tuple[tuple[int, int], ...] = ()
        if self.cfg.finding_weight != 1.0:
            names = {lab.finding for lab in e.labels if lab.present}
            fspans = tuple((len(prefix) + a, len(prefix) + min(b, len(report)))
                           for a, b in finding_sentence_spans(self.tok, e.sections, names) if a < len(report))
        return Example(e.id, study, prefix + report + [self.tok.eos_id], len(prefix), present, side, loc, tt, len(prompt),
                       dense, spans, self.cfg.fact_weight, fspans, self.cfg.finding_weight)


def collate_examples(examples: Sequence[Example], pad_id: int = 0) -> ModelInputs:
    """Pad examples into ``ModelInputs`` with decoder ids, LM labels (report + EOS only) and labels."""
    x = collate([ex.study for ex in examples])
    T = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # [B, T] right-padded
    lm = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, ex in enumerate(examples):
        ids[b, : len(ex.ids)] = torch.as_tensor(ex.ids)
        lm[b, ex.n_prefix: len(ex.ids)] = ids[b, ex.n_prefix: len(ex.ids)]
    x.ids, x.lm_labels = ids, lm
    if any(ex.fact_spans or ex.finding_spans for ex in examples):
        w = torch.ones(len(examples), T)  # [B, T] LM loss weight of each target token
        for b, ex in enumerate(examples):
            for spans, weight in ((ex.finding_spans, ex.finding_weight), (ex.fact_spans, ex.fact_weight)):
                for a, e in spans:  # a token in both kinds of span takes the fact weight
                    w[b, a:e] = weight
        x.lm_weights = w
    if any(ex.n_prompt for ex in examples):
        x.prompt_len = torch.as_tensor([ex.n_prompt for ex in examples], dtype=torch.long)  # [B]
    x.copy_mask = spans_to_mask(digest_spans(x), T)  # [B, T]: the digest and prompt, right before [REPORT]
    x.labels = FindingLabels(
        torch.as_tensor(np.stack([ex.present_K for ex in examples])),
        torch.as_tensor(np.stack([ex.side_K for ex in examples])),
        torch.as_tensor(np.stack([ex.location_K for ex in examples])),
    )
    if all(ex.token_targets_NK is not None for ex in examples):
        # tokens are laid out slab by slab with the batch's slab padding: [B, S_max*G*G, K]
        per_slab = examples[0].token_targets_NK.shape[0] // max(1, len(examples[0].study.pixels))
        S = x.slab_mask.shape[1]
        tt = torch.zeros(len(examples), S * per_slab, examples[0].token_targets_NK.shape[1])
        for b, ex in enumerate(examples):
            tt[b, : ex.token_targets_NK.shape[0]] = torch.from_numpy(ex.token_targets_NK)
        x.token_targets = tt
    if all(ex.dense_targets_SGGK is not None for ex in examples):
        S = x.slab_mask.shape[1]
        d0 = examples[0].dense_targets_SGGK
        dt = torch.zeros(len(examples), S, *d0.shape[1:])  # [B, S_max, G, G, K], padded slabs all 0
        for b, ex in enumerate(examples):
            dt[b, : ex.dense_targets_SGGK.shape[0]] = torch.from_numpy(ex.dense_targets_SGGK)
        x.dense_targets = dt
    return x


# ----------------------------------------------------------------------------- image crops


def crop_slab_batch(x: ModelInputs, size: int, n_slabs: int, rng: np.random.Generator,
                    lesion_share: float = 0.5) -> ModelInputs:
    """The image-crop stage's batch: per study ``n_slabs`` of its valid slabs, each cut to a
    ``size`` x ``size`` window, with their dense-loss targets cut alike ([B, S, C, H, W] ->
    [B, n, C, size, size]; dense targets [B, S, G, G, K] -> [B, n, size/cell, size/cell, K]).

    Windows start on the dense grid's cells (H / G pixels), so the targets of the window's cells
    are exactly the full slab's (at every dense stage, which max-pools the finest grid). A share
    ``lesion_share`` of the windows is centred on a lesion: a finding drawn uniformly among those
    the study shows (so a one-cell nodule is drawn as often as a large effusion), then one of its
    cells; the rest are drawn uniformly. The backbone then sees about (n_slabs / S) x (size / H)^2
    of a study's pixels a step, with most lesions kept: the same compute covers several times the
    studies (session 19: the encoder was short of exposures; docs/training.md). Studies with fewer
    valid slabs keep them all (the rest masked). Only the image fields and the dense targets are
    carried over."""
    if x.dense_targets is None:
        raise ValueError("the image-crop stage trains on the dense localisation loss: set heads.dense_loss_weight > 0")
    B, S, C, H, W = x.slabs.shape
    G = x.dense_targets.shape[2]
    cell = H // G  # pixels per dense cell
    if H % G or size % cell or size > min(H, W):
        raise ValueError(f"crop size {size} must be a multiple of the dense cell ({cell} px) and at most the slab "
                         f"size {H}; choose e.g. {max(cell, (H // 2) // cell * cell)}")
    g, K = size // cell, x.dense_targets.shape[-1]
    n = max(1, min(n_slabs, S))
    slabs = x.slabs.new_zeros(B, n, C, size, size)
    mask = torch.zeros(B, n, dtype=torch.bool)
    z = x.z_mm.new_zeros(B, n)
    dense = x.dense_targets.new_zeros(B, n, g, g, K)
    last = G - g  # last window start, in cells
    for b in range(B):
        valid = np.flatnonzero(x.slab_mask[b].numpy())
        if not len(valid):
            continue
        picks = rng.permutation(valid)[:n]
        t_b = x.dense_targets[b].numpy()  # [S, G, G, K]
        shown = np.flatnonzero(t_b[valid].reshape(-1, K).any(0))  # findings with a positive cell
        for j, s in enumerate(picks):
            cy = cx = None
            if len(shown) and rng.random() < lesion_share:
                k = int(rng.choice(shown))
                hits = np.argwhere(t_b[valid, :, :, k] > 0)  # [m, 3] (valid-slab index, y, x)
                sv, cy, cx = hits[rng.integers(len(hits))]
                s = valid[sv]
            y0 = int(np.clip(cy - g // 2, 0, last)) if cy is not None else int(rng.integers(0, last + 1))
            x0 = int(np.clip(cx - g // 2, 0, last)) if cx is not None else int(rng.integers(0, last + 1))
            slabs[b, j] = x.slabs[b, s, :, y0 * cell:(y0 + g) * cell, x0 * cell:(x0 + g) * cell]
            dense[b, j] = x.dense_targets[b, s, y0:y0 + g, x0:x0 + g]
            mask[b, j] = True
            z[b, j] = x.z_mm[b, s]
    return ModelInputs(slabs=slabs, slab_mask=mask, z_mm=z, dense_targets=dense, labels=x.labels)

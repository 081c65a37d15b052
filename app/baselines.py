"""Honest baselines for the report generator (issue 6), each writing ``{id: report}`` for a split.

* ``constant``: the single training report whose Findings + Impression scores the best corpus
  BLEU-4 against the *validation* references, given to every study. It measures how much of
  BLEU a model gets for free from boilerplate.
* ``retrieval``: nearest neighbour on the trained image encoder's features (mean of the image
  tokens, cosine similarity); each study gets the report of its closest training study.
* ``template``: the data generator's own (training-pool) templates filled from the model's
  *predicted* findings (the model's calls at its operating points, 0.5 unless fitted on val;
  side and coarse location from the heads; size, amount and other attributes the heads do not
  predict take their most common training value). It isolates what the decoder adds over
  "classifier + template". It needs the predicted findings, which ``app.train.evaluate_split``
  writes beside the generated reports.
* image-blind: not here: it is a model trained without images (``data.images=false`` in
  ``medreport train``), evaluated like the real one.

The product never returns these: its report is always the decoder's output.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from app.evaluate import EvaluationInputError, corpus_bleu_scores, scored_text
from data.report_format import clean_for_bleu

log = logging.getLogger(__name__)

KINDS = ("constant", "retrieval", "template")


def _tokens(report: str) -> list[str]:
    return clean_for_bleu(scored_text(report))


def constant_report(train_reports: Sequence[str], val_reports: Sequence[str], max_candidates: int = 400,
                    seed: int = 0) -> tuple[str, float]:
    """The training report with the best corpus BLEU-4 on the validation references.

    Candidates: up to ``max_candidates`` distinct training reports (a seeded sample when there
    are more). Returns (report, its val BLEU-4)."""
    if not train_reports or not val_reports:
        raise EvaluationInputError("the constant baseline needs train reports (candidates) and val references (to choose)")
    uniq = list(dict.fromkeys(train_reports))
    if len(uniq) > max_candidates:
        idx = np.random.default_rng(seed).choice(len(uniq), max_candidates, replace=False)
        uniq = [uniq[i] for i in sorted(idx)]
    refs = [_tokens(r) for r in val_reports]
    best, best_score = uniq[0], -1.0
    for cand in uniq:
        h = _tokens(cand)
        s = corpus_bleu_scores([h] * len(refs), refs)["bleu4"]
        if s > best_score:
            best, best_score = cand, s
    return best, best_score


def nearest_neighbours(query_QD: np.ndarray, pool_PD: np.ndarray) -> np.ndarray:
    """Index into the pool of each query's nearest neighbour by cosine similarity. -> [Q]"""
    q = query_QD / np.maximum(np.linalg.norm(query_QD, axis=1, keepdims=True), 1e-8)
    p = pool_PD / np.maximum(np.linalg.norm(pool_PD, axis=1, keepdims=True), 1e-8)
    return np.argmax(q @ p.T, axis=1)  # [Q, P] -> [Q]


def image_features(model, entries: Sequence, cache_dir: str | Path | None = None, batch_size: int = 16,
                   progress: bool = True) -> np.ndarray:
    """Mean image-encoder token of each study (eval mode). -> [N, D] float32"""
    import torch
    from tqdm.auto import tqdm

    from app.train_data import PreprocessConfig, StudyCache
    from multimodal.model import StudyInputs, collate

    # audio=True: the same cache files as training (their key covers the dictation); the mel is unused
    cache = StudyCache(cache_dir, PreprocessConfig.from_model(model.cfg))
    model.eval()
    out = []
    bar = tqdm(total=len(entries), desc="image features", disable=not progress)
    for a in range(0, len(entries), batch_size):
        studies = []
        for e in entries[a: a + batch_size]:
            arr = cache.arrays(e)
            studies.append(StudyInputs(pixels=arr["pixels"].astype(np.float32), z_mm=arr["z_mm"],
                                       z_index_range=arr["z_index_range"]))
        x = collate(studies)
        with torch.inference_mode():
            tok_BND, mask_BN = model.image_encoder(x.slabs, x.slab_mask, x.z_mm)
            m = mask_BN[..., None].float()  # [B, N, 1]
            feat = (tok_BND * m).sum(1) / m.sum(1).clamp_min(1)  # [B, D]
        out.append(feat.float().numpy())
        bar.update(len(studies))
    bar.close()
    return np.concatenate(out, 0)


class _Attributes:
    """Most common training value of what the heads do not predict (sizes, amounts, levels)."""

    def __init__(self, train_entries: Sequence):
        self.size: dict[str, float] = {}
        self.attrs: dict[str, dict[str, str]] = {}
        self.location: dict[tuple[str, str], str] = {}  # (finding, coarse location) -> commonest location
        self.any_location: dict[str, str] = {}  # finding -> its commonest location
        sizes: dict[str, list[float]] = {}
        attrs: dict[tuple[str, str], Counter] = {}
        locs: dict[tuple[str, str], Counter] = {}
        from multimodal.heads import coarse_location

        for e in train_entries:
            for lab in e.labels:
                if not lab.present:
                    continue
                if lab.size_mm is not None:
                    sizes.setdefault(lab.finding, []).append(float(lab.size_mm))
                for k, v in (lab.attributes or {}).items():
                    if isinstance(v, str):
                        attrs.setdefault((lab.finding, k), Counter())[v] += 1
                if lab.location:
                    locs.setdefault((lab.finding, coarse_location(lab.location)), Counter())[lab.location] += 1
        self.size = {k: float(np.median(v)) for k, v in sizes.items()}
        for (f, k), c in attrs.items():
            self.attrs.setdefault(f, {})[k] = c.most_common(1)[0][0]
        self.location = {k: c.most_common(1)[0][0] for k, c in locs.items()}
        overall: dict[str, Counter] = {}
        for (f, _), c in locs.items():
            overall.setdefault(f, Counter()).update(c)
        self.any_location = {f: c.most_common(1)[0][0] for f, c in overall.items()}


def template_report(findings: dict, attrs: _Attributes, study_id: str = "x", threshold: float = 0.5,
                    seed: int = 0) -> str:
    """The generator's training-pool template report for predicted findings.

    ``findings``: ``{name: {"p": prob, "present"?: the model's call, "side": side, "location":
    coarse location}}``; a row's ``present`` (the model's own operating point) wins over ``threshold``."""
    from data.report_format import format_report
    from data.synthetic.findings import Case
    from data.synthetic.reports import write_sections
    from data.vocab import LOBE_SIDE, Label

    labels = []
    for name, f in findings.items():
        if not (f["present"] if "present" in f else f.get("p", 0.0) >= threshold):
            continue
        side = f.get("side")
        side = None if side in (None, "none") else side
        coarse = f.get("location") or "unspecified"
        loc = attrs.location.get((name, coarse)) or attrs.any_location.get(name)  # None: a finding without one
        if loc in LOBE_SIDE:
            side = LOBE_SIDE[loc]
        labels.append(Label(name, True, side, loc, attrs.size.get(name), dict(attrs.attrs.get(name, {}))))
    case = Case(id=study_id, seed=seed, split="train", size="demo", age=60, sex="F", indication="",
                labels=labels, contrast=False, has_history=False, history_tokens=0, has_audio=False,
                acquisition={"slice_thickness": 5.0})
    return format_report(write_sections(case, np.random.default_rng(seed), pool="train", history_known=False))


def template_reports(predictions: str | Path, train_entries: Sequence, threshold: float = 0.5) -> dict[str, str]:
    """``template`` baseline from a predictions JSONL (rows ``{"id", "findings": {...}}``)."""
    from data.datasets import iter_jsonl

    attrs = _Attributes(train_entries)
    out = {}
    for n, row in iter_jsonl(Path(predictions), EvaluationInputError):
        if "findings" not in row:
            raise EvaluationInputError(
                f"{Path(predictions).name} line {n} has no 'findings': the template baseline reads the predicted "
                "findings that `medreport demo-model` / app.train.evaluate_split write to test_predictions.jsonl")
        out[str(row["id"])] = template_report(row["findings"], attrs, str(row["id"]), threshold, seed=n)
    return out


def write_jsonl(reports: dict[str, str], path: str | Path, extra: dict | None = None) -> Path:
    from app.report import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps({"id": k, "report": v, **(extra or {})}) + "\n"
                                           for k, v in reports.items()))

"""Scoring generated reports against references.

Pure functions over ``{id: report_text}`` dicts; ``app/commands/evaluate.py`` is the CLI.

Text and tokens (documented contract, ``../shared/docs/contracts.md``):
  * section selection: by default Findings + Impression (``data.report_format.findings_impression``
    of ``parse_report``; organ-system sub-headings dropped). A text without section headings is
    scored whole. ``sections="all"`` scores the whole report text as written.
  * cleaning: ``data.report_format.clean_for_bleu`` — lower case, every punctuation character split
    off as its own token, whitespace split.
  * BLEU-1..4: nltk ``corpus_bleu``, uniform weights, no smoothing, one reference per study.
    Agrees with pycocoevalcap's scorer on the same tokens (tested on the real IU X-Ray reports).
  * ROUGE-L (beta 1.2) and CIDEr-D: pycocoevalcap's implementations on the same tokens.
  * METEOR: pycocoevalcap's METEOR 1.5 jar, which runs offline but needs Java; without ``java``
    on PATH it is left out and the result says why.
  * clinical accuracy: ``data.labeler.label_report`` reads both texts; a finding counts as
    positive when the labeller reads it as present (uncertain mentions count as not positive);
    per-finding precision/recall/F1, micro and macro averages (macro over findings with at
    least one positive reference or prediction).
  * 95% confidence intervals: percentile bootstrap over studies (corpus statistics are
    re-aggregated per resample, so BLEU stays a corpus-level score; CIDEr's document
    frequencies are held at the full corpus's).
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from data.errors import MedreportError
from data.report_format import clean_for_bleu, findings_impression, parse_report

log = logging.getLogger(__name__)

BLEU_WEIGHTS = {
    "bleu1": (1.0, 0.0, 0.0, 0.0),
    "bleu2": (0.5, 0.5, 0.0, 0.0),
    "bleu3": (1 / 3, 1 / 3, 1 / 3, 0.0),
    "bleu4": (0.25, 0.25, 0.25, 0.25),
}


class EvaluationInputError(MedreportError):
    """Hypothesis or reference files that cannot be read or paired."""


# --------------------------------------------------------------------------- inputs
def _report_text(obj: dict) -> str:
    """The report of a JSONL row or report.json: ``report`` text, else formatted ``sections``."""
    if isinstance(obj.get("report"), str):
        return obj["report"]
    if isinstance(obj.get("sections"), dict):
        from data.report_format import SECTION_KEYS, format_report

        return format_report({k: v for k, v in obj["sections"].items() if k in SECTION_KEYS})
    raise EvaluationInputError("a report record has neither a 'report' string nor a 'sections' object")


def read_reports(path: str | Path, split: str | None = None) -> dict[str, str]:
    """Reports keyed by id from a JSONL file (``{"id", "report"}`` per line; manifests work too)
    or a folder: ``<id>.txt`` files, or ``<id>/`` sub-folders holding ``report.txt``,
    ``report.json``, ``reference.txt`` or ``reference.json``. ``split`` keeps only the JSONL
    rows whose ``split`` field equals it (a manifest's train/val/test)."""
    p = Path(path)
    if split is not None and not p.is_file():
        raise EvaluationInputError(f"--split needs a JSONL file with a 'split' field (a manifest); {p} is a folder")
    if not p.exists():
        raise EvaluationInputError(f"{p} does not exist: give a JSONL file of {{\"id\", \"report\"}} rows or a folder of reports")
    out: dict[str, str] = {}
    if p.is_file():
        from data.datasets import iter_jsonl

        for n, obj in iter_jsonl(p, EvaluationInputError):
            if "id" not in obj:
                raise EvaluationInputError(f"{p.name} line {n} has no 'id'")
            if split is not None and obj.get("split") != split:
                continue
            sid = str(obj["id"])
            if sid in out:
                raise EvaluationInputError(f"{p.name} line {n}: id {sid!r} appears twice; ids must be unique")
            try:
                out[sid] = _report_text(obj)
            except EvaluationInputError as exc:
                raise EvaluationInputError(f"{p.name} line {n}: {exc}") from None
        if split is not None and not out:
            raise EvaluationInputError(f"{p.name} has no rows of split {split!r}: check the name (train, val or test)")
        return out
    for f in sorted(p.glob("*.txt")):
        out[f.stem] = f.read_text(encoding="utf-8")
    for d in sorted(x for x in p.iterdir() if x.is_dir()):
        # report.json first: report.txt carries the notice banner and findings table around the report.
        for name in ("report.json", "report.txt", "reference.json", "reference.txt"):
            f = d / name
            if f.is_file():
                out[d.name] = f.read_text(encoding="utf-8") if f.suffix == ".txt" else _report_text(json.loads(f.read_text(encoding="utf-8")))
                break
    if not out:
        raise EvaluationInputError(f"no reports found in folder {p}: expected <id>.txt files or <id>/report.txt")
    return out


def scored_text(report: str, sections: str = "findings,impression") -> str:
    """The part of a report that is scored (see the module docstring)."""
    if sections == "all":
        return report
    parsed = parse_report(report)
    wanted = [s.strip() for s in sections.split(",") if s.strip()]
    if wanted == ["findings", "impression"]:
        return findings_impression(parsed)
    unknown = [s for s in wanted if s not in parsed]
    if unknown:
        raise EvaluationInputError(f"unknown sections {unknown}: use 'all' or a comma list of {list(parsed)}")
    return "\n".join(parsed[s] for s in wanted if parsed[s].strip())


# --------------------------------------------------------------------------- BLEU
@dataclass
class BleuStats:
    """Per-study n-gram statistics; summing them over studies gives nltk's corpus BLEU."""

    matches: np.ndarray  # [N, 4] clipped n-gram matches
    totals: np.ndarray   # [N, 4] hypothesis n-grams
    hyp_len: np.ndarray  # [N]
    ref_len: np.ndarray  # [N] closest reference length


def bleu_stats(hyps: list[list[str]], refs: list[list[str]]) -> BleuStats:
    from nltk.translate.bleu_score import closest_ref_length, modified_precision

    n = len(hyps)
    matches = np.zeros((n, 4), dtype=np.int64)
    totals = np.zeros((n, 4), dtype=np.int64)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        for k in range(4):
            p = modified_precision([r], h, k + 1)
            matches[i, k], totals[i, k] = p.numerator, p.denominator
    hyp_len = np.array([len(h) for h in hyps], dtype=np.int64)
    ref_len = np.array([closest_ref_length([r], len(h)) for h, r in zip(hyps, refs)], dtype=np.int64)
    return BleuStats(matches, totals, hyp_len, ref_len)


def bleu_from_stats(matches_4: np.ndarray, totals_4: np.ndarray, hyp_len: int, ref_len: int) -> dict[str, float]:
    """Corpus BLEU-1..4 from summed statistics, as nltk computes it (no smoothing)."""
    out = {}
    bp = 1.0 if hyp_len > ref_len else (0.0 if hyp_len == 0 else math.exp(1 - ref_len / hyp_len))
    for name, w in BLEU_WEIGHTS.items():
        k = sum(1 for x in w if x > 0)
        if any(matches_4[i] == 0 for i in range(k)):
            out[name] = 0.0
            continue
        s = sum(wi * math.log(matches_4[i] / totals_4[i]) for i, wi in enumerate(w) if wi > 0)
        out[name] = bp * math.exp(s)
    return out


def corpus_bleu_scores(hyps: list[list[str]], refs: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 with nltk's ``corpus_bleu`` itself (the reported point estimate)."""
    import warnings

    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():  # nltk warns on zero n-gram overlap; 0.0 is the documented unsmoothed score
        warnings.simplefilter("ignore", UserWarning)
        return {name: float(corpus_bleu([[r] for r in refs], hyps, weights=w)) for name, w in BLEU_WEIGHTS.items()}


def length_scores(hyps: list[list[str]], refs: list[list[str]]) -> dict[str, float]:
    """Corpus length ratio (hypothesis / reference tokens) and the brevity penalty BLEU multiplies by
    (1 when the hypotheses are longer, else exp(1 - ref / hyp)), as sacrebleu reports them."""
    h, r = sum(map(len, hyps)), sum(map(len, refs))
    bp = 1.0 if h > r else (0.0 if h == 0 else math.exp(1 - r / h))
    return {"length_ratio": h / r if r else 0.0, "brevity_penalty": bp}


def sentence_bleu_scores(hyp: list[str], ref: list[str]) -> dict[str, float]:
    """Single-report BLEU-1..4 (the UI): nltk ``sentence_bleu`` with smoothing method1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    sm = SmoothingFunction().method1
    return {name: float(sentence_bleu([ref], hyp, weights=w, smoothing_function=sm)) for name, w in BLEU_WEIGHTS.items()}


# --------------------------------------------------------------------------- other text metrics
def rouge_l_scores(hyps: list[list[str]], refs: list[list[str]]) -> np.ndarray:
    from pycocoevalcap.rouge.rouge import Rouge

    r = Rouge()
    return np.array([r.calc_score([" ".join(h) or "."], [" ".join(t) or "."]) for h, t in zip(hyps, refs)], dtype=np.float64)


def cider_scores(hyps: list[list[str]], refs: list[list[str]]) -> np.ndarray:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(t)] for i, t in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    _, per = Cider().compute_score(gts, res)
    return np.asarray(per, dtype=np.float64)


def meteor_score(hyps: list[list[str]], refs: list[list[str]]) -> tuple[float | None, str | None]:
    """METEOR 1.5 (pycocoevalcap's jar, offline). Returns (score, None) or (None, why not)."""
    if shutil.which("java") is None:
        return None, "METEOR left out: it needs Java (the METEOR 1.5 jar), and `java` is not on PATH"
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        m = Meteor()
        try:
            score, _ = m.compute_score({i: [" ".join(t) or "."] for i, t in enumerate(refs)},
                                       {i: [" ".join(h) or "."] for i, h in enumerate(hyps)})
        finally:
            m.close() if hasattr(m, "close") else None
        return float(score), None
    except Exception as exc:  # the jar is a subprocess: any failure leaves METEOR out, said plainly
        return None, f"METEOR left out: the METEOR jar failed ({type(exc).__name__})"


# --------------------------------------------------------------------------- clinical accuracy
def finding_matrix(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """[N, F] bool: the labeller reads finding f as present in text n."""
    from data.labeler import label_report
    from data.vocab import FINDING_NAMES

    index = {name: i for i, name in enumerate(FINDING_NAMES)}
    out = np.zeros((len(texts), len(FINDING_NAMES)), dtype=bool)
    for n, t in enumerate(texts):
        for lab in label_report(t):
            if lab.present is True and lab.finding in index:
                out[n, index[lab.finding]] = True
    return out, list(FINDING_NAMES)


def prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 (0 where undefined)."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return p, r, f


def clinical_scores(hyp_NF: np.ndarray, ref_NF: np.ndarray) -> dict[str, float]:
    tp = (hyp_NF & ref_NF).sum(0)
    fp = (hyp_NF & ~ref_NF).sum(0)
    fn = (~hyp_NF & ref_NF).sum(0)
    _, _, f = prf(tp, fp, fn)
    active = (tp + fp + fn) > 0
    mp, mr, mf = prf(tp.sum(), fp.sum(), fn.sum())
    return {
        "finding_micro_precision": float(mp), "finding_micro_recall": float(mr), "finding_micro_f1": float(mf),
        "finding_macro_f1": float(f[active].mean()) if active.any() else 0.0,
    }


# --------------------------------------------------------------------------- the whole evaluation
@dataclass
class Evaluation:
    scores: dict
    per_finding: list[dict]
    ci95: dict
    n: int
    missing_in_hyp: list[str] = field(default_factory=list)
    extra_in_hyp: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: str = "findings,impression"

    def to_json(self) -> dict:
        return {**self.scores, "n": self.n, "ci95": self.ci95, "per_finding": self.per_finding,
                "missing_in_hyp": self.missing_in_hyp, "extra_in_hyp": self.extra_in_hyp,
                "sections": self.sections, "notes": self.notes}


def evaluate_reports(hyp: dict[str, str], ref: dict[str, str], sections: str = "findings,impression",
                     bootstrap: int = 1000, seed: int = 0, meteor: bool = True) -> Evaluation:
    """Score hypotheses against references on the ids both have; the others are reported."""
    missing = sorted(set(ref) - set(hyp))
    extra = sorted(set(hyp) - set(ref))
    ids = sorted(set(hyp) & set(ref))
    notes: list[str] = []
    if missing:
        notes.append(f"{len(missing)} reference ids have no generated report (listed in missing_in_hyp); scored on the {len(ids)} pairs")
    if extra:
        notes.append(f"{len(extra)} generated reports have no reference (listed in extra_in_hyp) and were not scored")
    if not ids:
        raise EvaluationInputError("no id is in both the hypotheses and the references: check that both files use the same ids")
    hyp_txt = [scored_text(hyp[i], sections) for i in ids]
    ref_txt = [scored_text(ref[i], sections) for i in ids]
    H = [clean_for_bleu(t) for t in hyp_txt]
    R = [clean_for_bleu(t) for t in ref_txt]

    scores: dict = corpus_bleu_scores(H, R)
    scores.update(length_scores(H, R))
    rouge = rouge_l_scores(H, R)
    cider = cider_scores(H, R)
    scores["rouge_l"] = float(rouge.mean())
    scores["cider"] = float(cider.mean())
    if meteor:
        m, why = meteor_score(H, R)
        scores["meteor"] = m
        if why:
            notes.append(why)
    hyp_F, names = finding_matrix(hyp_txt)
    ref_F, _ = finding_matrix(ref_txt)
    scores.update(clinical_scores(hyp_F, ref_F))

    tp = (hyp_F & ref_F).sum(0)
    fp = (hyp_F & ~ref_F).sum(0)
    fn = (~hyp_F & ref_F).sum(0)
    p, r, f = prf(tp, fp, fn)
    per_finding = [
        {"finding": nm, "precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]),
         "support": int(ref_F[:, j].sum()), "predicted": int(hyp_F[:, j].sum())}
        for j, nm in enumerate(names)
    ]

    ci = bootstrap_ci(bleu_stats(H, R), rouge, cider, hyp_F, ref_F, n_boot=bootstrap, seed=seed) if bootstrap > 0 else {}
    return Evaluation(scores=scores, per_finding=per_finding, ci95=ci, n=len(ids), missing_in_hyp=missing,
                      extra_in_hyp=extra, notes=notes, sections=sections)


def bootstrap_ci(stats: BleuStats, rouge: np.ndarray, cider: np.ndarray, hyp_F: np.ndarray, ref_F: np.ndarray,
                 n_boot: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Percentile 95% intervals over studies resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(rouge)
    draws: dict[str, list[float]] = {k: [] for k in (*BLEU_WEIGHTS, "rouge_l", "cider", "finding_micro_f1", "finding_macro_f1")}
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        b = bleu_from_stats(stats.matches[idx].sum(0), stats.totals[idx].sum(0), int(stats.hyp_len[idx].sum()), int(stats.ref_len[idx].sum()))
        for k, v in b.items():
            draws[k].append(v)
        draws["rouge_l"].append(float(rouge[idx].mean()))
        draws["cider"].append(float(cider[idx].mean()))
        c = clinical_scores(hyp_F[idx], ref_F[idx])
        draws["finding_micro_f1"].append(c["finding_micro_f1"])
        draws["finding_macro_f1"].append(c["finding_macro_f1"])
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in draws.items()}


def score_single(hyp_report: str, ref_report: str, sections: str = "findings,impression") -> dict:
    """One report against one reference (the UI): sentence BLEU (smoothing method1, labelled so)
    and finding agreement, with the findings that differ."""
    h_txt, r_txt = scored_text(hyp_report, sections), scored_text(ref_report, sections)
    bleu = sentence_bleu_scores(clean_for_bleu(h_txt), clean_for_bleu(r_txt))
    hF, names = finding_matrix([h_txt])
    rF, _ = finding_matrix([r_txt])
    differ = [{"finding": nm, "generated": bool(hF[0, j]), "reference": bool(rF[0, j])}
              for j, nm in enumerate(names) if hF[0, j] != rF[0, j]]
    agree = float((hF == rF).mean())
    return {"bleu_kind": "sentence BLEU, nltk smoothing method1", **bleu,
            "finding_agreement": agree, "findings_that_differ": differ}


# --------------------------------------------------------------------------- HTML summary
def render_html(ev: Evaluation, title: str = "medreport evaluation") -> str:
    """A self-contained HTML page: scores with CIs, notes, and a per-finding F1 chart."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [pf for pf in ev.per_finding if pf["support"] or pf["predicted"]]
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(rows), 3) + 1))
    ax.barh([r["finding"] for r in rows], [r["f1"] for r in rows], color="#3b6ea5")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.invert_yaxis()
    ax.set_title("Per-finding F1 (labeller on generated vs reference text)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    score_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td><td>{'' if k not in ev.ci95 else f'[{ev.ci95[k][0]:.4f}, {ev.ci95[k][1]:.4f}]'}</td></tr>"
        for k, v in ev.scores.items()
    )
    finding_rows = "".join(
        f"<tr><td>{html.escape(r['finding'])}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td><td>{r['support']}</td><td>{r['predicted']}</td></tr>"
        for r in ev.per_finding
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in ev.notes)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}td,th{{padding:2px 10px;text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{ev.n} studies scored on: {html.escape(ev.sections)}. Tokens: lower case, punctuation split off, whitespace split.</p>
<ul>{notes}</ul>
<h2>Scores (95% bootstrap CI)</h2><table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{score_rows}</table>
<h2>Findings</h2><img alt="per-finding F1" src="data:image/png;base64,{img}">
<table><tr><th>finding</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>predicted</th></tr>{finding_rows}</table>
</body></html>"""


def facts_carried(hyp: dict[str, str], entries) -> dict:
    """How often the planted history facts reach the report: the share of facts whose expected
    phrase appears in the generated text (case-insensitive), and the share of studies (with a
    history holding at least one such fact) whose every fact does."""
    checked = [e for e in entries if (e.history or e.history_text) and e.id in hyp]
    facts = [(e, f) for e in checked for f in e.facts if f.kind != "distractor" and f.expect_in_report]
    hit = [f.expect_in_report.lower() in hyp[e.id].lower() for e, f in facts]
    per_study: dict[str, bool] = {}
    for (e, _), h in zip(facts, hit):
        per_study[e.id] = per_study.get(e.id, True) and h
    by_kind: dict[str, list[bool]] = {}
    for (_, f), h in zip(facts, hit):
        by_kind.setdefault(f.kind, []).append(h)
    # A prior-nodule fact's phrase ("increased from 6 mm to 9 mm") joins the record's prior size
    # with today's size, which only the image gives (to the millimetre). Reported apart, not part
    # of the rate above: how often the record's part ("from 6 mm", "unchanged at 9 mm") is there.
    prior = [(e, _prior_part(f.expect_in_report)) for e, f in facts if f.kind == "prior_nodule"]
    prior_hit = [p.lower() in hyp[e.id].lower() for e, p in prior if p]
    return {"facts_carried": float(np.mean(hit)) if hit else None, "facts_checked": len(hit),
            "facts_carried_studies": float(np.mean(list(per_study.values()))) if per_study else None,
            "facts_studies_checked": len(per_study),
            "facts_carried_by_kind": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())},
            "prior_nodule_record_part_carried": round(float(np.mean(prior_hit)), 4) if prior_hit else None}


def _prior_part(phrase: str) -> str | None:
    """The record's part of a prior-nodule phrase: "from 6 mm" / "unchanged at 9 mm"."""
    m = re.search(r"\b(from|unchanged at) (\d+(?:\.\d+)?) mm\b", phrase)
    return f"{m.group(1)} {m.group(2)} mm" if m else None


def manifest_facts(path: str | Path, ids) -> list | None:
    """The manifest entries of ``ids`` when ``path`` is a manifest whose studies carry planted
    history facts (synthetic data), else None (plain report files have no facts to check)."""
    p = Path(path)
    if not p.is_file():
        return None
    from data.datasets import read_manifest

    try:
        entries = read_manifest(p, validate=False)
    except Exception:  # noqa: BLE001 - not a manifest (a plain {"id", "report"} file): nothing to check
        return None
    wanted = set(ids)
    entries = [en for en in entries if en.id in wanted]
    return entries if any(en.facts for en in entries) else None

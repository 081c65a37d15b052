"""How a model writes its reports: greedy, beam search or MBR over samples, chosen on held-out studies.

A model folder may hold ``decoding.json`` beside its weights (written by ``medreport
tune-decoding`` and by ``medreport demo-model``)::

    {"chosen": {"strategy": "beam", "num_beams": 4, "length_penalty": 1.5, "no_repeat_ngram_size": 0},
     "split": "val", "studies": 120, "criterion": "bleu4", "table": [...one row per candidate...]}

``medreport generate``, the web UI and ``ReportPipeline.from_dir`` decode with ``chosen`` unless
told otherwise; a folder without the file decodes greedily. The choice is made on the val split
(never the test split) by corpus BLEU-4 of Findings + Impression, the product's headline metric;
the table keeps every candidate's facts carried and labeller F1 so that a trade-off is visible.

Why it matters: BLEU multiplies by a brevity penalty, exp(1 - reference length / hypothesis
length) when the hypotheses are shorter. Greedy decoding ends a report at the first point where
EOS is the likeliest next token; beam search with a length penalty (the sum of log-probabilities
divided by length ** penalty) compares whole reports instead, and a penalty above 1 favours the
longer of two equally likely ones.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from data.errors import MedreportError

log = logging.getLogger(__name__)

DECODING_FILE = "decoding.json"
# the settings a decoding.json may choose, with their types
DECODING_KEYS: dict[str, type] = {"strategy": str, "num_beams": int, "length_penalty": float, "no_repeat_ngram_size": int,
                                  "consistent_with_calls": bool, "num_samples": int, "temperature": float,
                                  "calls_agreement": float, "record_agreement": float, "acquisition_agreement": float,
                                  "mbr_from": str}
# what MBR compares the samples on: the whole report, or the Findings and Impression only
MBR_FROM = ("report", "findings")
GREEDY = {"strategy": "greedy", "num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
          "consistent_with_calls": False}


def mbr_rerank(tokenizer, called, facts, calls_agreement: float, record_agreement: float,
               contrast: bool | None = None, acquisition_agreement: float = 0.0):
    """One study's MBR rerank score (``core.generate.Rerank``): ``CallsAgreement`` over the called
    finding names at ``calls_agreement`` plus ``RecordAgreement`` over the record's ``facts`` at
    ``record_agreement`` plus ``AcquisitionAgreement`` (the Technique states the header's
    ``contrast``) at ``acquisition_agreement`` (``data.report_consistency``; each left out at weight
    0, the second also without facts, the third when the header does not say whether contrast was
    given); None when all are. The pipeline and ``evaluate_split`` build it alike."""
    from core.generate import sum_reranks
    from data.report_consistency import AcquisitionAgreement, CallsAgreement, RecordAgreement

    facts = tuple(facts)
    return sum_reranks([CallsAgreement(tokenizer, called, calls_agreement) if calls_agreement > 0 else None,
                        RecordAgreement(tokenizer, facts, record_agreement) if record_agreement > 0 and facts else None,
                        AcquisitionAgreement(tokenizer, contrast, acquisition_agreement)
                        if acquisition_agreement > 0 and contrast is not None else None])


class DecodingError(MedreportError):
    """A decoding.json that cannot be used, or a tuning request that cannot run."""


def validate_decoding(chosen: dict, where: str = "decoding") -> dict:
    """``chosen`` with its values checked and typed; unknown keys or bad values raise with the fix."""
    unknown = sorted(set(chosen) - set(DECODING_KEYS))
    if unknown:
        raise DecodingError(f"{where}: unknown setting(s) {unknown}; allowed: {sorted(DECODING_KEYS)}")
    out = {}
    for k, v in chosen.items():
        if DECODING_KEYS[k] is bool:
            if not isinstance(v, bool):
                raise DecodingError(f"{where}: {k}={v!r} must be true or false")
            out[k] = v
            continue
        try:
            out[k] = DECODING_KEYS[k](v)
        except (TypeError, ValueError):
            raise DecodingError(f"{where}: {k}={v!r} is not a {DECODING_KEYS[k].__name__}") from None
    if out.get("strategy", "greedy") not in ("greedy", "beam", "sample", "mbr"):
        raise DecodingError(f"{where}: strategy must be greedy, beam, sample or mbr, not {out['strategy']!r}")
    if out.get("num_beams", 1) < 1 or out.get("no_repeat_ngram_size", 0) < 0 or out.get("num_samples", 1) < 1:
        raise DecodingError(f"{where}: num_beams and num_samples must be >= 1 and no_repeat_ngram_size >= 0")
    if (out.get("temperature", 1.0) <= 0 or out.get("calls_agreement", 0.0) < 0 or out.get("record_agreement", 0.0) < 0
            or out.get("acquisition_agreement", 0.0) < 0):
        raise DecodingError(f"{where}: temperature must be > 0, calls_agreement, record_agreement and "
                            "acquisition_agreement >= 0")
    if out.get("mbr_from", "report") not in MBR_FROM:
        raise DecodingError(f"{where}: mbr_from must be one of {list(MBR_FROM)}, not {out['mbr_from']!r}")
    return out


def read_decoding(model_dir: str | Path) -> dict:
    """The decoding settings a model folder chose (``decoding.json``'s ``chosen``), or {} if none."""
    p = Path(model_dir) / DECODING_FILE
    if not p.is_file():
        return {}
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        chosen = doc["chosen"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DecodingError(f"{p} is not a decoding file with a 'chosen' object: rerun `medreport tune-decoding "
                            f"--model {Path(model_dir)}` or delete it to decode greedily") from None
    return validate_decoding(chosen, str(p))


def write_decoding(model_dir: str | Path, chosen: dict, table: list[dict], split: str, studies: int) -> Path:
    p = Path(model_dir) / DECODING_FILE
    doc = {"chosen": validate_decoding(chosen), "split": split, "studies": studies, "criterion": "bleu4",
           "table": table}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    tmp.replace(p)
    return p


def parse_numbers(flag: str, text: str) -> tuple[float, ...]:
    """A comma list of numbers given to ``flag`` (``--temperatures 0.7,1.0``)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DecodingError(f"{flag} {text!r}: give numbers separated by commas, e.g. 1.0,1.5") from None


def parse_mbr_from(flag: str, text: str) -> tuple[str, ...]:
    """A comma list of ``MBR_FROM`` values given to ``flag`` (``--mbr-from report,findings``)."""
    got = tuple(x.strip() for x in text.split(",") if x.strip())
    if not got or any(x not in MBR_FROM for x in got):
        raise DecodingError(f"{flag} {text!r}: give report, findings or both separated by a comma")
    return got


def candidates(num_beams: int = 4, length_penalties: tuple[float, ...] = (1.0, 1.5, 2.0),
               consistency: bool = False, mbr_samples: int = 0, temperatures: tuple[float, ...] = (0.7,),
               calls_agreements: tuple[float, ...] = (1.0,), record_agreements: tuple[float, ...] = (0.0,),
               mbr_from: tuple[str, ...] = ("report",),
               acquisition_agreements: tuple[float, ...] = (1.0,)) -> list[dict]:
    """Greedy first (the cheapest, kept on ties), then beam search at each length penalty; with
    ``consistency`` each of them again with the findings-table veto (``consistent_with_calls``);
    with ``mbr_samples`` > 0, MBR over that many samples at each temperature and calls-agreement
    weight, record-agreement weight (``record_agreements``: the record's facts carried),
    acquisition-agreement weight (``acquisition_agreements``: the Technique states the scan's
    contrast) and each ``mbr_from`` (what the samples are compared on) (``core.generate``; the most
    expensive, last)."""
    out = [dict(GREEDY)]
    if num_beams > 1:
        out += [{"strategy": "beam", "num_beams": num_beams, "length_penalty": float(lp), "no_repeat_ngram_size": 0,
                 "consistent_with_calls": False} for lp in length_penalties]
    if consistency:
        out += [{**c, "consistent_with_calls": True} for c in list(out)]
    if mbr_samples > 0:
        out += [{"strategy": "mbr", "num_samples": mbr_samples, "temperature": float(t), "calls_agreement": float(w),
                 "record_agreement": float(r), "acquisition_agreement": float(a), "mbr_from": f, "num_beams": 1,
                 "length_penalty": 1.0, "no_repeat_ngram_size": 0, "consistent_with_calls": False}
                for f in mbr_from for t in temperatures for w in calls_agreements for r in record_agreements
                for a in acquisition_agreements]
    return out


def choose(table: list[dict], criterion: str = "bleu4") -> dict:
    """The candidate with the highest ``criterion`` (the earlier, cheaper one on a tie)."""
    if not table:
        raise DecodingError("no decoding candidates were scored")
    best = max(range(len(table)), key=lambda i: (table[i][criterion], -i))
    return {k: table[best][k] for k in DECODING_KEYS if k in table[best]}


def tune_decoding(model, manifest: str | Path, split: str = "val", max_studies: int = 120,
                  cands: list[dict] | None = None, max_history_tokens: int = 100_000, batch_size: int = 8,
                  max_new_tokens: int = 400, progress: bool = True,
                  cache_dir: str | Path | None = None) -> tuple[dict, list[dict]]:
    """Score each candidate decoding on ``split`` (the same studies for all) and return (chosen, table)."""
    from app.train import evaluate_split

    if split == "test":
        raise DecodingError("choosing the decoding on the test split would leak it into the test metrics: use val")
    table = []
    for c in cands or candidates():
        c = validate_decoding(c)
        m = evaluate_split(model, manifest, split, max_studies=max_studies, max_history_tokens=max_history_tokens,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                           cache_dir=cache_dir, **c)
        row = {**c, **{k: m.get(k) for k in ("n", "bleu1", "bleu4", "rouge_l", "cider", "brevity_penalty", "length_ratio",
                                             "text_finding_micro_f1", "text_finding_consistency", "facts_carried",
                                             "seconds_per_study")}}
        log.info("decoding %s: %s", c, {k: row[k] for k in ("bleu4", "length_ratio", "facts_carried")})
        table.append(row)
    return choose(table), table


def format_table(table: list[dict], chosen: dict) -> str:
    """The candidates as a text table (tune-decoding's output, the model card), the chosen row marked."""
    head = f"{'decoding':<26} {'BLEU-4':>7} {'len/ref':>7} {'BP':>6} {'facts':>6} {'text F1':>7} {'s/study':>7}"
    lines = [head]
    for r in table:
        name = ("greedy" if r["strategy"] == "greedy" else
                f"mbr {r['num_samples']} T {r['temperature']:g} agree {r['calls_agreement']:g}/{r.get('record_agreement', 0):g}"
                + (f"/{r['acquisition_agreement']:g}" if r.get("acquisition_agreement") else "")
                + (" F+I" if r.get("mbr_from") == "findings" else "") if r["strategy"] == "mbr" else
                f"{r['strategy']} {r['num_beams']} lp {r['length_penalty']:g}")
        name += " +veto" if r.get("consistent_with_calls") else ""
        mark = " <- chosen" if all(r.get(k, GREEDY.get(k)) == v for k, v in chosen.items() if k in DECODING_KEYS) else ""
        lines.append(f"{name:<26} {r['bleu4']:7.4f} {r['length_ratio']:7.3f} {r['brevity_penalty']:6.3f} "
                     f"{(r.get('facts_carried') or 0):6.3f} {(r.get('text_finding_micro_f1') or 0):7.3f} "
                     f"{(r.get('seconds_per_study') or 0):7.2f}{mark}")
    return "\n".join(lines)

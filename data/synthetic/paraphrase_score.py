"""The paraphrase reference score: BLEU-1..4 (Findings + Impression) of a report rewritten from
the true labels with independently sampled paraphrases, against the reference reports.

It says what "says the right things in other words" scores on this data. It is not a ceiling:
a model that always writes the most common phrasing can exceed it.

    python -m data.synthetic.paraphrase_score --n 2000
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from nltk.translate.bleu_score import corpus_bleu

from data.report_format import clean_for_bleu, findings_impression
from data.synthetic.findings import sample_case
from data.synthetic.reports import write_sections

WEIGHTS = ((1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25))


def bleu_1_4(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (nltk, uniform weights, no smoothing) on ``clean_for_bleu`` tokens."""
    refs = [[clean_for_bleu(r)] for r in references]
    hyps = [clean_for_bleu(h) for h in hypotheses]
    return {f"bleu{n}": float(corpus_bleu(refs, hyps, weights=w)) for n, w in enumerate(WEIGHTS, 1)}


def paraphrase_score(n: int = 2000, seed: int = 0, size: str = "demo", ref_pool: str = "test",
                     hyp_pool: str = "train") -> dict[str, float]:
    """Score ``n`` synthetic cases: references from ``ref_pool`` templates, rewrites of the same
    truth from ``hyp_pool`` templates with an independent random stream."""
    refs, hyps = [], []
    for i in range(n):
        case = sample_case(np.random.default_rng([seed, i]), f"p{i}", i, "test", size)
        refs.append(findings_impression(write_sections(case, np.random.default_rng([seed, i, 1]), pool=ref_pool)))
        hyps.append(findings_impression(write_sections(case, np.random.default_rng([seed, i, 2]), pool=hyp_pool)))
    return bleu_1_4(refs, hyps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="paraphrase reference score of the synthetic reports")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = {}
    for ref_pool, hyp_pool in (("test", "train"), ("test", "test"), ("train", "train")):
        s = paraphrase_score(args.n, args.seed, ref_pool=ref_pool, hyp_pool=hyp_pool)
        out[f"ref={ref_pool},hyp={hyp_pool}"] = s
        print(f"references: {ref_pool:5s} templates, rewrite: {hyp_pool:5s} templates  " +
              "  ".join(f"{k.upper()} {v:.3f}" for k, v in s.items()))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

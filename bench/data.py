"""Data benchmarks: history generation and tokenization at 100K tokens, per-study generation.

    python -m bench.data            # full
    python -m bench.data --quick    # smoke run

Prints a table and writes bench/results/data.json. Targets: tokenizing a 100K-token history in
< 1 s; 2,000 demo studies in <= 15 min on 2 cores (~0.9 s per study per core).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from data.report_format import format_report
from data.synthetic import dictation
from data.synthetic.findings import sample_case
from data.synthetic.histories import approx_tokens, write_history
from data.synthetic.reports import write_sections
from data.synthetic.writer import DatasetConfig, generate_study
from data.tokenizer import ReportTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "data.json"


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and studies")
    ap.add_argument("--tokens", type=int, default=100_000, help="history length to time (approximate tokens)")
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else 3
    rows: list[tuple[str, float, str]] = []
    res: dict[str, object] = {"quick": args.quick, "cpu_count": os.cpu_count(),
                              "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}

    case = sample_case(np.random.default_rng(0), "bench", 0, "train", "demo", force={"prior_nodule": True, "has_history": True})
    t_hist, (history, facts) = _best(lambda: write_history(case, np.random.default_rng(1), args.tokens), repeat)
    n_approx = approx_tokens(history)
    rows.append((f"history generation ({n_approx:,} approx tokens, {len(history):,} chars)", t_hist, "s"))

    corpus = [history[i:i + 20_000] for i in range(0, min(len(history), 400_000), 20_000)]
    for i in range(200 if not args.quick else 50):
        c = sample_case(np.random.default_rng(100 + i), "t", i, "train", "demo")
        corpus.append(format_report(write_sections(c, np.random.default_rng(i))))
    t_train, tok = _best(lambda: ReportTokenizer.train(corpus, vocab_size=8000), 1)
    rows.append((f"tokenizer training ({len(corpus)} texts, vocab {tok.vocab_size})", t_train, "s"))
    t_tok, ids = _best(lambda: tok.encode(history), repeat)
    rows.append((f"tokenize history ({len(ids):,} BPE tokens)  [target < 1 s]", t_tok, "s"))
    t_dec, _ = _best(lambda: tok.decode(ids), repeat)
    rows.append(("decode history", t_dec, "s"))
    res.update(history_tokens_approx=n_approx, history_chars=len(history), history_bpe_tokens=len(ids),
               history_gen_s=t_hist, tokenize_s=t_tok, decode_s=t_dec, tokenizer_train_s=t_train,
               tokenize_target_met=t_tok < 1.0)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        n = 3 if args.quick else 10
        audio = dictation.available()
        for size in ("tiny", "demo"):
            cfg = DatasetConfig(n=n, seed=123, size=size, history_tokens=(200, 16000), audio=audio)
            generate_study(cfg, 0, tmp / size)  # warm-up (imports, engine init)
            t = time.perf_counter()
            for i in range(1, n + 1):
                generate_study(cfg, i, tmp / size)
            per = (time.perf_counter() - t) / n
            rows.append((f"generate one {size} study (1 process, audio={audio})", per, "s"))
            res[f"study_{size}_s"] = per
        per_demo = res["study_demo_s"]
        est = 2000 * per_demo / 2
        rows.append(("-> 2,000 demo studies on 2 workers (extrapolated)  [target <= 900 s]", est, "s"))
        res["extrapolated_2000_demo_2workers_s"] = est
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}")
    for name, v, unit in rows:
        print(f"{name:<{width}}  {v:>9.3f}{unit}")
    print(f"(load average {res['load_avg_1m']}; other processes on the machine skew these timings)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

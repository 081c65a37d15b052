"""End-to-end report latency of the product path (``app.pipeline.ReportPipeline.run``).

    python -m bench.e2e [--model models/demo] [--runs 10] [--lengths 2000,100000] [--quick]
    python -m bench.e2e --study examples/studies/syn00002 --lengths 2000 --no-int8 --name e2e_example

A 64-slice demo study (a synthetic one written here, with dictation when a speech synthesizer is
available) with a patient record of 2K and 100K tokens: load, encode, generate (and Grad-CAM
evidence) timed per stage, p50 / p95 over ``--runs`` runs, fp32 and with int8 dynamic
quantization of the decoder. The quantization's effect on the report is measured on
``--quality-studies`` test studies of a manifest, when one is given: BLEU-4 and finding agreement
of the int8 reports against the fp32 ones (identical reports = 1.0), and against the references.

The process keeps freed memory in its heap, as the ``medreport`` command runs
(``app.cli.configure_allocator``); ``--default-malloc`` keeps glibc's defaults, under which every
100K-token call maps its ~100 MB tensors afresh (session 17: 8.7 s against 6.3 s p50 at 100K).

Writes ``bench/results/e2e.json`` (``e2e_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import machine, print_table, product_allocator, write_json

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def _history_of_tokens(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A synthetic patient record of about ``n_tokens`` tokens (the generator's own filler)."""
    from data.synthetic.histories import write_history
    from data.synthetic.findings import sample_case

    rng = np.random.default_rng(seed)
    case = sample_case(rng, "bench", seed, "test", "demo", history_tokens=(n_tokens, n_tokens))
    case.has_history = True
    case.history_tokens = n_tokens
    text, _ = write_history(case, np.random.default_rng([seed, 2]))
    ids = tokenizer.tk.encode(text, add_special_tokens=False).ids
    if len(ids) > n_tokens:  # trim to the target (keep the most recent part)
        text = tokenizer.tk.decode(ids[len(ids) - n_tokens:])
    return text


def _write_study(out: Path) -> Path:
    from data.synthetic import dictation
    from data.synthetic.writer import DatasetConfig, write_dataset

    cfg = DatasetConfig(n=1, seed=7, size="demo", history_tokens=(200, 400), audio=dictation.available())
    write_dataset(out, cfg, workers=1, progress=False)
    return out / "studies" / "syn00000"


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def latency(pipe, study: Path, history: str, runs: int) -> dict:
    pipe.run(study, history_text=history)  # warm-up (allocations, first-call costs)
    totals, stages = [], {}
    for _ in range(runs):
        t0 = time.perf_counter()
        rep = pipe.run(study, history_text=history)
        totals.append(time.perf_counter() - t0)
        for k, v in rep.provenance["timings_s"].items():
            stages.setdefault(k, []).append(v)
    row = {"p50_s": _pct(totals, 50), "p95_s": _pct(totals, 95), "runs": runs,
           "history_tokens_read": rep.provenance["input"]["history_tokens"]}
    for k, v in stages.items():
        row[f"{k}_p50_s"] = _pct(v, 50)
    row["report_tokens"] = rep.provenance["generation"]["tokens_generated"]
    row["heatmaps"] = len(getattr(rep, "heatmaps", {}) or {})  # findings given a Grad-CAM heatmap
    return row


def quality(model_dir: Path, manifest: Path, n: int, decoding: dict) -> dict:
    """int8 vs fp32 reports on ``n`` test studies (2K-token history budget), decoded as ``decoding``."""
    from app.evaluate import evaluate_reports
    from app.pipeline import PipelineConfig, ReportPipeline
    from data.datasets import read_manifest

    entries = [e for e in read_manifest(manifest) if e.split == "test"][:n]
    cfg = PipelineConfig(evidence=False, max_history_tokens=2048, **decoding)
    out = {}
    for name, q in (("fp32", False), ("int8", True)):
        pipe = ReportPipeline.from_dir(model_dir, config=cfg, quantize=q)
        t0 = time.perf_counter()
        out[name] = {e.id: pipe.run(e.path(e.study), history_path=e.path(e.history) if e.history else None,
                                    audio_path=e.path(e.audio) if e.audio else None).report_text for e in entries}
        out[name + "_s"] = time.perf_counter() - t0
    ref = {e.id: e.report for e in entries}
    f, i8 = (evaluate_reports(out[k], ref, bootstrap=0, meteor=False).scores for k in ("fp32", "int8"))
    agree = evaluate_reports(out["int8"], out["fp32"], bootstrap=0, meteor=False).scores
    return {"studies": len(entries), "fp32_bleu4": f["bleu4"], "int8_bleu4": i8["bleu4"],
            "fp32_finding_micro_f1": f["finding_micro_f1"], "int8_finding_micro_f1": i8["finding_micro_f1"],
            "int8_vs_fp32_bleu4": agree["bleu4"], "int8_vs_fp32_finding_micro_f1": agree["finding_micro_f1"],
            "identical_reports": sum(out["fp32"][k] == out["int8"][k] for k in ref) / len(ref),
            "fp32_seconds": out["fp32_s"], "int8_seconds": out["int8_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--runs-long", type=int, default=10, help="runs for histories over 10K tokens (each ~a minute)")
    ap.add_argument("--lengths", default="2000,100000", help="history lengths in tokens")
    ap.add_argument("--manifest", type=Path, default=None, help="dataset manifest for the int8 quality check")
    ap.add_argument("--quality-studies", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--quick", action="store_true", help="2 runs, 2K history only, 4 quality studies")
    ap.add_argument("--study", type=Path, default=None,
                    help="time this study (e.g. an example with findings, so that heatmaps are computed) "
                         "instead of a freshly written synthetic one")
    ap.add_argument("--no-int8", action="store_true", help="fp32 only")
    ap.add_argument("--name", default="e2e", help="results file name in bench/results (default e2e)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator (default: freed memory kept in the heap, as `medreport` runs)")
    args = ap.parse_args(argv)
    _, allocator = product_allocator(args.default_malloc)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.runs, args.lengths, args.quality_studies = 2, "2000", 4
    from app.decoding import read_decoding
    from app.pipeline import PipelineConfig, ReportPipeline

    decoding = read_decoding(args.model)  # the product's decoding: the model folder's choice, else greedy
    lengths = [int(x) for x in args.lengths.split(",") if x]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study = args.study or _write_study(Path(tmp) / "ds")
        for quant in (False,) if args.no_int8 else (False, True):
            pipe = ReportPipeline.from_dir(args.model, config=PipelineConfig(**decoding), quantize=quant)
            for n in lengths:
                hist = _history_of_tokens(pipe.tokenizer, n)
                runs = args.runs if n <= 10_000 else max(2, min(args.runs, args.runs_long))
                r = latency(pipe, study, hist, runs)
                r.update(history_tokens=n, decoder="int8" if quant else "fp32")
                rows.append(r)
                print(f"  {r['decoder']} history {n}: p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s", flush=True)
    cols = ["decoder", "history_tokens", "p50_s", "p95_s", "loading_p50_s", "encoding_p50_s", "generating_p50_s",
            "evidence_p50_s", "report_tokens", "heatmaps"]
    print(f"decoding: {decoding or 'greedy'}")
    print_table(rows, cols)
    payload = {"model": str(args.model), "study": str(args.study) if args.study else "synthetic (seed 7)",
               "decoding": decoding or {"strategy": "greedy"}, "machine": machine(),
               "allocator": allocator, "rows": rows}
    for n in lengths:
        f = next(r for r in rows if r["history_tokens"] == n and r["decoder"] == "fp32")
        payload[f"p50_{n}_s"], payload[f"p95_{n}_s"] = f["p50_s"], f["p95_s"]
        q = next((r for r in rows if r["history_tokens"] == n and r["decoder"] == "int8"), None)
        if q is not None:
            payload[f"int8_speedup_{n}"] = f["p50_s"] / q["p50_s"]
    path = write_json(args.name, payload, quick=args.quick)  # latency first: kept if the quality check fails
    if args.manifest:
        payload["int8_quality"] = quality(args.model, args.manifest, args.quality_studies, decoding)
        print(json.dumps(payload["int8_quality"], indent=1))
        path = write_json(args.name, payload, quick=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

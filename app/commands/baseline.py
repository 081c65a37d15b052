"""`medreport baseline KIND --manifest M --out HYP.jsonl`: baseline reports for one split, to be
scored with `medreport evaluate --hyp HYP.jsonl --ref M --split test` like the model's own.

Kinds (see app/baselines.py): constant (BLEU-best training report, chosen on val), retrieval
(nearest training study by the model's image-encoder features), template (generator templates
filled from the model's predicted findings, read from --predictions)."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

NAME = "baseline"
HELP = "write baseline reports (constant, retrieval, template) for a split of a manifest"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("constant", "retrieval", "template"))
    p.add_argument("--manifest", required=True, type=Path, help="dataset manifest (train/val/test splits)")
    p.add_argument("--out", required=True, type=Path, help="JSONL of {id, report} to write")
    p.add_argument("--split", default="test", help="split to write reports for (default test)")
    p.add_argument("--model", type=Path, default=None, help="trained model directory (retrieval)")
    p.add_argument("--predictions", type=Path, default=None,
                   help="JSONL with predicted findings per study (template), e.g. runs/demo/test_predictions.jsonl")
    p.add_argument("--max-train", type=int, default=0, help="retrieval: training studies in the pool (0 = all)")
    p.add_argument("--cache-dir", type=Path, default=None, help="retrieval: preprocessed-study cache (e.g. the training one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from app import baselines
    from data.datasets import read_manifest
    from data.errors import MedreportError

    entries = read_manifest(args.manifest, validate=False)
    by_split: dict[str, list] = {}
    for e in entries:
        by_split.setdefault(e.split, []).append(e)
    target = by_split.get(args.split, [])
    if not target:
        raise MedreportError(f"{args.manifest} has no '{args.split}' studies: use --split train, val or test")
    train = by_split.get("train", [])
    t0 = time.perf_counter()
    extra = {"baseline": args.kind}
    if args.kind == "constant":
        report, val_b4 = baselines.constant_report([e.report for e in train], [e.report for e in by_split.get("val", [])],
                                                   seed=args.seed)
        reports = {e.id: report for e in target}
        print(f"constant report chosen on {len(by_split.get('val', []))} val references (val BLEU-4 {val_b4:.4f})")
    elif args.kind == "retrieval":
        if args.model is None:
            raise MedreportError("retrieval needs --model DIR (its image encoder gives the features)")
        import numpy as np

        from multimodal.model import ReportModel

        model = ReportModel.from_pretrained(args.model)
        pool = train
        if args.max_train and len(pool) > args.max_train:
            idx = np.random.default_rng(args.seed).choice(len(pool), args.max_train, replace=False)
            pool = [pool[i] for i in sorted(idx)]
        fp = baselines.image_features(model, pool, args.cache_dir, progress=not args.no_progress)
        fq = baselines.image_features(model, target, None, progress=not args.no_progress)
        nn_idx = baselines.nearest_neighbours(fq, fp)
        reports = {e.id: pool[int(j)].report for e, j in zip(target, nn_idx)}
        extra["pool"] = len(pool)
    else:
        if args.predictions is None:
            raise MedreportError("template needs --predictions FILE (predicted findings per study, as "
                                 "`medreport demo-model` writes to RUN/test_predictions.jsonl)")
        reports = baselines.template_reports(args.predictions, train)
        wanted = {e.id for e in target}
        reports = {k: v for k, v in reports.items() if k in wanted}
    baselines.write_jsonl(reports, args.out, extra)
    print(f"wrote {len(reports)} {args.kind} baseline reports for split '{args.split}' to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0

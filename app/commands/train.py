"""``medreport train``: train a report model on a manifest (single process or torchrun DDP)."""
from __future__ import annotations

import argparse
import os
import logging
from pathlib import Path

NAME = "train"
HELP = "train a report model on a manifest (torchrun --nproc_per_node=N -m app.cli train ... for DDP)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="manifest.jsonl (train/val/test splits)")
    parser.add_argument("--out", required=True, type=Path, help="run directory (config, metrics, checkpoints, final/)")
    parser.add_argument("--preset", choices=("tiny", "demo", "full"), default=None,
                        help="model preset (default: the config's, else tiny)")
    parser.add_argument("--config", type=Path, default=None, help="training config (JSON or YAML), e.g. configs/demo.json")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a saved tokenizer folder (default: train one on the train split)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    parser.add_argument("--start-from", type=Path, default=None, metavar="CHECKPOINT",
                        help="start at another run's checkpoint (e.g. runs/demo/stages/encoders) whose recipe "
                             "equals this one up to its step, and train only the rest")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after this step with a checkpoint (continue later with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=1e-3 stages.0.steps=200 data.batch_size=4")


def run(args: argparse.Namespace) -> int:
    from app.train import load_config, train

    overrides = list(args.overrides)
    if args.tokenizer is not None:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    cfg = None if (args.resume and not (args.preset or args.config or overrides)) else \
        load_config(args.preset, args.config, overrides)
    final = train(args.manifest, args.out, cfg, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at,
                  start_from=args.start_from)
    if final is None:
        print(f"stopped at step {args.stop_at}; continue with: medreport train --manifest {args.manifest} --out {args.out} --resume")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"model saved to {final}; metrics in {args.out / 'metrics.jsonl'}, curve in {args.out / 'learning_curve.png'}")
    return 0

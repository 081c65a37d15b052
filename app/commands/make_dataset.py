"""``medreport make-dataset``: write a synthetic dataset with known truth (see docs/data.md)."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from data.errors import MedreportError

NAME = "make-dataset"
HELP = "write synthetic CT studies (DICOM, history, dictation, reference report) and a manifest"

log = logging.getLogger(__name__)


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (e.g. 200:16000), got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= MAX, got {text!r}")
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets studies/ and manifest.jsonl)")
    parser.add_argument("--n", type=int, default=100, help="number of studies (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical output")
    parser.add_argument("--size", choices=("tiny", "demo", "full"), default="demo",
                        help="volume size: tiny 16x64x64, demo 64x128x128, full 40-400x512x512")
    parser.add_argument("--history-tokens", type=_token_range, default=(200, 16000), metavar="MIN:MAX",
                        help="patient-record length range in tokens (default 200:16000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    parser.add_argument("--no-audio", action="store_true", help="write no dictation (no speech synthesizer needed)")
    parser.add_argument("--showcase", action="store_true",
                        help="the first 6 studies follow the fixed mix of the bundled examples/ sample")
    parser.add_argument("--normal-fraction", type=float, default=0.3, help="share of normal studies (default 0.3)")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                        help="put every study in this split (e.g. test: a fixed held-out subset with the reserved "
                             "report templates, such as 30 studies with 100K-token records); default: 80/10/10")
    parser.add_argument("--phantom-version", type=int, choices=(1, 2), default=1,
                        help="phantom anatomy: 1 = the shipped demo model's data (default), 2 = mediastinal fat "
                             "(enlarged lymph nodes visible); recorded in dataset_config.json")
    parser.add_argument("--compression", choices=("explicit", "rle", "j2k"), default="explicit",
                        help="DICOM transfer syntax of the slices: explicit (uncompressed, default), rle (RLE "
                             "Lossless) or j2k (JPEG 2000 lossless, as the bundled examples)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from data.synthetic import dictation
    from data.synthetic.writer import DatasetConfig, write_dataset

    if args.n < 1:
        raise MedreportError("--n must be at least 1")
    audio = not args.no_audio
    if audio and not dictation.available():
        raise MedreportError(
            "no speech synthesizer found for the dictation audio: install one with "
            "'pip install espeakng-loader' (or 'apt-get install espeak-ng'), or pass --no-audio "
            "to write the studies without dictation"
        )
    out = Path(args.out)
    if (out / "manifest.jsonl").exists():
        log.warning("overwriting %s", out / "manifest.jsonl")
    cfg = DatasetConfig(n=args.n, seed=args.seed, size=args.size, history_tokens=tuple(args.history_tokens),
                        audio=audio, showcase=args.showcase, normal_fraction=args.normal_fraction,
                        split=getattr(args, "split", None), phantom_version=getattr(args, "phantom_version", 1),
                        compression=getattr(args, "compression", "explicit"))
    t0 = time.perf_counter()
    manifest = write_dataset(out, cfg, workers=args.workers, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} {args.size} studies to {out} in {dt:.1f} s ({dt / args.n:.2f} s/study); manifest: {manifest}")
    return 0

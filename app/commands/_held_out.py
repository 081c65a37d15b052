"""Arguments shared by the commands that fit something of a saved model on labelled held-out
studies (``calibrate``, ``tune-decoding``): the model, the manifest, the split (never test)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_held_out_arguments(p: argparse.ArgumentParser, model_help: str, max_studies: int, per: str = "") -> None:
    p.add_argument("--model", required=True, type=Path, help=model_help)
    p.add_argument("--manifest", required=True, type=Path, help="manifest.jsonl whose studies have labels and reports")
    p.add_argument("--split", default="val", help="manifest split to fit on (default val; never the test split)")
    p.add_argument("--max-studies", type=int, default=max_studies, help=f"at most this many studies{per} (default {max_studies})")

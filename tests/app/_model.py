"""A tiny, untrained ReportModel saved with a tokenizer trained on the bundled examples' reports.

Built once per test session (``tiny_model_dir(tmp_path_factory)``); its text is gibberish, so
tests check structure, not quality."""
from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
_CACHE: dict[str, Path] = {}


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    from data.datasets import read_manifest
    from data.tokenizer import ReportTokenizer
    from multimodal.model import ReportModel
    from multimodal.presets import ModelConfig

    entries = read_manifest(EXAMPLES / "manifest.jsonl")
    tok = ReportTokenizer.train([e.report for e in entries], vocab_size=400, min_frequency=1)
    torch.manual_seed(seed)
    model = ReportModel(ModelConfig.preset("tiny", vocab_size=tok.vocab_size), tokenizer=tok).eval()
    model.save_pretrained(directory, tok)
    return directory


def tiny_model_dir(tmp_path_factory) -> Path:
    """The session's tiny model directory (built on first use)."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
    return _CACHE["tiny"]

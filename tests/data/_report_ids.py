"""Shared by the decoding-veto tests: a small tokenizer trained on the bundled examples' reports,
a report's token ids written section by section, and a scripted two-choice decoder."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data.datasets import read_manifest
from data.report_format import SECTION_KEYS
from data.tokenizer import ReportTokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def examples_tokenizer() -> ReportTokenizer:
    """A 400-token BPE trained on the bundled examples' reports (splits many words: vetoes are
    then judged on word pieces)."""
    entries = read_manifest(EXAMPLES / "manifest.jsonl")
    return ReportTokenizer.train([e.report for e in entries], vocab_size=400, min_frequency=1)


def report_ids(tok, **sections) -> list[int]:
    """Report ids up to the end of the last given section (no later markers)."""
    ids = []
    for key, sid in zip(SECTION_KEYS, tok.section_ids):
        if key in sections:
            ids.append(sid)
            ids += tok.encode(sections[key])
    return ids


class TwoScripts(nn.Module):
    """Fake decoder (one row) that prefers the next token of ``bad`` while what it wrote is a prefix
    of ``bad``, and the next token of ``good`` second: greedy decoding writes ``bad`` unless a
    veto refuses its first break, after which ``good`` is the prefix being continued."""

    def __init__(self, V: int, bad: list[int], good: list[int]):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, 4)
        self.V, self.bad, self.good, self.out = V, bad, good, []

    def _logits(self):
        lg = torch.zeros(1, self.V)
        n = len(self.out)
        for script, score in ((self.good, 4.0), (self.bad, 5.0)):
            if self.out == script[:n] and n < len(script):
                lg[0, script[n]] = score
        return lg

    def prefill(self, ids, lengths, ctx, mask, capacity, copy_mask_BT=None):
        class C:
            def reorder(self, idx, shared_prefix=0):
                pass
        self.out = []
        return self._logits(), C()

    def step(self, ids, cache):
        self.out.append(int(ids[0]))
        return self._logits()

"""Long-range retrieval: a small decoder with the benchmarked attention configuration is trained
on a synthetic find-the-fact task at 2K-8K tokens and tested on facts planted at any depth of
inputs up to 100K tokens.

    python -m bench.retrieval [--quick] [--threads N]

Task (passkey retrieval): random filler tokens, one fact ``FACT v`` planted at a random depth, and
the sequence ends ``... QUERY ANS``; the model must output v (one of 32 values, chance 3%) at ANS.
ANS opens a block: a block's selected far-away blocks are chosen by its first query (our causal,
block-shared selection), so the sequence is laid out for ANS to be that query.  Training starts
with a curriculum of short sequences (3-12 blocks) where the copy is learnt, partly through the
local window; q and k are shared by all branches, so the far path then uses the same match.
Then it trains at 512-8K tokens.

Legend: B batch, T tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import machine, print_table, write_json
from core.attention import AttentionConfig
from core.decoder import Decoder, DecoderConfig
from core.moe import MoEConfig

log = logging.getLogger(__name__)

PAD, BOS, FACT, QUERY, ANS = 0, 1, 2, 3, 4
VALUE0, N_VALUES = 8, 32
FILLER0, N_FILLER = VALUE0 + N_VALUES, 24
VOCAB = FILLER0 + N_FILLER


@dataclass
class RetrievalConfig:
    attention: AttentionConfig
    n_layers: int = 1
    n_experts: int = 4
    d_expert: int = 128
    train_lengths: tuple[int, ...] = (512, 2048, 4096, 8192)
    warmup_lengths: tuple[int, ...] = (192, 384, 768)  # curriculum: the copy is learnt first, mostly locally
    warmup_steps: int = 150
    tokens_per_step: int = 8192
    steps: int = 250
    lr: float = 2e-3
    eval_lengths: tuple[int, ...] = (2048, 8192, 32768, 100_000)
    eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_per_cell: int = 4
    seed: int = 0


def make_batch(B: int, T: int, b: int, gen: torch.Generator, depth: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] with L the smallest m*b + 1 >= T (ANS opens the last block) and targets [B]."""
    m = max(2, -(-(T - 1) // b))
    L = m * b + 1
    ids = torch.randint(FILLER0, FILLER0 + N_FILLER, (B, L), generator=gen)
    ids[:, 0] = BOS
    ids[:, -2], ids[:, -1] = QUERY, ANS
    values = torch.randint(VALUE0, VALUE0 + N_VALUES, (B,), generator=gen)
    lo, hi = 1, L - 4  # FACT position range (value at pos + 1, before QUERY)
    for n in range(B):
        if depth is None:
            p = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        else:
            p = lo + round(depth * (hi - lo))
        ids[n, p], ids[n, p + 1] = FACT, values[n]
    return ids, values


def build_model(rc: RetrievalConfig) -> Decoder:
    a = rc.attention
    cfg = DecoderConfig(vocab_size=VOCAB, d_model=a.d_model, n_layers=rc.n_layers, cross_heads=a.n_heads, attention=a,
                        moe=MoEConfig(d_model=a.d_model, n_experts=rc.n_experts, top_k=2, d_expert=rc.d_expert))
    return Decoder(cfg)


def answer_logits(dec: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the ANS position only (hidden states of all positions, head on the last)."""
    out = dec(ids)
    return out.logits[:, -1], out.aux_loss


def train(rc: RetrievalConfig, log_every: int = 25) -> tuple[Decoder, list[dict]]:
    torch.manual_seed(rc.seed)
    gen = torch.Generator().manual_seed(rc.seed)
    dec = build_model(rc)
    opt = torch.optim.AdamW(dec.parameters(), lr=rc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, rc.steps) / rc.steps)))
    history = []
    dec.train()
    t0 = time.perf_counter()
    for step in range(rc.steps):
        lengths = rc.warmup_lengths if step < rc.warmup_steps else rc.train_lengths
        T = lengths[step % len(lengths)]
        B = max(1, rc.tokens_per_step // T)
        ids, tgt = make_batch(B, T, rc.attention.block_size, gen)
        logits, aux = answer_logits(dec, ids)
        loss = F.cross_entropy(logits, tgt)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = (logits.argmax(-1) == tgt).float().mean().item()
        history.append({"step": step, "T": T, "loss": loss.item(), "acc": acc})
        if log_every and step % log_every == 0:
            log.info("step %d T=%d loss %.3f acc %.2f (%.0fs)", step, T, loss.item(), acc, time.perf_counter() - t0)
    return dec, history


@torch.no_grad()
def evaluate(dec: Decoder, rc: RetrievalConfig, lengths=None, depths=None, per_cell=None, seed: int = 1234) -> list[dict]:
    dec.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for T in lengths or rc.eval_lengths:
        for depth in depths or rc.eval_depths:
            n = per_cell or rc.eval_per_cell
            B = max(1, min(n, 65536 // T))
            correct = done = 0
            while done < n:
                ids, tgt = make_batch(min(B, n - done), T, rc.attention.block_size, gen, depth=depth)
                correct += int((answer_logits(dec, ids)[0].argmax(-1) == tgt).sum())
                done += ids.shape[0]
            rows.append({"length": T, "depth": depth, "n": n, "accuracy": correct / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and lengths: a smoke run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        rc = quick_config()
    else:
        rc = full_config()
    if args.steps:
        rc.steps = args.steps
    t0 = time.perf_counter()
    dec, hist = train(rc)
    train_s = time.perf_counter() - t0
    rows = evaluate(dec, rc)
    print_table(rows, ["length", "depth", "n", "accuracy"])
    by_len = {}
    for r in rows:
        by_len.setdefault(r["length"], []).append(r["accuracy"])
    acc_len = {T: sum(v) / len(v) for T, v in by_len.items()}
    payload = {"config": dataclasses.asdict(rc), "machine": machine(), "train_seconds": train_s,
               "final_train_loss": sum(h["loss"] for h in hist[-20:]) / min(20, len(hist)),
               "accuracy_by_length": acc_len, "accuracy_100k": acc_len.get(100_000),
               "chance": 1 / N_VALUES, "rows": rows}
    write_json("retrieval", payload, quick=args.quick)
    return 0


def full_config() -> RetrievalConfig:
    """The benchmarked (demo) sparsity pattern - blocks of 64, 1-block window, 1 global block,
    256-token compression, top-1 selection - at a small width (2 heads x 32, d_model 64): at the
    demo width (4 x 64, d_model 256) training had not left chance level after 175 steps on this
    CPU, while this width learns the task within the time budget."""
    att = dataclasses.replace(DecoderConfig.preset("demo", vocab_size=1).attention, d_model=64, n_heads=2, head_dim=32)
    return RetrievalConfig(attention=att, n_layers=1, n_experts=4, d_expert=64, lr=3e-3)


def quick_config() -> RetrievalConfig:
    """CI-sized: tiny attention (blocks of 16), short sequences; trains in seconds."""
    att = AttentionConfig(d_model=64, n_heads=2, head_dim=32, block_size=16, window_blocks=1, global_blocks=1,
                          compress_block=32, select_topk=1, chunk_blocks=8)
    return RetrievalConfig(attention=att, n_layers=1, n_experts=4, d_expert=64, train_lengths=(48, 96, 192),
                           warmup_lengths=(48, 96, 192), warmup_steps=0, tokens_per_step=2048, steps=200, lr=3e-3, eval_lengths=(256, 2048),
                           eval_depths=(0.0, 0.5, 0.9), eval_per_cell=16)


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode benchmark: prefill time and per-token decode time of the `demo` decoder (KV cache:
ring buffer for the local window, stored compressed summaries, selected blocks gathered from the
raw cache) at 1K, 10K and 100K tokens of context.

    python -m bench.decode [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.common import machine, matmul_peak_gflops, peak_memory_bytes, print_table, time_call, write_json, load_note
from core.decoder import Decoder, DecoderConfig


def train_step(args) -> int:
    """Training-step time of the demo decoder: forward + backward of cross-entropy (+ MoE aux loss),
    batch 2, 64 context tokens, at T = 512 and 2048 (best of 3 after one warm-up call)."""
    cfg = DecoderConfig.preset("demo", vocab_size=args.vocab)
    torch.manual_seed(0)
    dec = Decoder(cfg)
    ctx = torch.randn(2, 64, cfg.d_model)
    peak = matmul_peak_gflops()
    rows = []
    for T in (512, 2048):
        ids = torch.randint(0, args.vocab, (2, T))

        def step():
            out = dec(ids, ctx)
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
            loss.backward()

        s = time_call(step, repeats=3)
        # dense matmul FLOPs of the step (x3 for forward + backward), attention core excluded
        D, V, Fh, K = cfg.d_model, cfg.vocab_size, cfg.moe.d_expert, cfg.moe.top_k
        per_tok_layer = 2 * D * (3 * D + D + 2 * D) + 2 * K * (D * 2 * Fh + Fh * D)
        gemm = 3 * 2 * T * (cfg.n_layers * per_tok_layer + 2 * D * V)
        rows.append({"T": T, "batch": 2, "step_s": s, "gemm_gflop": gemm / 1e9,
                     "gemm_only_s_at_peak": gemm / (peak * 1e9), "lm_head_share": 2 * D * V / (cfg.n_layers * per_tok_layer + 2 * D * V)})
    print_table(rows, list(rows[0]))
    write_json("decode_train_step", {"config": dataclasses.asdict(cfg), "machine": machine(), "matmul_peak_gflops": peak,
                                     "note": load_note("batch 2"), "rows": rows}, quick=args.quick)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per context length")
    ap.add_argument("--train-step", action="store_true", help="time a demo training step (B=2, T=512/2048) instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_step:
        return train_step(args)
    cfg = DecoderConfig.preset("demo", vocab_size=args.vocab)
    torch.manual_seed(0)
    dec = Decoder(cfg).eval()
    sizes = [1000, 4000] if args.quick else [1000, 10_000, 100_000]
    ctx = torch.randn(1, 32, cfg.d_model)  # 32 fused multimodal tokens
    rows = []
    for T in sizes:
        ids = torch.randint(0, args.vocab, (1, T))
        lengths = torch.tensor([T])
        state = {}

        def prefill():
            state["out"] = dec.prefill(ids, lengths, ctx, None, capacity=T + args.steps + 8)

        t0 = time.perf_counter()
        mem = peak_memory_bytes(prefill)
        prefill_s = time.perf_counter() - t0
        logits, cache = state["out"]
        tok = logits.argmax(-1)
        for _ in range(3):  # warm-up steps
            tok = dec.step(tok, cache).argmax(-1)
        per = []
        for _ in range(args.steps):
            t = time.perf_counter()
            tok = dec.step(tok, cache).argmax(-1)
            per.append(time.perf_counter() - t)
        per.sort()
        rows.append({"context": T, "prefill_s": prefill_s, "prefill_extra_mem_gb": None if mem is None else mem / 1e9,
                     "decode_ms_median": 1e3 * per[len(per) // 2], "decode_ms_min": 1e3 * per[0]})
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    by = {r["context"]: r for r in rows}
    payload = {"config": dataclasses.asdict(cfg), "machine": machine(),
               "note": load_note("per-token = median of steps"),
               "decode_ratio_100k_over_1k": (by[100_000]["decode_ms_median"] / by[1000]["decode_ms_median"])
               if 100_000 in by else None,
               "rows": rows}
    write_json("decode", payload, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

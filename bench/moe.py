"""MoE benchmark: our MoE vs a dense SwiGLU with the same active parameters vs a naive
per-token, per-expert loop.

    python -m bench.moe [--quick] [--threads N]

Pinned configuration: the `demo` decoder's MoE (dropless, no capacity padding), fp32, forward.
"ours" is what inference runs: the compiled CPU kernel (core/csrc/moe_cpu.cpp) where it is built,
else the PyTorch paths; both are timed, side by side with the dense FFN.

Every size is measured twice: first with glibc's default allocator (the ``*_default_malloc`` keys),
then as the ``medreport`` command runs, with freed memory kept in the heap (``app.cli.
configure_allocator``: no fresh mmap per call, so no page fault per 4 KB touched). With the default
allocator the dense FFN's multi-MB intermediates are fresh mappings on every call and pay for page
faults; the kernel reuses its workspace and does not, which flatters the ratio at large sizes. The
main keys are the product's allocator: the stricter comparison.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.common import machine, matmul_peak_gflops, print_table, write_json, load_note, product_allocator
from core.decoder import DecoderConfig
from core.moe import MoE, SwiGLU, fused_available, moe_reference


def pinned_config():
    return DecoderConfig.preset("demo", vocab_size=1).moe


def interleaved_min(fns: dict, repeats: int) -> dict:
    """Best time of each callable, alternating them so that load spikes hit all alike."""
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def measure(sizes, moe, moe_pt, dense, cfg, args) -> list[dict]:
    rows = []
    for N in sizes:
        x = torch.randn(N, cfg.d_model)
        fns = {"moe": lambda: moe(x), "moe_pytorch": lambda: moe_pt(x), "dense": lambda: dense(x)}
        if N <= args.naive_max and not (args.quick and N > 16):
            fns["naive"] = lambda: moe_reference(moe, x)
        reps = 50 if N <= 16 else (15 if N <= 4096 else 8)
        t = interleaved_min(fns, reps)
        active = 2 * N * 3 * cfg.d_model * (cfg.top_k + cfg.n_shared) * cfg.d_expert  # FLOPs
        rows.append({"tokens": N, "moe_s": t["moe"], "moe_pytorch_s": t["moe_pytorch"], "dense_s": t["dense"],
                     "naive_s": t.get("naive"),
                     "moe_over_dense": t["moe"] / t["dense"],
                     "pytorch_paths_over_dense": t["moe_pytorch"] / t["dense"],
                     "naive_over_moe": t["naive"] / t["moe"] if "naive" in t else None,
                     "moe_gflops": active / t["moe"] / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--naive-max", type=int, default=4096, help="largest token count for the naive loop")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = pinned_config()
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    dense = SwiGLU(cfg.d_model, cfg.top_k * cfg.d_expert + cfg.n_shared * cfg.d_expert).eval()
    sizes = [16, 1024] if args.quick else [16, 1024, 4096, 16384, 32768]
    peak = matmul_peak_gflops()
    moe_pt = MoE(dataclasses.replace(cfg, fused_kernel=False)).eval()
    moe_pt.load_state_dict(moe.state_dict())
    path = "fused CPU kernel (core/csrc/moe_cpu.cpp)" if fused_available() else "PyTorch paths (kernel not built)"
    with torch.no_grad():
        x = torch.randn(256, cfg.d_model)
        exact = (moe(x)[0] - moe_reference(moe, x)).abs().max().item()
        rows_dm = measure(sizes, moe, moe_pt, dense, cfg, args)
        heap, allocator = product_allocator()  # as `medreport` runs (MEDREPORT_DEFAULT_MALLOC=1: not)
        rows = measure(sizes, moe, moe_pt, dense, cfg, args) if heap else rows_dm
    print(f"ours = {path}; glibc's default allocator")
    print_table(rows_dm, list(rows_dm[0]))
    if heap:
        print("as the medreport command runs: freed memory kept in the heap (no page faults per call)")
        print_table(rows, list(rows[0]))
    by = {r["tokens"]: r for r in rows}
    by_dm = {r["tokens"]: r for r in rows_dm}
    payload = {
        "config": dataclasses.asdict(cfg), "machine": machine(), "matmul_peak_gflops": peak,
        "dense_hidden": cfg.top_k * cfg.d_expert + cfg.n_shared * cfg.d_expert,
        "max_abs_diff_vs_naive_fp32": exact,
        "note": load_note("best-of-N, interleaved"),
        "allocator": allocator,
        "ratio_vs_dense_16k": by.get(16384, {}).get("moe_over_dense"),
        "ratio_vs_dense_32k": by.get(32768, {}).get("moe_over_dense"),
        "ratio_vs_dense_1k": by.get(1024, {}).get("moe_over_dense"),
        "ratio_vs_dense_decode": by.get(16, {}).get("moe_over_dense"),
        "ratio_vs_dense_16k_default_malloc": by_dm.get(16384, {}).get("moe_over_dense"),
        "ratio_vs_dense_32k_default_malloc": by_dm.get(32768, {}).get("moe_over_dense"),
        "ratio_vs_dense_1k_default_malloc": by_dm.get(1024, {}).get("moe_over_dense"),
        "ratio_vs_dense_decode_default_malloc": by_dm.get(16, {}).get("moe_over_dense"),
        "moe_path": path,
        "rows": rows,
        "rows_default_malloc": rows_dm,
    }
    write_json("moe", payload, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

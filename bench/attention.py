"""Attention benchmark: our block-sparse attention (full configuration and the local+global-token
path) against dense causal SDPA and flex_attention with the same static block mask.

    python -m bench.attention [--quick] [--sizes 1024 4096 ...] [--threads N]

One layer's attention core (post-projection q, k, v [1, H, T, d], fp32) at the pinned `demo`
attention configuration.  FLOPs are the ones the sparse pattern needs (valid query-key pairs x 4d
per head, forward); GFLOP/s is compared with the fp32 matmul peak measured in the same run.
"Ours" forward is what inference runs: the compiled CPU kernel (core/csrc/attention_cpu.cpp) where
it is built, timed beside the PyTorch path (``*_fwd_torch_s``); forward+backward is the autograd path.

The process keeps freed memory in its heap, as the ``medreport`` command runs (``app.cli.
configure_allocator``); with glibc's defaults every 100K-token call maps its ~100 MB output afresh and
pays a page fault per 4 KB, which alone moves the local path's 100K/10K ratio by ~2. That ratio is
also measured under glibc's defaults, in a fresh process (``scaling_*_default_malloc``).
``--default-malloc`` runs the whole benchmark under glibc's defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import warnings

import torch
import torch.nn.functional as F

from bench.common import machine, matmul_peak_gflops, peak_memory_bytes, print_table, time_call, write_json, load_note, product_allocator
from core import attention
from core.attention import AttentionConfig, block_sparse_attention
from core.decoder import DecoderConfig

log = logging.getLogger(__name__)
FULL_SIZES = [1024, 4096, 10240, 16384, 32768, 100_000]


def pinned_config() -> AttentionConfig:
    return DecoderConfig.preset("demo", vocab_size=1).attention


def needed_flops(cfg: AttentionConfig, T: int) -> float:
    """Forward FLOPs of the valid (query, key) pairs of cfg's pattern: 4 * d per pair per head."""
    b, w, g, c = cfg.block_size, cfg.window_blocks, cfg.global_blocks, cfg.compress_block
    t = torch.arange(T, dtype=torch.float64)
    i = torch.div(t, b, rounding_mode="floor")
    pairs = torch.zeros((), dtype=torch.float64)
    if "local" in cfg.branches:
        win_lo = ((i - w) * b).clamp(min=0)
        pairs += (t - win_lo + 1).sum() + torch.minimum(torch.full_like(t, g * b), win_lo).sum()
    C = T // c
    if "compressed" in cfg.branches:
        pairs += torch.div(i * b, c, rounding_mode="floor").clamp(max=C).sum()
    if "selected" in cfg.branches:
        cand = torch.div(i * b, c, rounding_mode="floor").clamp(max=C)
        pairs += (cand.clamp(max=cfg.select_topk) * c).sum()
    return float(pairs) * 4 * cfg.head_dim * cfg.n_heads


def _qkv(cfg: AttentionConfig, T: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, cfg.n_heads, T, cfg.head_dim, generator=g).requires_grad_(grad) for _ in range(3)]
    gates = torch.rand(1, cfg.n_heads, T, len(cfg.branches), generator=g)
    return qkv, gates


def _peak_in_this_process(cfg_dict: dict, T: int, backward: bool) -> int | None:
    """Extra peak memory of one call (forward, or forward+backward) made in this process."""
    cfg = AttentionConfig.from_dict(cfg_dict)
    (q, k, v), gates = _qkv(cfg, T, grad=backward)
    go = torch.randn(1, cfg.n_heads, T, cfg.head_dim)
    if backward:
        return peak_memory_bytes(lambda: block_sparse_attention(q, k, v, cfg, gates).backward(go))
    with torch.no_grad():
        return peak_memory_bytes(lambda: block_sparse_attention(q, k, v, cfg, gates))


def fresh_process_peak(cfg: AttentionConfig, T: int, backward: bool) -> int | None:
    """Peak memory measured in a fresh process: in this one, memory freed by earlier calls stays
    mapped by the allocator and would hide a call's own growth (it read 0 GB here)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_in_this_process, (dataclasses.asdict(cfg), T, backward))


def bench_ours(cfg: AttentionConfig, T: int, repeats: int, backward: bool) -> dict:
    (q, k, v), gates = _qkv(cfg, T, grad=True)
    go = torch.randn(1, cfg.n_heads, T, cfg.head_dim)

    def fwd():
        with torch.no_grad():
            return block_sparse_attention(q, k, v, cfg, gates)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        block_sparse_attention(q, k, v, cfg, gates).backward(go)

    out_bytes = q.numel() * 4
    r = {"fwd_s": time_call(fwd, repeats=repeats)}
    if attention.compiled_available(q):  # the PyTorch path's forward too, side by side
        attention.COMPILED_CPU = False
        try:
            r["fwd_torch_s"] = time_call(fwd, repeats=repeats)
        finally:
            attention.COMPILED_CPU = True
    m = fresh_process_peak(cfg, T, backward=False)
    r["fwd_extra_mem_gb"] = None if m is None else max(0, m - out_bytes) / 1e9
    if backward:
        r["fwd_bwd_s"] = time_call(fwd_bwd, repeats=max(1, repeats - 1))
        m = fresh_process_peak(cfg, T, backward=True)
        r["fwd_bwd_extra_mem_gb"] = None if m is None else max(0, m - 4 * out_bytes) / 1e9  # beyond out, dq, dk, dv
    return r


def _scaling_in_this_process(cfg_dict: dict, sizes: tuple[int, int]) -> float:
    """time(sizes[1]) / time(sizes[0]) of the forward, best of 3 each."""
    cfg = AttentionConfig.from_dict(cfg_dict)
    t = []
    for T in sizes:
        (q, k, v), gates = _qkv(cfg, T, grad=False)
        with torch.no_grad():
            t.append(time_call(lambda: block_sparse_attention(q, k, v, cfg, gates), repeats=3))
    return t[1] / t[0]


def scaling_with_default_malloc(cfg: AttentionConfig, sizes: tuple[int, int]) -> float:
    """The forward's scaling in a fresh process that keeps glibc's default allocator."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_scaling_in_this_process, (dataclasses.asdict(cfg), sizes))


def bench_sdpa(cfg: AttentionConfig, T: int, repeats: int) -> dict:
    (q, k, v), _ = _qkv(cfg, T, grad=True)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return {"fwd_s": time_call(fwd, repeats=repeats), "fwd_bwd_s": time_call(fwd_bwd, repeats=max(1, repeats - 1))}


def flex_mask_mod(cfg: AttentionConfig):
    b, w, g = cfg.block_size, cfg.window_blocks, cfg.global_blocks

    def mask_mod(bb, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx // b - kv_idx // b <= w) | (kv_idx < g * b))
    return mask_mod


def bench_flex(cfg: AttentionConfig, T: int, repeats: int, compiled: bool) -> dict:
    """flex_attention with the local+global static block mask (forward only: no CPU backward).
    Compilation (once per length) happens in the untimed warm-up call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    (q, k, v), _ = _qkv(cfg, T, grad=False)
    # _compile: the eager builder materialises a T x T mask (80 GB at 100K)
    bm = create_block_mask(flex_mask_mod(cfg), None, None, T, T, device="cpu", _compile=T > 8192)
    if compiled:
        # A fresh compile per length: recompiles piling up in one cache (lengths, grad mode) made
        # dynamo fall back to the slow path mid-run.
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=False)
    else:
        fn = flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = {"fwd_s": time_call(lambda: fn(q, k, v, block_mask=bm), repeats=repeats)}
        if not compiled and T <= 1024:
            q.requires_grad_(True)
            try:
                fn(q, k, v, block_mask=bm).sum().backward()
            except (NotImplementedError, RuntimeError) as e:
                r["note"] = f"no CPU backward: {type(e).__name__}"
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, no compilation: a smoke run")
    ap.add_argument("--sizes", type=int, nargs="*", help="sequence lengths")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--sdpa-max", type=int, default=32768, help="largest T for dense SDPA (38 s fwd at 100K)")
    ap.add_argument("--flex-eager-max", type=int, default=8192, help="largest T for uncompiled flex (materialises T x T)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator (default: freed memory kept in the heap, as `medreport` runs)")
    args = ap.parse_args(argv)
    heap, allocator = product_allocator(args.default_malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or ([512, 1024, 2048] if args.quick else FULL_SIZES)
    cfg = pinned_config()
    local_cfg = dataclasses.replace(cfg, branches=("local",))
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak now: {peak:.1f} GFLOP/s; pinned config: {cfg}")
    rows = []
    for T in sizes:
        reps = 1 if T >= 32768 else (2 if T >= 10000 else 3)  # for the dense baselines (SDPA: 17 s at 32K)
        full = bench_ours(cfg, T, 3, backward=True)  # best of 3 (2 with backward) at every length
        loc = bench_ours(local_cfg, T, 3, backward=True)
        row = {"T": T, "full_fwd_s": full["fwd_s"], "full_fwd_bwd_s": full["fwd_bwd_s"],
               "local_fwd_s": loc["fwd_s"], "local_fwd_bwd_s": loc["fwd_bwd_s"],
               "full_fwd_mem_gb": full["fwd_extra_mem_gb"], "full_fwd_bwd_mem_gb": full["fwd_bwd_extra_mem_gb"],
               "local_fwd_mem_gb": loc["fwd_extra_mem_gb"],
               "full_fwd_torch_s": full.get("fwd_torch_s"), "local_fwd_torch_s": loc.get("fwd_torch_s")}
        fl = needed_flops(cfg, T)
        row["full_gflops"] = fl / full["fwd_s"] / 1e9
        row["full_frac_peak"] = row["full_gflops"] / peak
        row["local_frac_peak"] = needed_flops(local_cfg, T) / loc["fwd_s"] / 1e9 / peak
        if T <= args.sdpa_max:
            s = bench_sdpa(cfg, T, reps)
            row["sdpa_fwd_s"], row["sdpa_fwd_bwd_s"] = s["fwd_s"], s["fwd_bwd_s"]
        if T <= args.flex_eager_max:
            fe = bench_flex(cfg, T, reps, compiled=False)
            row["flex_eager_fwd_s"], row["flex_note"] = fe["fwd_s"], fe.get("note")
        if not args.quick:
            try:
                row["flex_compiled_fwd_s"] = bench_flex(cfg, T, reps, compiled=True)["fwd_s"]
            except (RuntimeError, MemoryError) as e:  # report, keep the other measurements
                row["flex_compiled_fwd_s"], row["flex_note"] = None, f"compiled flex failed: {type(e).__name__}"
        rows.append(row)
        print_table([row], list(row))
    by_t = {r["T"]: r for r in rows}
    print()
    print_table(rows, ["T", "full_fwd_s", "full_fwd_torch_s", "full_fwd_bwd_s", "local_fwd_s", "local_fwd_torch_s", "sdpa_fwd_s", "sdpa_fwd_bwd_s",
                       "flex_eager_fwd_s", "flex_compiled_fwd_s", "full_fwd_mem_gb", "full_fwd_bwd_mem_gb", "full_frac_peak"])

    def get(T, key):
        return by_t.get(T, {}).get(key)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    big, ten, mid = 100_000, 10240, 16384
    dm = {}
    if heap and ten in by_t and big in by_t:  # the scaling again, under glibc's defaults
        dm = {name: scaling_with_default_malloc(c, (ten, big)) for name, c in (("local", local_cfg), ("full", cfg))}
        print(f"100K/10K under glibc's default allocator (fresh process): local {dm['local']:.2f}, full {dm['full']:.2f}")
    payload = {
        "config": dataclasses.asdict(cfg),
        "local_config": dataclasses.asdict(local_cfg),
        "machine": machine(),
        "matmul_peak_gflops": peak,
        "forward_path": ("compiled CPU kernel (core/csrc/attention_cpu.cpp); *_torch_s: the PyTorch path"
                         if attention.compiled_available() else "PyTorch path (compiled kernel not built)"),
        "note": load_note("timings are best-of-N"),
        "allocator": allocator,
        "speedup_vs_sdpa_16k": ratio(get(mid, "sdpa_fwd_s"), get(mid, "full_fwd_s")),
        "speedup_vs_sdpa_16k_fwd_bwd": ratio(get(mid, "sdpa_fwd_bwd_s"), get(mid, "full_fwd_bwd_s")),
        "speedup_vs_flex_100k": ratio(get(big, "flex_compiled_fwd_s"), get(big, "local_fwd_s")),
        "forward_100k_s": get(big, "full_fwd_s"),
        "fwd_bwd_100k_s": get(big, "full_fwd_bwd_s"),
        "gflops_fraction_of_peak_100k": get(big, "full_frac_peak"),
        "scaling_local_100k_over_10k": ratio(get(big, "local_fwd_s"), get(ten, "local_fwd_s")),
        "scaling_full_100k_over_10k": ratio(get(big, "full_fwd_s"), get(ten, "full_fwd_s")),
        "scaling_local_100k_over_10k_default_malloc": dm.get("local"),
        "scaling_full_100k_over_10k_default_malloc": dm.get("full"),
        "peak_mem_100k_gb": get(big, "full_fwd_mem_gb"),
        "peak_mem_fwd_bwd_100k_gb": get(big, "full_fwd_bwd_mem_gb"),
        "rows": rows,
    }
    write_json("attention", payload, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

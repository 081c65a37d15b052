"""Image-encoder throughput (slabs/s) for the demo and full presets on this CPU, fp32, with and
without channels_last, and the share of the machine's measured fp32 matmul peak it reaches.

    python -m bench.model [--quick]

Inference rows time ``ImageEncoder`` (backbone + tokens) under ``torch.inference_mode``; the
``train`` row times forward + backward of the demo encoder (what demo training pays per slab).
FLOPs per slab come from ``torch.utils.flop_counter`` on the meta device. Writes
``bench/results/model.json``.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, matmul_peak_gflops, print_table, time_call, write_json, load_note
from multimodal.audio_encoder import AudioEncoder, AudioEncoderConfig
from multimodal.image_encoder import ImageEncoder, ImageEncoderConfig


def _slab_gflops(cfg: ImageEncoderConfig) -> float:
    with torch.device("meta"):
        enc = ImageEncoder(dataclasses.replace(cfg, channels_last=False))
    fc = FlopCounterMode(display=False)
    with fc:
        enc.backbone.forward_features(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device="meta"))
    return fc.get_total_flops() / 1e9


def bench_image(preset: str, channels_last: bool, n_slabs: int, repeats: int, train: bool = False) -> dict:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ImageEncoderConfig.preset(preset), channels_last=channels_last)
    enc = ImageEncoder(cfg)
    H = cfg.image_size
    slabs = torch.rand(1, n_slabs, 3, H, H)
    mask = torch.ones(1, n_slabs, dtype=torch.bool)
    z = torch.arange(n_slabs, dtype=torch.float32)[None] * 5
    if train:
        enc.train()

        def step():
            tok, _ = enc(slabs, mask, z)
            tok.float().pow(2).mean().backward()
    else:
        enc.eval()

        def step():
            with torch.inference_mode():
                enc(slabs, mask, z)

    sec = time_call(step, repeats=repeats, warmup=1)
    gf = _slab_gflops(cfg) * (3 if train else 1)  # backward ~ 2x forward
    return {"preset": preset, "mode": "train" if train else "inference", "channels_last": channels_last,
            "slab": f"{H}x{H}", "batch_slabs": n_slabs, "s_per_batch": sec, "slabs_per_s": n_slabs / sec,
            "gflop_per_slab": gf, "gflops": gf * n_slabs / sec}


def bench_audio(preset: str, seconds: float, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = AudioEncoderConfig.preset(preset)
    enc = AudioEncoder(cfg).eval()
    T = int(seconds / cfg.hop_s)
    mel = torch.randn(1, 1, cfg.n_mels, T)
    present = torch.ones(1, dtype=torch.bool)

    def step():
        with torch.inference_mode():
            enc(mel, present)

    sec = time_call(step, repeats=repeats, warmup=1)
    return {"preset": preset, "audio_s": seconds, "s_per_clip": sec, "realtime_factor": seconds / sec}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer slabs and repeats")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else 3
    peak = matmul_peak_gflops(n=1024 if args.quick else 2048, repeats=3 if args.quick else 10)
    rows = []
    plan = [("demo", 4 if args.quick else 16), ("full", 1 if args.quick else 4)]
    for preset, n in plan:
        for cl in (False, True):
            rows.append(bench_image(preset, cl, n, repeats))
    for cl in (False, True):
        rows.append(bench_image("demo", cl, 4 if args.quick else 16, repeats, train=True))
    for r in rows:
        r["share_of_matmul_peak"] = r["gflops"] / peak
    print(f"fp32 matmul peak (measured): {peak:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    print_table(rows, ["preset", "mode", "channels_last", "slab", "batch_slabs", "slabs_per_s", "gflop_per_slab",
                       "gflops", "share_of_matmul_peak"])
    audio = [bench_audio("demo", 10.0 if args.quick else 30.0, repeats)]
    print()
    print_table(audio, ["preset", "audio_s", "s_per_clip", "realtime_factor"])
    write_json("model", {"machine": machine(), "matmul_peak_gflops": peak, "image_encoder": rows, "audio_encoder": audio,
                         "note": load_note("")},
               quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

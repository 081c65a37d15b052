"""`medreport model-info [DIR | --preset NAME] [--json]`: parameters and estimated FLOPs per component."""
from __future__ import annotations

import argparse
import json

NAME = "model-info"
HELP = "print parameters and estimated FLOPs per component, backbone names and MoE active vs total parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", nargs="?", help="a saved model directory (config.json + model.safetensors)")
    parser.add_argument("--preset", choices=("tiny", "demo", "full"), help="describe a preset instead of a saved model")
    parser.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --preset (default 8000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def run(args: argparse.Namespace) -> int:
    from data.errors import MedreportError
    from multimodal.info import model_info
    from multimodal.model import read_config
    from multimodal.presets import DEFAULT_VOCAB_SIZE, ModelConfig

    if bool(args.dir) == bool(args.preset):
        raise MedreportError("give either a model directory or --preset NAME (tiny, demo, full)")
    if args.preset:
        cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE)
        source = f"preset {args.preset}"
    else:
        cfg = read_config(args.dir)
        source = f"model directory {args.dir} (preset {cfg.name})"
    info = model_info(cfg)
    info["source"] = source
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"medreport model: {source}")
    print(f"total parameters {_fmt_params(info['total_params'])}, {info['findings']} findings, vocabulary {info['vocab_size']}")
    print()
    w = max(len(c["component"]) for c in info["components"])
    print(f"{'component':<{w}}  {'params':>9}  {'GFLOPs':>10}  per")
    for c in info["components"]:
        print(f"{c['component']:<{w}}  {_fmt_params(c['params']):>9}  {c['gflops']:>10.3f}  {c['per']}")
    print()
    print("backbones:")
    for c in info["components"]:
        if c["backbone"]:
            print(f"  {c['component']}: {c['backbone']}")
    moe = info["moe"]
    print()
    shared = f", {moe['shared_experts']} shared" if moe["shared_experts"] else ""
    print(f"decoder MoE: {moe['experts']} experts, top-{moe['top_k']}{shared}; "
          f"parameters active per token {_fmt_params(moe['decoder_params_active'])} of "
          f"{_fmt_params(moe['decoder_params_total'])} total (experts {_fmt_params(moe['expert_params'])})")
    print("FLOPs: measured on the meta device for encoders, fusion and heads; decoder per token is an analytic estimate.")
    return 0

"""`medreport calibrate --model DIR --manifest M`: refit a model's finding calibration on held-out
studies with labels (a hospital's own validation set, or a run's val split): the heads'
temperature, then the fusion of a finding with a classical detector's evidence (``--detector-evidence
nodule,fracture,bone_lesion``: the lung-nodule detector and the vertebral-body density of
data.detectors; kept as the model has it unless given),
then each finding's operating point (the probability at which it is called present, chosen for
the micro-F1 over all findings, or the micro F-beta of ``--beta``). Writes the model back (same
weight precision) and prints what changed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.commands._held_out import add_held_out_arguments

NAME = "calibrate"
HELP = "refit the finding heads' temperature and per-finding operating points on labelled held-out studies"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_held_out_arguments(parser, "model directory (rewritten in place unless --out)", 512)
    parser.add_argument("--max-history-tokens", type=int, default=1024,
                        help="history tokens the heads read per study (default 1024, the demo recipe's last training cap)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="decoded-study cache folder (default: none, studies decoded as read)")
    parser.add_argument("--out", type=Path, default=None, help="write the calibrated model here instead")
    parser.add_argument("--beta", type=float, default=None,
                        help="choose the operating points for micro F-beta: > 1 weighs a missed finding beta^2 false "
                             "calls (default: the model's heads.operating_beta, 1 = F1); stored in the model")
    parser.add_argument("--detector-evidence", default=None, metavar="FINDINGS",
                        help="comma-separated findings whose probability fuses a classical detector's evidence "
                             "(data.detectors: nodule, fracture, bone_lesion), fitted here on the held-out studies; "
                             "'none' removes the fusion (default: as the model has it)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from app.commands.demo_model import write_shipped_model
    from app.train import TrainConfig, calibrate_heads, check_detector_evidence
    from app.train_data import (
        PreprocessConfig, ReportDataset, StudyCache, fill_call_feature_masks, load_manifest_for_training,
    )
    from data.errors import MedreportError
    from multimodal.model import WEIGHTS_FILE, ReportModel

    if args.split == "test":
        raise MedreportError("calibrating on the test split would leak it into the test metrics: use val "
                             "(or another held-out split)")
    if args.beta is not None and not args.beta > 0:
        raise MedreportError(f"--beta must be > 0 (1 = F1, 2 = recall weighed 4x), got {args.beta}")
    model = ReportModel.from_pretrained(args.model)
    if model.tokenizer is None:
        raise MedreportError(f"{args.model} has no tokenizer/ folder: calibrate a directory written by save_pretrained")
    fp16 = _weights_are_fp16(args.model / WEIGHTS_FILE)
    model.float()
    entries = [e for e in load_manifest_for_training(args.manifest) if e.split == args.split]
    if not entries:
        raise MedreportError(f"{args.manifest.name} has no studies of split {args.split!r}")
    cache = StudyCache(args.cache_dir, PreprocessConfig.from_model(model.cfg, audio=model.cfg.use_audio))
    ds = ReportDataset(entries, model.tokenizer, model.cfg, cache, crop="tail", max_history_tokens=args.max_history_tokens)
    cfg = TrainConfig()
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, calibration_studies=args.max_studies))
    if args.beta is not None:
        model.cfg.heads.operating_beta = float(args.beta)
    if args.detector_evidence is not None:
        wanted = tuple(f.strip() for f in args.detector_evidence.split(",") if f.strip() and f.strip() != "none")
        model.cfg.heads.detector_evidence = wanted
        check_detector_evidence(model.cfg)  # names only findings a detector reads
    model.cfg.heads.evidence_fusion = ()  # refitted below for the findings in detector_evidence
    before = dict(zip(model.finding_names, model.cfg.heads.thresholds().tolist()))
    out = calibrate_heads(model, ds, cfg, torch.device("cpu"))
    # a model trained before these were recorded: the finding context at inference gets the
    # format training gave it, read from the same labelled studies (HeadsConfig.call_sides)
    filled = fill_call_feature_masks(model.cfg.heads, entries)
    if filled:
        out["call_sides"], out["call_locations"] = list(model.cfg.heads.call_sides), list(model.cfg.heads.call_locations)
        print(f"finding context now as trained: {filled}")
    dest = args.out or args.model
    write_shipped_model(model.eval(), dest, fp16=fp16)
    moved = {n: (before[n], t) for n, t in out["decision_thresholds"].items() if t != before[n]}

    def auc(v) -> str:
        return "n/a (one class)" if v is None else f"{v:.3f}"

    for name, w_z, w_e, b in model.cfg.heads.evidence_fusion:
        print(f"  {name}: fused with the detector's evidence (w_logit {w_z:.3f}, w_evidence {w_e:.3f}, bias {b:.3f}); "
              f"val AUC {auc(out[f'val_{name}_auc_heads'])} -> {auc(out[f'val_{name}_auc_fused'])}")
    print(f"calibrated on {out['calibration_studies']} {args.split} studies: temperature {out['temperature']:.3f}, "
          f"val ECE {out['val_ece_before']:.4f} -> {out['val_ece']:.4f}; val finding micro-F1 "
          f"{out['val_finding_micro_f1_at_0.5']:.3f} at 0.5 -> {out['val_finding_micro_f1_at_thresholds']:.3f} "
          f"at the operating points (chosen for micro F-beta, beta {model.cfg.heads.operating_beta:g})")
    for n, (a, b) in moved.items():
        print(f"  {n}: operating point {a:.2f} -> {b:.2f}")
    (dest / "calibration.json").write_text(json.dumps({"split": args.split, "manifest": args.manifest.name, **out},
                                                      indent=2, default=float))
    print(f"wrote {dest}")
    return 0


def _weights_are_fp16(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return bool(keys) and f.get_slice(keys[0]).get_dtype() in ("F16", "BF16")

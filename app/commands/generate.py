"""`medreport generate INPUT --out DIR`: reports for a manifest or a folder of study folders."""
from __future__ import annotations

import argparse
from pathlib import Path

from data.errors import MedreportError

NAME = "generate"
HELP = "generate reports for a manifest (JSONL) or a folder of study folders (resumable, shardable with torchrun)"
DEFAULT_MODEL = Path("models") / "demo"


class ModelNotFoundError(MedreportError):
    """No model directory was given and the default one does not exist."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="manifest .jsonl (paths relative to it) or a folder of study folders")
    p.add_argument("--out", required=True, type=Path, help="output folder: OUT/<id>/report.{txt,json,...}, summary.json, predictions.jsonl")
    p.add_argument("--model", type=Path, default=None, help=f"model directory (default: {DEFAULT_MODEL} if it exists)")
    p.add_argument("--formats", default="txt,json", help="comma list of txt,json,fhir,sr (json is always written)")
    p.add_argument("--limit", type=int, default=None, help="only the first N studies of the input")
    p.add_argument("--split", default=None, help="with a manifest: only the studies of this split (train, val or test)")
    p.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of the decoder's Linear layers")
    p.add_argument("--max-new-tokens", type=int, default=None, help="report length cap in tokens")
    p.add_argument("--max-history-tokens", type=int, default=None, help="history budget (default 100000; longer records keep the newest)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="studies whose reports are generated together, each encoded alone (default 8; 1 = one at a time); "
                        "studies of similar record length are grouped, a 100K-token record runs alone")
    p.add_argument("--strategy", choices=("greedy", "beam", "sample", "mbr"), default=None,
                   help="decoding (default: what the model folder's decoding.json chose on val, else greedy); mbr: "
                        "sample --num-samples reports per study and keep the one that agrees best with the others "
                        "and with the findings table")
    p.add_argument("--num-samples", type=int, default=None, help="reports sampled per study with --strategy mbr")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature with --strategy sample or mbr")
    p.add_argument("--calls-agreement", type=float, default=None, metavar="W",
                   help="with --strategy mbr: weight of the labeller's agreement with the findings table in the "
                        "choice (0 = consensus alone)")
    p.add_argument("--record-agreement", type=float, default=None, metavar="W",
                   help="with --strategy mbr: weight of the record's facts carried (a known malignancy, a lung "
                        "resection) in the choice (0 = off)")
    p.add_argument("--acquisition-agreement", type=float, default=None, metavar="W",
                   help="with --strategy mbr: weight of the Technique stating the scan's contrast as the DICOM header "
                        "gives it (0 = off)")
    p.add_argument("--mbr-from", choices=("report", "findings"), default=None,
                   help="with --strategy mbr: compare the samples on the whole report (default) or from the Findings on")
    p.add_argument("--num-beams", type=int, default=None, help="beam width with --strategy beam")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam search scores sum log p / length ** L; above 1 favours longer reports")
    p.add_argument("--consistent-with-calls", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse report sentences that deny a finding the table calls or assert one it does not "
                        "(default: the model folder's decoding.json, else off)")
    p.add_argument("--no-evidence", action="store_true", help="skip Grad-CAM key slices (faster)")
    p.add_argument("--consistent-with-acquisition", action=argparse.BooleanOptionalAction, default=None,
                   help="for a model that reads the acquisition line: refuse a Technique sentence that contradicts "
                        "the header's IV contrast (default: on)")
    p.add_argument("--technique-states-contrast", action=argparse.BooleanOptionalAction, default=None,
                   help="with --consistent-with-acquisition: the Technique must state the header's IV contrast before "
                        "its first sentence ends")
    p.add_argument("--consistent-measurements", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse a nodule change that contradicts its own numbers (\"increased from 12 mm to 10 mm\") "
                        "or a size the report already stated (default: on)")
    p.add_argument("--report-outline", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the report to the product's outline: each Findings line opens with the next organ-system "
                        "heading, impression items numbered 1., 2., ... (default: on)")
    p.add_argument("--calls-covered", action=argparse.BooleanOptionalAction, default=None,
                   help="keep every called finding in the report: an organ-system line may not end without the "
                        "findings called in that system, none is written under another system, and the impression "
                        "names each (default: off: it measured worse with the demo model, docs/training.md session 25)")
    p.add_argument("--record-covered", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the record's known malignancies and lung resections in the report: the clinical "
                        "information and the impression name the known cancer, the lungs line the resection "
                        "(default: see PipelineConfig.record_covered)")
    p.add_argument("--calls-guidance", type=float, default=None, metavar="W",
                   help="contrastive calls guidance at weight W (> 0; greedy or sampling): among the decoder's plausible "
                        "tokens, those the calls make more likely than a twin with no finding called win (default: 0, off)")
    p.add_argument("--locations-from-record", action=argparse.BooleanOptionalAction, default=None,
                   help="a lobectomy or nodule call takes the lobe the patient's record names (the resected lobe, "
                        "the known nodule's lobe on a prior CT; default: on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    repo_default = Path(__file__).resolve().parents[2] / DEFAULT_MODEL
    for cand in (DEFAULT_MODEL, repo_default):
        if cand.is_dir():
            return cand
    raise ModelNotFoundError(f"no model given and {DEFAULT_MODEL} does not exist: run `make demo-model` "
                             "to train the demo model, or pass --model DIR")


def parse_formats(text: str) -> tuple[str, ...]:
    from app.export import FORMATS

    wanted = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise MedreportError(f"unknown format(s) {', '.join(bad)}: choose from {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(wanted + ["json"]))  # report.json marks a study as done


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from app.batch import rank_from_env, read_batch_input, run_batch
    from app.decoding import read_decoding, validate_decoding
    from app.pipeline import PipelineConfig, ReportPipeline

    formats = parse_formats(args.formats)
    items = read_batch_input(args.input, split=args.split)
    model_dir = resolve_model_dir(args.model)
    decoding = read_decoding(model_dir)  # the model folder's choice (made on val), then the flags
    decoding.update({k: v for k, v in (("strategy", args.strategy), ("num_beams", args.num_beams),
                                       ("length_penalty", args.length_penalty), ("num_samples", args.num_samples),
                                       ("temperature", args.temperature), ("calls_agreement", args.calls_agreement),
                                       ("record_agreement", args.record_agreement),
                                       ("acquisition_agreement", args.acquisition_agreement), ("mbr_from", args.mbr_from),
                                       ("consistent_with_calls", args.consistent_with_calls)) if v is not None})
    cfg = PipelineConfig(quantize=args.quantize, evidence=not args.no_evidence, **validate_decoding(decoding, "flags"))
    for flag in ("consistent_with_acquisition", "technique_states_contrast", "consistent_measurements", "report_outline",
                 "calls_covered", "record_covered", "calls_guidance", "locations_from_record"):
        if getattr(args, flag) is not None:
            cfg = dataclasses.replace(cfg, **{flag: getattr(args, flag)})
    if args.max_new_tokens is not None:
        cfg = dataclasses.replace(cfg, max_new_tokens=args.max_new_tokens)
    if args.max_history_tokens is not None:
        cfg = dataclasses.replace(cfg, max_history_tokens=args.max_history_tokens)
    pipe = ReportPipeline.from_dir(model_dir, cfg)
    rank, world = rank_from_env()
    s = run_batch(pipe, items, args.out, formats, limit=args.limit, rank=rank, world_size=world,
                  show_progress=not args.no_progress, batch_size=args.batch_size)
    if rank == 0:
        mean = f"{s.mean_seconds_per_study:.2f} s/study" if s.mean_seconds_per_study is not None else "-"
        print(f"{s.total} studies: {s.done} done, {s.skipped} skipped (already done), {s.failed} failed; {mean}")
        for f in s.failures[:20]:
            print(f"  failed {f['id']}: {f['error']}")
        if len(s.failures) > 20:
            print(f"  ... {len(s.failures) - 20} more in {args.out / 'summary.json'}")
        print(f"wrote {args.out / 'summary.json'} and {args.out / 'predictions.jsonl'}")
    return 0 if s.failed == 0 else 1

"""`medreport tune-decoding --model DIR --manifest M`: choose how the model writes (greedy, or beam
search at a length penalty) by BLEU-4 on labelled held-out studies, and store the choice beside the
weights (DIR/decoding.json), which `generate`, the UI and the pipeline then use (``app.decoding``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from app.commands._held_out import add_held_out_arguments

NAME = "tune-decoding"
HELP = "choose greedy, beam search (and its length penalty) or MBR by BLEU-4 on val studies; writes MODEL/decoding.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_held_out_arguments(p, "model directory (decoding.json is written into it)", 120, per=" per candidate")
    p.add_argument("--num-beams", type=int, default=4, help="beam width of the beam candidates (default 4; 1 = greedy only)")
    p.add_argument("--length-penalties", default="1.0,1.5,2.0", help="comma list of beam length penalties (default 1.0,1.5,2.0)")
    p.add_argument("--max-history-tokens", type=int, default=100_000, help="history tokens read per study (default 100000)")
    p.add_argument("--batch-size", type=int, default=8, help="studies generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=400, help="report length cap in tokens (default 400)")
    p.add_argument("--consistency", action="store_true",
                   help="also score each candidate with the findings-table veto (consistent_with_calls): twice the candidates")
    p.add_argument("--mbr-samples", type=int, default=0,
                   help="also score MBR decoding over this many samples per study (0 = not; each costs about half "
                        "as many greedy decodings)")
    p.add_argument("--temperatures", default="0.7", help="comma list of MBR sampling temperatures (default 0.7)")
    p.add_argument("--calls-agreements", default="1.0",
                   help="comma list of MBR weights of the text's agreement with the findings table (default 1.0)")
    p.add_argument("--record-agreements", "--record-agreement", dest="record_agreements", default="0",
                   help="comma list of MBR weights of the record's facts carried (known malignancy, lung resection; "
                        "default 0 = off)")
    p.add_argument("--acquisition-agreements", default="1",
                   help="comma list of MBR weights of the Technique stating the scan's contrast as the DICOM header "
                        "gives it (default 1; 0 = off)")
    p.add_argument("--mbr-from", default="report",
                   help="comma list of what MBR compares the samples on: report (every section), findings (the "
                        "Findings and Impression); default report")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="decoded-study cache to read and fill (e.g. the dataset's .medreport_cache; default none)")
    p.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from app.decoding import candidates, format_table, parse_mbr_from, parse_numbers, tune_decoding, write_decoding
    from multimodal.model import ReportModel

    lps = parse_numbers("--length-penalties", args.length_penalties)
    cands = candidates(args.num_beams, lps, args.consistency, args.mbr_samples,
                       parse_numbers("--temperatures", args.temperatures),
                       parse_numbers("--calls-agreements", args.calls_agreements),
                       parse_numbers("--record-agreements", args.record_agreements),
                       parse_mbr_from("--mbr-from", args.mbr_from),
                       parse_numbers("--acquisition-agreements", args.acquisition_agreements))
    model = ReportModel.from_pretrained(args.model, device="cpu").float().eval()
    chosen, table = tune_decoding(model, args.manifest, args.split, max_studies=args.max_studies,
                                  cands=cands, max_history_tokens=args.max_history_tokens,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  progress=not args.no_progress, cache_dir=args.cache_dir)
    print(format_table(table, chosen))
    if not args.dry_run:
        p = write_decoding(args.model, chosen, table, args.split, int(table[0]["n"]))
        print(f"wrote {p}")
    return 0

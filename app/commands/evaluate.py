"""`medreport evaluate`: score generated reports against references (BLEU-1..4, ROUGE-L, CIDEr,
METEOR where Java is present, clinical finding accuracy, bootstrap 95% CIs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "evaluate"
HELP = "score generated reports against references (BLEU-1..4, ROUGE-L, CIDEr, finding F1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hyp", required=True, type=Path, help="generated reports: JSONL of {id, report} or a folder")
    p.add_argument("--ref", required=True, type=Path, help="references: JSONL of {id, report} (a manifest works) or a folder")
    p.add_argument("--sections", default="findings,impression",
                   help="what is scored: 'findings,impression' (default), 'all', or a comma list of sections")
    p.add_argument("--json", dest="json_out", type=Path, default=None, help="write all scores as JSON here")
    p.add_argument("--html", dest="html_out", type=Path, default=None, help="write an HTML summary with a per-finding chart here")
    p.add_argument("--split", default=None,
                   help="when --ref is a manifest: score only the references of this split (train, val or test)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process)")


def run(args: argparse.Namespace) -> int:
    from app.evaluate import evaluate_reports, facts_carried, manifest_facts, read_reports, render_html

    hyp = read_reports(args.hyp)
    ref = read_reports(args.ref, split=args.split)
    ev = evaluate_reports(hyp, ref, sections=args.sections, bootstrap=args.bootstrap, seed=args.seed,
                          meteor=not args.no_meteor)
    print(f"{ev.n} studies scored ({ev.sections})")
    for k, v in ev.scores.items():
        ci = ev.ci95.get(k)
        v_s = "n/a" if v is None else f"{v:.4f}"
        print(f"  {k:24s} {v_s}" + (f"   95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    fc = {}
    entries = manifest_facts(args.ref, set(hyp) & set(ref))
    if entries is not None:  # synthetic manifest: planted history facts carried into the (whole) report
        fc = facts_carried(hyp, entries)
        print(f"  {'facts_carried':24s} {fc['facts_carried'] if fc['facts_carried'] is not None else 'n/a'}"
              f"  (of {fc['facts_checked']} planted facts; studies with all: {fc['facts_carried_studies']})")
    for note in ev.notes:
        print(f"  note: {note}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({**ev.to_json(), **fc}, indent=2))
    if args.html_out:
        args.html_out.parent.mkdir(parents=True, exist_ok=True)
        args.html_out.write_text(render_html(ev))
    return 0

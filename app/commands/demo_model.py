"""``medreport demo-model``: build the synthetic demo dataset, train the demo recipe, evaluate on
the held-out test split and write the shipped checkpoint ``models/demo/`` with its model card.

Every step is skipped when its output exists (dataset manifest, finished run), so a rerun after
an interruption continues; training itself resumes from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

NAME = "demo-model"
HELP = "build the synthetic dataset, train the demo model, evaluate it and write models/demo/"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", type=Path, default=Path("datasets/demo"), help="dataset folder (default datasets/demo)")
    parser.add_argument("--n", type=int, default=3300,
                        help="studies to generate when the dataset is missing (default 3300: about 310 held-out test studies)")
    parser.add_argument("--seed", type=int, default=1234, help="dataset seed (default 1234)")
    parser.add_argument("--history-tokens", default="200:16000", help="record length range (default 200:16000)")
    parser.add_argument("--phantom-version", type=int, choices=(1, 2), default=2,
                        help="phantom anatomy of a dataset built here (make-dataset --phantom-version; default 2, "
                             "the shipped model's data)")
    parser.add_argument("--tiny-studies", type=int, default=0,
                        help="extra *training* studies of the tiny geometry (16 x 64 x 64, 10 mm slices, as the bundled "
                             "examples were until session 21), built into DATASET_tiny and added to the training manifest; the val and test "
                             "splits stay the demo dataset's (default 0)")
    parser.add_argument("--tiny-seed", type=int, default=4242, help="seed of the tiny training studies (default 4242)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.json"), help="training recipe")
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="training run folder (default runs/demo)")
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="shipped model folder (default models/demo)")
    parser.add_argument("--eval-studies", type=int, default=0, help="test studies to evaluate (0 = all)")
    parser.add_argument("--eval-history-tokens", type=int, default=100_000,
                        help="history tokens the decoder reads at test time (most recent kept; default 100000 = all)")
    parser.add_argument("--tune-studies", type=int, default=0,
                        help="val studies on which to choose the decoding (greedy or beam search and its length "
                             "penalty, or MBR with --tune-mbr-samples) by BLEU-4 before the test evaluation (default 0: "
                             "greedy; `make demo-model` tunes on 80 with MBR, as the shipped model's decoding.json, "
                             "docs/training.md session 27)")
    parser.add_argument("--tune-num-beams", type=int, default=4,
                        help="with --tune-studies: beam width of the beam candidates (default 4; 1 = none)")
    parser.add_argument("--tune-mbr-samples", type=int, default=0,
                        help="with --tune-studies: also MBR over this many samples per study (default 0 = not)")
    parser.add_argument("--tune-temperatures", default="0.7", help="with --tune-mbr-samples: comma list (default 0.7)")
    parser.add_argument("--tune-calls-agreements", default="1.0",
                        help="with --tune-mbr-samples: comma list of findings-table agreement weights (default 1.0)")
    parser.add_argument("--tune-record-agreements", "--tune-record-agreement", dest="tune_record_agreements", default="0",
                        help="with --tune-mbr-samples: comma list of weights of the record's facts carried (default 0 = off)")
    parser.add_argument("--tune-acquisition-agreements", default="1",
                        help="with --tune-mbr-samples: comma list of weights of the Technique stating the scan's "
                             "contrast (default 1; 0 = off)")
    parser.add_argument("--tune-mbr-from", default="report",
                        help="with --tune-mbr-samples: comma list of what MBR compares (report, findings; default report)")
    parser.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16, to stay under 25 MB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite OUT/MODEL_CARD.md from OUT/metrics.json (no data, training or evaluation)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")


def _run_make_dataset(argv: list[str], no_progress: bool) -> None:
    """``medreport make-dataset ARGV`` in this process."""
    from app.commands import make_dataset

    p = argparse.ArgumentParser()
    make_dataset.add_arguments(p)
    make_dataset.run(p.parse_args(argv + (["--no-progress"] if no_progress else [])))


def _make_dataset(args) -> Path:
    manifest = args.dataset / "manifest.jsonl"
    if manifest.is_file() and sum(1 for line in manifest.open(encoding="utf-8") if line.strip()) >= args.n:
        log.info("dataset %s exists; not rebuilt", args.dataset)
        return manifest  # (a smaller one is grown: studies already written with the same settings are kept)
    argv = ["--out", str(args.dataset), "--n", str(args.n), "--seed", str(args.seed), "--size", "demo",
            "--history-tokens", args.history_tokens, "--phantom-version", str(getattr(args, "phantom_version", 1))]
    t0 = time.perf_counter()
    _run_make_dataset(argv, args.no_progress)
    log.info("dataset built in %.0f s (not counted as training time)", time.perf_counter() - t0)
    return manifest


def _with_tiny_studies(args, manifest: Path) -> Path:
    """The training manifest: ``manifest`` alone, or with ``--tiny-studies`` tiny training studies
    (built in DATASET_tiny when missing) added (data.datasets.add_training_studies)."""
    if not getattr(args, "tiny_studies", 0):
        return manifest
    from data.datasets import add_training_studies

    tiny = args.dataset.parent / f"{args.dataset.name}_tiny"
    _run_make_dataset(["--out", str(tiny), "--n", str(args.tiny_studies), "--seed", str(args.tiny_seed),
                       "--size", "tiny", "--history-tokens", args.history_tokens], args.no_progress)
    out, added = add_training_studies(manifest, tiny / "manifest.jsonl", args.dataset / "manifest_mixed.jsonl", "tiny-")
    log.info("training manifest %s: the demo dataset plus %d tiny training studies", out, added)
    return out


def run(args: argparse.Namespace) -> int:
    from app.decoding import (DECODING_FILE, GREEDY, candidates, parse_mbr_from, parse_numbers, tune_decoding,
                              write_decoding)
    from app.train import evaluate_split, latest_checkpoint, load_config, read_metrics, train
    from multimodal.model import ReportModel

    if args.card_only:
        cfg = load_config(None, args.config, args.overrides)
        metrics = json.loads((args.out / "metrics.json").read_text())
        preds = args.run / "test_predictions.jsonl"
        if "per_finding" not in metrics and preds.is_file():  # a model evaluated before the table existed
            metrics["per_finding"] = per_finding_from_predictions(preds, args.dataset / "manifest.jsonl")
            (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (args.out / "MODEL_CARD.md").write_text(model_card(args, cfg, metrics))
        print(f"wrote {args.out / 'MODEL_CARD.md'}")
        return 0
    manifest = _make_dataset(args)
    cfg = load_config(None, args.config, args.overrides)
    final = args.run / "final"
    trained = (final / "model.safetensors").is_file()
    train_manifest = manifest if trained else _with_tiny_studies(args, manifest)
    prep_s = _prepare(train_manifest, cfg, args) if not trained else 0.0
    t0 = time.perf_counter()
    if not trained:
        resume = latest_checkpoint(args.run) is not None
        final = train(train_manifest, args.run, None if resume else cfg, resume=resume, progress=not args.no_progress)
    train_wall = time.perf_counter() - t0
    rows = read_metrics(args.run)
    train_seconds = max((r.get("train_s", 0.0) for r in rows), default=0.0)

    model = ReportModel.from_pretrained(final)
    decoding, table = dict(GREEDY), []
    if args.tune_studies:
        cands = candidates(args.tune_num_beams, mbr_samples=args.tune_mbr_samples,
                           temperatures=parse_numbers("--tune-temperatures", args.tune_temperatures),
                           calls_agreements=parse_numbers("--tune-calls-agreements", args.tune_calls_agreements),
                           record_agreements=parse_numbers("--tune-record-agreements", args.tune_record_agreements),
                           mbr_from=parse_mbr_from("--tune-mbr-from", args.tune_mbr_from),
                           acquisition_agreements=parse_numbers("--tune-acquisition-agreements",
                                                                args.tune_acquisition_agreements))
        decoding, table = tune_decoding(model, manifest, "val", max_studies=args.tune_studies, cands=cands,
                                        max_history_tokens=args.eval_history_tokens, batch_size=cfg.data.batch_size,
                                        progress=not args.no_progress, cache_dir=cfg.data.cache_dir or None)
        log.info("decoding chosen on %d val studies: %s", args.tune_studies, decoding)
    metrics = evaluate_split(model, manifest, "test", max_studies=args.eval_studies,
                             max_history_tokens=args.eval_history_tokens, batch_size=cfg.data.batch_size,
                             predictions=args.run / "test_predictions.jsonl", progress=not args.no_progress,
                             cache_dir=cfg.data.cache_dir or None, **decoding)
    metrics["decoding_table_val"] = table
    metrics["train_wall_seconds_this_invocation"] = round(train_wall, 1)
    metrics["preprocess_seconds_this_invocation"] = round(prep_s, 1)
    metrics["train_step_seconds"] = round(train_seconds, 1)  # optimizer steps only, all invocations
    write_shipped_model(model, args.out, fp16=not args.fp32)
    if table:
        write_decoding(args.out, decoding, table, "val", int(table[0]["n"]))
    else:
        (args.out / DECODING_FILE).unlink(missing_ok=True)  # greedy: no stale choice left behind
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (args.out / "MODEL_CARD.md").write_text(model_card(args, cfg, metrics))
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB): test finding micro-F1 {metrics.get('finding_micro_f1', 0):.3f}, "
          f"BLEU-4 {metrics.get('bleu4', 0):.4f}, ECE {metrics.get('ece', 0):.4f} on {metrics['n']} test studies")
    return 0


def _prepare(manifest: Path, cfg, args) -> float:
    """Decode the train and val studies into the training cache before the timed training (data
    preparation, like the dataset build; both cores in parallel)."""
    from app.train import model_config
    from app.train_data import PreprocessConfig, StudyCache, fill_cache, load_manifest_for_training

    if not cfg.data.cache_dir:
        return 0.0
    t0 = time.perf_counter()
    entries = [e for e in load_manifest_for_training(manifest) if e.split in ("train", "val")]
    pre = PreprocessConfig.from_model(model_config(cfg, cfg.data.vocab_size), audio=cfg.data.audio)
    fill_cache(StudyCache(cfg.data.cache_dir, pre), entries, workers=0, progress=not args.no_progress)
    dt = time.perf_counter() - t0
    log.info("preprocessed %d train/val studies into %s in %.0f s (not counted as training time)",
             len(entries), cfg.data.cache_dir, dt)
    return dt


def write_shipped_model(model, out: Path, fp16: bool = True) -> Path:
    """save_pretrained into ``out`` (fp16 weights unless told; loading converts back to fp32). Files
    beside the weights that the save does not write (decoding.json, calibration.json, the card) are
    kept, so that rewriting a model in place (``medreport calibrate``) loses none of them."""
    import copy

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m = copy.deepcopy(model)
    if fp16:
        m = m.half()
    m.save_pretrained(tmp, model.tokenizer)
    if out.is_dir():
        for f in out.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def per_finding_from_predictions(predictions: Path, manifest: Path) -> dict[str, dict]:
    """Per-finding test metrics from ``test_predictions.jsonl`` (its ``findings`` probabilities)
    and the manifest's labels (below-resolution findings left out, as in evaluate_split)."""
    import numpy as np

    from app.train import per_finding_metrics
    from app.train_data import below_resolution, finding_targets
    from data.datasets import read_manifest
    from multimodal.heads import DEFAULT_LOCATIONS

    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = {e.id: e for e in read_manifest(manifest, validate=False)}
    names = list(rows[0]["findings"])
    P = np.array([[r["findings"][n]["p"] for n in names] for r in rows])
    Y = np.array([finding_targets(entries[r["id"]].labels, names, DEFAULT_LOCATIONS)[0] for r in rows], dtype=float)
    for i, r in enumerate(rows):  # below-resolution findings are scored apart, as in evaluate_split
        for name in below_resolution(entries[r["id"]].labels) & set(names):
            Y[i, names.index(name)] = -1
    return per_finding_metrics(P, Y, names)


def _finding_rows(per: dict) -> str:
    def f(x):
        return "—" if x is None else f"{x:.2f}"
    return "\n".join(f"| {n.replace('_', ' ')} | {d['support']} | {d.get('threshold', 0.5):.2f} | {f(d['precision'])} | "
                     f"{f(d['recall'])} | {f(d['f1'])} | {f(d['auc'])} |"
                     for n, d in sorted(per.items(), key=lambda kv: -(kv[1]["auc"] or 0)))


def model_card(args, cfg, metrics: dict) -> str:
    argv = [a for a in (sys.argv[sys.argv.index(NAME) + 1:] if NAME in sys.argv else []) if a != "--card-only"]
    cmd = " ".join(["medreport", NAME, *argv])
    from collections import Counter

    from data.datasets import read_manifest

    splits = Counter(e.split for e in read_manifest(args.dataset / "manifest.jsonl", validate=False))
    f1 = metrics.get("finding_micro_f1") or 0.0
    fitted = any(t != 0.5 for t in (metrics.get("decision_thresholds") or {}).values())
    beta = float((cfg.model.get("heads") or {}).get("operating_beta", 1.0))
    at = (("each finding's operating point chosen on val" + (f" for micro F-beta, beta {beta:g} (recall weighed)"
                                                             if beta != 1 else "")) if fitted else "p >= 0.5")
    per = metrics.get("per_finding") or {}
    weak = sorted(n.replace("_", " ") for n, d in per.items() if (d.get("auc") or 0) < 0.75)
    weak_note = (f"* **A CPU-trained model that sees only some findings** (test finding micro-F1 {f1:.2f} at {at}). "
                 "It does not detect: " + ", ".join(weak) + " (test AUC below 0.75, table above): for these its "
                 "report says what is typical, not what is in the study.\n") if weak else ""
    if not per and f1 < 0.5:
        weak_note = (f"* **A CPU-trained model whose image findings are not learned yet** (test finding micro-F1 "
                     f"{f1:.2f} at {at}): its reports stay close to one generic report whatever the study.\n")
    facts = metrics.get("facts_carried")
    if facts is not None and facts < 0.5:
        weak_note += (f"* **It rarely carries facts from the patient's record into the report** ({facts:.0%} of the "
                      "planted history facts on the test split): read the history yourself.\n")
    run_cfg = Path(args.run) / "config.json" if getattr(args, "run", None) else None
    src = json.loads(run_cfg.read_text()).get("start_from") if run_cfg is not None and run_cfg.is_file() else None
    started = (f"\nThis run started at the checkpoint `{src}` (`medreport train --start-from`): the stages before it "
               "were trained by that run with the same recipe and seed, so the result is the one a straight run "
               "gives; the training time below includes theirs.") if src else ""
    per_table = (f"\n## Per finding (test split, called present at {at})\n"
                 "| finding | positives | threshold | precision | recall | F1 | AUC |\n"
                 "|---|---|---|---|---|---|---|\n" + _finding_rows(per) + "\n") if per else ""
    dec = metrics.get("decoding") or {}
    table = metrics.get("decoding_table_val") or []
    if table:
        from app.decoding import format_table

        decoding = ("\n## Decoding\nChosen by BLEU-4 of Findings + Impression on "
                    f"{table[0].get('n')} val studies (`medreport tune-decoding`, stored in `decoding.json`, used by "
                    "`generate`, the UI and the test metrics below):\n\n```\n"
                    f"{format_table(table, dec)}\n```\n")
    else:
        decoding = "\n## Decoding\nGreedy (not tuned).\n"
    if dec.get("strategy") == "mbr" and (dec.get("record_agreement") or 0) > 0:
        decoding += (f"Among the sampled reports, the choice also weighs (x {dec['record_agreement']:g}) the share of the "
                     "patient record's known cancers and prior lung resections that a report names in its Findings or "
                     "Impression (`data.report_consistency.RecordAgreement`); a sample that never ended earns nothing. "
                     "It only chooses between reports the decoder wrote.\n")
    if dec.get("strategy") == "mbr":
        decoding += ("A sampled report that never ended (it ran to the length cap) is kept only when none of the "
                     "study's samples ended (`core.generate`).\n")
    if dec.get("strategy") == "mbr" and (dec.get("acquisition_agreement") or 0) > 0:
        decoding += (f"The choice also weighs (x {dec['acquisition_agreement']:g}) whether a report's Technique states "
                     "the scan's contrast as the DICOM header gives it (\"without intravenous contrast\" for a "
                     "non-contrast scan; `data.report_consistency.AcquisitionAgreement`).\n")
    decoding += ("The report is kept whole (`PipelineConfig.complete_sections`, on by default): it may not end before "
                 "the impression has content, and no findings line starts with a list number.\n"
                 if (metrics.get("decoding") or {}).get("complete_report") else "")
    decoding += ("The Technique keeps to the scan's contrast (`PipelineConfig.consistent_with_acquisition`, on by "
                 "default): the decoder reads the acquisition line from the DICOM header, and a Technique sentence "
                 "that states the opposite is refused while it is written.\n"
                 if cfg.model.get("acquisition_prompt") and (metrics.get("decoding") or {}).get("consistent_with_acquisition")
                 else "")
    decoding += ("A nodule's change is kept to its own numbers (`PipelineConfig.consistent_measurements`, on by "
                 "default): with the record's prior size and the size measured on the CT, \"increased from 12 mm to "
                 "10 mm\" cannot be written.\n" if (metrics.get("decoding") or {}).get("consistent_measurements") else "")
    decoding += ("The report keeps the product's outline (`PipelineConfig.report_outline`, on by default): each "
                 "Findings line opens with the next organ-system heading, no heading appears elsewhere, impression "
                 "items are numbered 1., 2., ... in order.\n" if (metrics.get("decoding") or {}).get("report_outline") else "")
    decoding += ("The nodule call the decoder reads carries the nodule's size **measured automatically on the CT** "
                 "(`data.nodule_measure`, a classical measurement, not the network): the findings table marks it "
                 "\"auto-measured\"; check it on the images.\n" if cfg.model.get("nodule_size_prompt") else "")
    detectors = (cfg.model.get("heads") or {}).get("detector_evidence") or ()
    if detectors:
        decoding += ("The probabilities of " + ", ".join(d.replace("_", " ") for d in detectors) + " fuse the evidence of "
                     "**classical image detectors** (`data.detectors`: a lung-nodule detector, the vertebral bodies' "
                     "attenuation, a mediastinal lymph-node detector) with the finding heads, by weights fitted on the "
                     "validation split (`heads.evidence_fusion`); the findings table names the detector beside such a "
                     "probability. A lymphadenopathy call takes the station where the lymph-node detector found the "
                     "node (\"placed by the detector\" in the findings table). The "
                     "detectors were built and checked on synthetic phantoms only: on real studies refit the fusion "
                     "on labelled local studies (`medreport calibrate --detector-evidence ...`) before relying on it.\n")
    recal = metrics.get("calibration_command")
    if recal:
        decoding += (f"After training, the calibration (temperature, detector fusion, operating points; not the weights) "
                     f"was refit on the validation split: `{recal}`.\n")
    pv = f" --phantom-version {args.phantom_version}" if getattr(args, "phantom_version", 1) != 1 else ""
    n_tiny = getattr(args, "tiny_studies", 0)
    tiny = (f"\nPlus {n_tiny} training studies of the tiny geometry (16 x 64 x 64, 10 mm slices, as the bundled examples were until session 21): "
            f"`medreport make-dataset --out {args.dataset}_tiny --n {n_tiny} --seed {args.tiny_seed} --size tiny "
            f"--history-tokens {args.history_tokens}`, added as training studies only.") if n_tiny else ""
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in metrics.items() if not isinstance(v, (dict, list)))
    return f"""# medreport demo model

**Synthetic data — not for clinical use.** This model was trained only on computer-generated chest
CT phantoms, synthetic patient records and synthetic reports. It has never seen a real patient and
must not be used to read real studies.

## Data
Synthetic demo-size studies in `{args.dataset}`: {splits.get("train", 0)} train, {splits.get("val", 0)} val,
{splits.get("test", 0)} test (test studies use reserved report templates). Built (when missing) with
`medreport make-dataset --out {args.dataset} --n {args.n} --seed {args.seed} --size demo --history-tokens {args.history_tokens}{pv}`.{tiny}

## Training
Command: `{cmd}` (recipe `{args.config}`, seed {cfg.seed}, preset `{cfg.preset}`, model overrides
`{json.dumps(cfg.model)}`). Stages: {", ".join(f"{s.name} ({s.steps} steps, trains {'+'.join(s.train)}"
f"{' except ' + '+'.join(s.freeze) if s.freeze else ''}, "
f"{'LM + finding loss' if s.lm else 'finding loss'}, lr {s.lr if s.lr is not None else cfg.optim.lr:g}"
f"{''.join(f', {f:g}x for {p}' for p, f in s.lr_scale)})" for s in cfg.stages)}. History length curriculum
{[list(x) for x in cfg.data.history_curriculum]} (share of a stage's steps, max tokens; crop `{cfg.data.history_crop}`).
Finding probabilities are temperature-scaled on the validation split, and each finding's decision
threshold (its operating point) is chosen there to maximise the {"micro-F1" if beta == 1 else
f"micro F-beta (beta {beta:g}: a missed finding weighs {beta * beta:g} false calls)"} over all findings (0.5
where val has too few cases). Weights stored in
{"fp32" if args.fp32 else "fp16 (loaded as fp32)"}. See docs/training.md.{started}
{decoding}
## Test-split metrics
Test history policy: the most recent {args.eval_history_tokens} tokens of each record.

| metric | value |
|---|---|
{rows}
{per_table}
## Limitations
{weak_note}* Trained from scratch (no pretrained weights exist offline) in under an hour on a 2-core CPU:
  the image encoder sees each training study about once. Read the finding F1 above before
  trusting a finding; the probabilities are temperature-calibrated on the validation split.
* Training histories were cropped to at most {max(c for _, c in cfg.data.history_curriculum)} tokens; longer records at
  test time are read whole (block-sparse attention), a length the decoder was not trained on.
* Synthetic phantoms are far simpler than real CT. **Not for clinical use.**
"""

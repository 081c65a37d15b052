"""`medreport inspect PATH [--json]`: load a study and show what the loader found."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "inspect"
HELP = "load a study (folder, zip, DICOM, NIfTI, PNG/JPEG) and print shape, spacing, HU range, series picked/skipped, warnings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="+", help="study folder, .zip, .nii/.nii.gz, .png/.jpg, one DICOM file, or several files")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _text(summary: dict) -> str:
    unit = "HU" if summary["values_are_hu"] else ("intensity 0-1" if summary["kind"] == "radiograph" else "stored units")
    lines = [
        f"modality        {summary['modality']} ({summary['kind']}, {summary['source_format']})",
        f"shape (z,y,x)   {' x '.join(str(s) for s in summary['shape'])}",
        f"spacing (mm)    {' x '.join(f'{s:g}' for s in summary['spacing_mm'])}",
        f"value range     {summary['hu_min']:.1f} .. {summary['hu_max']:.1f} {unit}",
        f"series          {summary['series_description'] or '(no description)'}",
        f"series UID      {summary['series_uid'] or '-'}",
        f"picked because  {summary['picked_reason']}",
    ]
    md = summary["metadata"]
    facts = [f"{k}={md[k]}" for k in ("manufacturer", "kvp", "convolution_kernel", "slice_thickness_mm", "body_part", "contrast_agent_present") if k in md]
    if facts:
        lines.append(f"acquisition     {', '.join(facts)}")
    if summary["skipped_series"]:
        lines.append(f"skipped series  {len(summary['skipped_series'])}")
        for s in summary["skipped_series"]:
            lines.append(f"  - {s['series']} '{s.get('description', '')}' ({s.get('modality', '?')}, {s['n_images']} images): {s['reason']}")
    if summary["skipped_files"]:
        lines.append(f"skipped files   {len(summary['skipped_files'])}")
        for f in summary["skipped_files"][:20]:
            lines.append(f"  - {f['file']}: {f['reason']}")
        if len(summary["skipped_files"]) > 20:
            lines.append(f"  ... and {len(summary['skipped_files']) - 20} more")
    lines.append(f"warnings        {len(summary['warnings']) or 'none'}")
    lines.extend(f"  - {w}" for w in summary["warnings"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from data.study import load_study

    study = load_study(args.path[0] if len(args.path) == 1 else args.path)
    summary = study.summary()
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(_text(summary))
    return 0

"""The shipped model on the GPU against the CPU: the same test studies, greedy reports and finding
probabilities from both devices (fp32), and the wall time of each.

Run on a machine with CUDA (bench/gpu_check.sh runs it through the device tool):
    python -m bench.gpu_model_check --manifest DATASET/manifest.jsonl --studies 8
Prints one JSON object: reports identical, the largest probability difference, seconds per device.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from app.train import evaluate_split
from multimodal.model import ReportModel

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check compares the GPU with the CPU")
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "studies": args.studies}
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dev in ("cpu", "cuda"):
            model = ReportModel.from_pretrained(args.model, device=dev)
            pred = Path(tmp) / f"{dev}.jsonl"
            t0 = time.perf_counter()
            m = evaluate_split(model, args.manifest, args.split, max_studies=args.studies, predictions=pred,
                               progress=False)
            out[f"{dev}_s"] = round(time.perf_counter() - t0, 2)
            out[f"{dev}_bleu4"] = m.get("bleu4")
            rows[dev] = {r["id"]: r for r in map(json.loads, pred.read_text().splitlines())}
    same = [rows["cpu"][k]["report"] == rows["cuda"][k]["report"] for k in rows["cpu"]]
    out["reports_identical"] = f"{sum(same)} of {len(same)}"
    diffs = []
    for k, r in rows["cpu"].items():
        a = r.get("findings") or {}
        b = rows["cuda"][k].get("findings") or {}
        for name, v in a.items():
            if name in b:
                diffs.append(abs(v["p"] - b[name]["p"]))
    out["max_probability_diff"] = max(diffs) if diffs else None
    out["probabilities_compared"] = len(diffs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The classical detectors' cost: the lung-nodule candidate search, then the measurement of the
candidates per side by the ball fit (the default since session 27) and by the one-slice caliper,
and the mediastinal lymph-node detector (session 28: ``node_s``), on the bundled example ``syn00001`` (demo size, 64 x 128 x 128 at 5 x 2.7 mm) and on the same volume
repeated to a full-resolution grid (320 x 512 x 512 at 1 x 0.69 mm).

    python -m bench.detectors [--runs 3]

Each time is the median over ``--runs``; the sizes measured are printed beside them (the
repeated volume is blocky, so its sizes are not a test of accuracy: ``tests/data/
test_nodule_measure.py`` and docs/training.md, "Session 27", measure that).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import machine, print_table, write_json
from data.node_measure import node_candidates
from data.nodule_measure import measure_by_side, nodule_candidates
from data.study import load_study

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "studies" / "syn00001"


def _median_s(fn, runs: int):
    times, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    study = load_study(EXAMPLE)
    hu = np.asarray(study.volume, np.float32)
    sp = tuple(float(s) for s in study.spacing_mm)
    fine = np.repeat(np.repeat(np.repeat(hu, 5, axis=0), 4, axis=1), 4, axis=2)  # [5Z, 4Y, 4X]
    fine_sp = (sp[0] / 5, sp[1] / 4, sp[2] / 4)
    rows = []
    for name, vol, spacing in (("demo", hu, sp), ("full", fine, fine_sp)):
        t_search, cands = _median_s(lambda v=vol, s=spacing: nodule_candidates(v, s), args.runs)
        t_node, nodes = _median_s(lambda v=vol, s=spacing: node_candidates(v, s), args.runs)
        for method in ("fit", "caliper"):
            t_m, got = _median_s(lambda v=vol, s=spacing, m=method: measure_by_side(v, s, cands=cands, method=m),
                                 args.runs)
            rows.append({"volume": name, "shape": "x".join(map(str, vol.shape)), "method": method,
                         "search_s": round(t_search, 3), "measure_s": round(t_m, 3),
                         "sizes_mm": {k: round(m.diameter_mm, 1) for k, m in got.items()},
                         "node_s": round(t_node, 3), "node_station": nodes[0].station if nodes else None})
    print_table(rows, ["volume", "shape", "method", "search_s", "measure_s", "sizes_mm", "node_s", "node_station"])
    write_json("detectors", {"machine": machine(), "runs": args.runs, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

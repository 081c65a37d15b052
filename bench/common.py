"""Shared benchmark helpers: timing, fp32 matmul peak, peak-memory measurement, machine
description, table printing and JSON output.  Generic: any bench may import it."""
from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeats`` wall time in seconds (min is the least noise-sensitive statistic)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of a square n x n matmul: the practical fp32 peak of this machine now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / time_call(lambda: a @ b, repeats=repeats, warmup=2) / 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Extra peak resident memory while running fn, beyond what was resident before it.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads VmHWM after the
    call; None where that is unsupported (non-Linux, no permission)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
        fn()
        return max(0, (_status_kb("VmHWM") - before) * 1024)
    except (OSError, RuntimeError):
        return None


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg_at_start": load}


def load_note(detail: str = "") -> str:
    """What the machine was doing, from the 1-minute load average now (call it at the end of a
    run: a quiet run's own load is at most its thread count)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return detail
    threads = torch.get_num_threads()
    state = ("no other load (the 1-min load average is within this run's own threads)" if load <= threads + 0.5
             else "other processes were running (1-min load average above this run's threads)")
    return f"{state}: load average {load:.2f} with {threads} threads on {os.cpu_count()} cores" + (f"; {detail}" if detail else "")


def product_allocator(default_malloc: bool = False) -> tuple[bool, str]:
    """Set the process's allocator up as the ``medreport`` command does (``app.cli.
    configure_allocator``: freed memory kept in the heap), unless ``default_malloc``; -> (whether it
    is set, the setting in words for the JSON's ``allocator``)."""
    from app.cli import configure_allocator

    heap = not default_malloc and configure_allocator()
    return heap, ("as the medreport command runs: freed memory kept in the heap (app.cli.configure_allocator)"
                  if heap else "glibc defaults")


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, width)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, width)))


def write_json(name: str, payload: dict, quick: bool = False) -> Path:
    """bench/results/<name>.json (``<name>_quick.json`` for --quick smoke runs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path

"""Batch report generation (``medreport generate``): many studies, one pipeline, resumable.

Input: a manifest (JSONL, ``{"id", "study", "history"?, "history_text"?, "audio"?}`` per line,
paths relative to the manifest's folder; other manifest keys are ignored) or a folder of study
folders (contracts.md layout; companions found by name).

Output, per study ``OUT/<id>/``: ``report.txt``, ``report.json`` (+ ``report.fhir.json``,
``report.sr.dcm`` on request), each written atomically; ``report.json`` last, and its presence
marks the study done, so a re-run skips it. A study that fails gets ``error.json`` (the
user-facing message, no traceback, no patient data) and the batch goes on. At the end:
``OUT/summary.json`` and ``OUT/predictions.jsonl`` (``{"id", "report"}`` rows, what
``medreport evaluate --hyp`` reads), rebuilt from every ``report.json`` so a resumed run is
complete.

Sharding (torchrun): rank r of world W takes the studies whose index i has i % W == r; each
rank writes ``summary.rank<r>.json``; rank 0 waits for all of them, then writes the merged
summary and predictions.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from app.report import atomic_write_text
from data.datasets import iter_jsonl
from data.errors import MedreportError

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class BatchInputError(MedreportError):
    """A batch input (manifest or folder) that cannot be read."""


@dataclass
class BatchItem:
    id: str
    study: Path
    history_path: Path | None = None
    history_text: str | None = None
    audio_path: Path | None = None


@dataclass
class BatchSummary:
    total: int = 0  # studies of this rank's shard (after --limit)
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0  # wall time of this run
    mean_seconds_per_study: float | None = None  # over the studies generated in this run
    failures: list[dict] = field(default_factory=list)  # {"id", "error"}
    rank: int = 0
    world_size: int = 1
    ranks_missing: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def safe_id(study_id: str) -> str:
    """A folder name for an id: path separators and other odd characters become ``_``."""
    s = _SAFE_ID.sub("_", str(study_id)).strip("._")
    if not s:
        raise BatchInputError(f"study id {study_id!r} has no usable characters; use letters, digits, '.', '_' or '-'")
    return s


def read_batch_input(path: str | Path, split: str | None = None) -> list[BatchItem]:
    """Studies of a manifest (JSONL) or a folder of study folders, in input order; ``split``
    keeps only a manifest's rows of that split (train / val / test)."""
    path = Path(path)
    if not path.exists():
        raise BatchInputError(f"{path} does not exist: give a manifest (.jsonl) or a folder of study folders")
    if split is not None and not path.is_file():
        raise BatchInputError(f"--split needs a manifest (.jsonl with a 'split' field); {path} is a folder")
    if path.is_file():
        return _read_manifest(path, split)
    subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    if not subs:
        raise BatchInputError(f"{path} has no study sub-folders: put each study in its own folder "
                              "(or give the study folder to the UI / `medreport inspect`)")
    return [BatchItem(id=p.name, study=p) for p in subs]


def _read_manifest(path: Path, split: str | None = None) -> list[BatchItem]:
    root = path.parent
    items, seen = [], set()

    def rel(v):
        return None if v in (None, "") else (Path(v) if Path(v).is_absolute() else root / v)

    for n, d in iter_jsonl(path, BatchInputError):
        if "id" not in d or not d.get("study"):
            raise BatchInputError(f"{path.name} line {n}: needs 'id' and 'study' (a path relative to the manifest)")
        sid = str(d["id"])
        if sid in seen:
            raise BatchInputError(f"{path.name} line {n}: id {sid!r} appears twice; ids must be unique")
        seen.add(sid)
        if split is not None and d.get("split") != split:
            continue
        items.append(BatchItem(id=sid, study=rel(d["study"]), history_path=rel(d.get("history")),
                               history_text=d.get("history_text"), audio_path=rel(d.get("audio"))))
    if not items:
        raise BatchInputError(f"{path.name} has no studies" + (f" of split {split!r} (use train, val or test)" if split else ""))
    return items


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Items of one rank: index % world_size == rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return [it for i, it in enumerate(items) if i % world_size == rank]


def rank_from_env(env: dict | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK`` / ``WORLD_SIZE`` (0, 1 when absent)."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


def is_done(out_dir: Path, study_id: str) -> bool:
    return (out_dir / safe_id(study_id) / "report.json").is_file()


def _error_message(exc: BaseException) -> str:
    """User-facing message without patient data: our errors' messages are PHI-free by contract;
    anything else is named by its type only (its message may hold paths)."""
    if isinstance(exc, MedreportError):
        return str(exc)
    return (f"unexpected {type(exc).__name__} while generating the report; "
            "run `medreport -vv generate` on this study alone for details")


def run_batch(pipeline, items: Sequence[BatchItem], out_dir: str | Path, formats: Sequence[str] = ("txt", "json"),
              limit: int | None = None, rank: int = 0, world_size: int = 1, show_progress: bool = True,
              wait_timeout_s: float = 24 * 3600, on_study: Callable[[str, str], None] | None = None,
              batch_size: int = 1) -> BatchSummary:
    """Generate reports for this rank's share of ``items`` (after ``limit``) into ``out_dir``.

    ``pipeline`` has ``run(source, history_text=, history_path=, audio_path=) -> Report`` and,
    for ``batch_size > 1``, ``run_many(list of StudyParts, max_batch=) -> [Report | Exception]``
    (each study of a chunk encoded alone, their reports generated together; each is still written,
    or fails, alone).
    ``on_study(id, status)`` is called with "done" / "skipped" / "failed" (tests, UIs)."""
    from tqdm.auto import tqdm

    from app.export import write_report
    from app.pipeline import StudyParts

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(items)[:limit] if limit is not None else list(items)
    mine = shard(chosen, rank, world_size)
    summary = BatchSummary(total=len(mine), rank=rank, world_size=world_size)
    t_start = time.perf_counter()
    gen_seconds = 0.0
    bar = tqdm(total=len(mine), desc=f"generate[{rank}/{world_size}]" if world_size > 1 else "generate", unit="study",
               disable=not show_progress, dynamic_ncols=True)

    def fail(n: int, item: BatchItem, exc: BaseException) -> None:
        msg = _error_message(exc)
        log.warning("study %d of this shard failed: %s", n, type(exc).__name__)
        log.debug("failure details", exc_info=exc)
        atomic_write_text(out_dir / safe_id(item.id) / "error.json", json.dumps(
            {"id": item.id, "error": msg, "type": type(exc).__name__}, indent=2))
        summary.failed += 1
        summary.failures.append({"id": item.id, "error": msg})

    def finish(item: BatchItem, status: str) -> None:
        bar.update(1)
        bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed)
        if on_study:
            on_study(item.id, status)

    numbered = list(enumerate(mine))
    for start in range(0, len(mine), batch_size):
        chunk = numbered[start: start + batch_size]
        todo = []
        for n, item in chunk:
            if is_done(out_dir, item.id):
                summary.skipped += 1
                finish(item, "skipped")
            else:
                todo.append((n, item))
        if not todo:
            continue
        t0 = time.perf_counter()
        if batch_size > 1 and len(todo) > 1:
            parts = [StudyParts(it.study, it.history_path, it.history_text, it.audio_path) for _, it in todo]
            try:
                results = pipeline.run_many(parts, max_batch=batch_size)
            except Exception as exc:  # the whole chunk failed (e.g. out of memory): each is reported
                results = [exc] * len(todo)
        else:
            results = []
            for _, it in todo:
                try:
                    results.append(pipeline.run(it.study, history_text=it.history_text, history_path=it.history_path,
                                                audio_path=it.audio_path))
                except Exception as exc:  # one bad study never stops the batch
                    results.append(exc)
        for (n, item), report in zip(todo, results):
            sdir = out_dir / safe_id(item.id)
            if not isinstance(report, Exception):
                try:
                    report.study_id = item.id
                    write_report(report, sdir, formats)
                except Exception as exc:
                    report = exc
            if isinstance(report, Exception):
                fail(n, item, report)
                finish(item, "failed")
                continue
            summary.done += 1
            err = sdir / "error.json"
            if err.exists():
                err.unlink()  # a retry that worked
            finish(item, "done")
        gen_seconds += time.perf_counter() - t0
    bar.close()
    summary.seconds = round(time.perf_counter() - t_start, 3)
    summary.mean_seconds_per_study = round(gen_seconds / summary.done, 3) if summary.done else None
    if world_size == 1:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary.to_dict(), indent=2))
        write_predictions(out_dir)
        return summary
    atomic_write_text(out_dir / f"summary.rank{rank}.json", json.dumps(summary.to_dict(), indent=2))
    if rank == 0:
        summary = merge_rank_summaries(out_dir, world_size, wait_timeout_s)
        write_predictions(out_dir)
    return summary


def merge_rank_summaries(out_dir: Path, world_size: int, wait_timeout_s: float = 24 * 3600,
                         poll_s: float = 2.0) -> BatchSummary:
    """Rank 0: wait for every rank's ``summary.rank<r>.json``, then write ``summary.json``."""
    deadline = time.monotonic() + wait_timeout_s
    paths = [out_dir / f"summary.rank{r}.json" for r in range(world_size)]
    while not all(p.is_file() for p in paths) and time.monotonic() < deadline:
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    merged = BatchSummary(world_size=world_size)
    weighted = 0.0
    for r, p in enumerate(paths):
        if not p.is_file():
            merged.ranks_missing.append(r)
            continue
        s = json.loads(p.read_text())
        for k in ("total", "done", "skipped", "failed"):
            setattr(merged, k, getattr(merged, k) + int(s[k]))
        merged.failures.extend(s["failures"])
        merged.seconds = max(merged.seconds, float(s["seconds"]))
        weighted += (s["mean_seconds_per_study"] or 0.0) * s["done"]
    merged.mean_seconds_per_study = round(weighted / merged.done, 3) if merged.done else None
    atomic_write_text(out_dir / "summary.json", json.dumps(merged.to_dict(), indent=2))
    if merged.ranks_missing:
        log.warning("ranks %s wrote no summary within the wait; summary.json counts the others only", merged.ranks_missing)
    return merged


def write_predictions(out_dir: str | Path) -> Path:
    """``predictions.jsonl`` from every ``<id>/report.json`` under ``out_dir`` (sorted by id)."""
    out_dir = Path(out_dir)
    rows = []
    for p in sorted(out_dir.glob("*/report.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            log.warning("skipping an unreadable report.json in %s", p.parent.name)
            continue
        rows.append(json.dumps({"id": d.get("id") or p.parent.name, "report": d["report"]}, ensure_ascii=False))
    return atomic_write_text(out_dir / "predictions.jsonl", "\n".join(rows) + ("\n" if rows else ""))

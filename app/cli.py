"""`medreport` command line.

Each sub-command lives in its own module under ``app/commands`` and exposes::

    NAME: str                      # the sub-command's name, e.g. "inspect"
    HELP: str                      # one line for ``medreport --help``
    def add_arguments(parser): ... # argparse arguments
    def run(args) -> int: ...      # exit status

Modules are discovered automatically, so adding a command touches no other file.
Errors of the ``data.errors.MedreportError`` family are printed as one clear message
(no traceback) and exit with status 2.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import pkgutil
import sys

from app import __version__

log = logging.getLogger("medreport")


def _command_modules():
    import app.commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"app.commands.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    return mods


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="medreport",
        description="Structured CT radiology reports from images, history and dictation. "
        "The shipped demo model is trained on synthetic data - not for clinical use.",
    )
    parser.add_argument("--version", action="version", version=f"medreport {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {}
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        commands[mod.NAME] = mod
    return parser, commands


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def configure_allocator() -> bool:
    """Keep freed memory in the process heap (glibc ``mallopt``); -> whether it was set.

    By default glibc gives every freed block above its mmap threshold (32 MB at most) back to the
    system, so each call on a long record maps its ~100 MB tensors afresh and pays a page fault per
    4 KB it touches. Kept in the heap they are reused: ``bench.e2e`` with a 100,000-token record
    8.7 -> 6.3 s p50, one layer's local attention at 100K 0.137 -> 0.110 s (session 17). All threads
    share the one heap (``M_ARENA_MAX`` 1): glibc's per-thread arenas, where the web UI's request
    threads would otherwise allocate, map every block over 64 MB afresh whatever the threshold. The
    cost: the process keeps its peak memory instead of returning it, and threads take turns at the
    allocator's lock (large tensors are few; small Python objects have their own allocator).
    ``MEDREPORT_DEFAULT_MALLOC=1`` keeps glibc's defaults; other C libraries are left alone. Call it
    before other threads start allocating (the CLI: first thing)."""
    if os.environ.get("MEDREPORT_DEFAULT_MALLOC", "") not in ("", "0") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
    ok = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1)) \
        and bool(mallopt(M_ARENA_MAX, 1))
    log.debug("allocator: freed memory kept in the heap: %s", ok)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    configure_allocator()
    if not args.command:
        parser.print_help()
        return 1
    from data.errors import MedreportError

    try:
        return int(commands[args.command].run(args) or 0)
    except MedreportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

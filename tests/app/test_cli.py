"""The `medreport` entry point's process set-up (app/cli.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# In a fresh process: set up the allocator as the CLI does, then malloc 100 MB and ask glibc
# (mallinfo2) whether the block came from a fresh mapping (one more mmapped block) or from the heap.
_PROBE = """
import ctypes, sys, threading
from app.cli import configure_allocator
ok = configure_allocator()
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
def grow():  # -> how many more blocks glibc has mapped after a 100 MB malloc
    before = libc.mallinfo2().hblks
    p = libc.malloc(100 << 20)
    grew = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(p))
    return grew
main = grow()
out = []
t = threading.Thread(target=lambda: out.append(grow()))  # as a web UI request thread
t.start(); t.join()
print(int(ok), main, out[0])
"""


def _probe(**env) -> tuple[int, int, int]:
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert r.returncode == 0, r.stderr[-2000:]
    ok, main, thread = r.stdout.split()
    return int(ok), int(main), int(thread)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_cli_keeps_large_freed_blocks_in_the_heap_unless_told_not_to():
    """A 100 MB block comes from the heap once the CLI set the allocator up (no fresh mapping and
    its page faults on every long-record call), on the main thread and on another thread (the web
    UI's requests); MEDREPORT_DEFAULT_MALLOC=1 keeps glibc's defaults, under which the same block
    is a fresh mapping on either."""
    assert _probe(MEDREPORT_DEFAULT_MALLOC="0") == (1, 0, 0)
    assert _probe(MEDREPORT_DEFAULT_MALLOC="1") == (0, 1, 1)

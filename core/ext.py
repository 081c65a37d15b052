"""Optional compiled CPU kernels (``core/csrc``), built once with the machine's C++ compiler.

``ops()`` returns the compiled inference ops (``torch.ops.medreport``: the fused MoE of
``core/csrc/moe_cpu.cpp``, the block-sparse attention forward of ``core/csrc/attention_cpu.cpp``) or
``None`` where they cannot be built (no compiler, a build error, ``MEDREPORT_NO_EXT=1``);
``core.moe.MoE`` and ``core.attention`` then use their pure-PyTorch paths, which give the same
result. The build goes through PyTorch's own ``torch.utils.cpp_extension.load`` (cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; rebuilt only when the sources,
the flags or torch change), takes ~40-60 s on 2 cores; ``make install`` and the Dockerfile run it ahead of time
(``python -c "import sys, core.ext; sys.exit(core.ext.main())"``).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SRC = Path(__file__).parent / "csrc"
NAME = "medreport_cpu"
SOURCES = ("moe_cpu.cpp", "attention_cpu.cpp")
_LOCK = threading.Lock()  # the web UI's request threads may reach the first model call together


def disabled() -> bool:
    return os.environ.get("MEDREPORT_NO_EXT", "") not in ("", "0")


@lru_cache(maxsize=1)
def _load():
    """Build (or find the cached build of) the extension and load it; -> its ops or None."""
    if disabled():
        log.info("compiled CPU kernels disabled (MEDREPORT_NO_EXT); using the PyTorch paths")
        return None
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # CUDA wheels warn that no CUDA runtime is found: not needed here
    try:
        from torch.utils.cpp_extension import load
        load(name=NAME, sources=[str(SRC / f) for f in SOURCES], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        log.info("compiled CPU kernels loaded (core/csrc: MoE, block-sparse attention)")
        return torch.ops.medreport
    except Exception as e:  # no compiler, no ninja, a build error: the PyTorch paths still work
        log.warning("the compiled CPU kernels could not be built (%s: %s); MoE and attention inference "
                    "use the PyTorch paths (same results, slower). Install a C++ compiler "
                    "(Debian: apt-get install g++) and ninja (pip install ninja) to enable it.",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None
    finally:
        quiet.setLevel(level)


def ops():
    """The compiled ops (``torch.ops.medreport``) or None:

    - ``moe_experts(x [N,D], w [N,K], idx [N,K] int64, w13 [E,D,2F], w2 [E,F,D], chunk)`` -> (y [N,D],
      counts [E]): the experts for given routing;
    - ``moe_forward(x [N,D], router_w [E,D], w13, w2, top_k, chunk)`` -> (y, counts): the softmax
      router's top-k and the experts in one call;
    - ``bsa_forward(q, k, v [BH,T,d], cmp_k, cmp_v [BH,C,d]?, sel_idx [B,Q,K] int64?, sel_ok [B,Q,K]?,
      gates [BH,T,G]?, n_heads, block, window, global_blocks, compress, branches, scale)`` -> o
      [BH,T,d]: every branch of ``core.attention.block_sparse_attention`` (inference)."""
    with _LOCK:
        return _load()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    op = ops()
    if op is None:
        print("core.ext: the compiled CPU kernels are not available; the PyTorch paths will be used")
        return 0 if disabled() else 1
    print("core.ext: compiled CPU kernels ready (MoE, block-sparse attention)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

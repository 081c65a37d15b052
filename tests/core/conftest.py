"""core tests: one intra-op thread.  On the shared 2-core CI machine two OpenMP threads that wait
on each other at every barrier make small ops ~40x slower when another process is busy."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_without_avx512():
    """Run Python ``code`` in a fresh process with MEDREPORT_NO_AVX512=1 (the compiled kernels then
    take their AVX2 paths, the CI machine's, even on a CPU with AVX-512) and assert that it printed
    ``ok`` last."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def run(code: str) -> None:
        env = {**os.environ, "MEDREPORT_NO_AVX512": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]

    return run

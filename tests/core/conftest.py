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

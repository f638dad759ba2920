"""Shared by the pytest-benchmark files in bench/ (not part of the suite: `pytest bench` runs
them with benchmarks disabled as a smoke test, `pytest bench --benchmark-enable` times them).

Threads: 2 (override with LOWBIT_BENCH_THREADS). glibc malloc is told to keep freed large
blocks (bench/_timing.py steady_malloc; LOWBIT_BENCH_MALLOC_TUNE=0 to keep the default)."""
import os

import pytest
import torch

from _timing import steady_malloc

THREADS = int(os.environ.get("LOWBIT_BENCH_THREADS", "2"))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    steady_malloc()
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)

"""Benchmarks of the SEAT op (pytest-benchmark): `pytest bench/ --benchmark-only`.

The repository's conftest.py (one level up) switches Triton to its interpreter when there is
no GPU (pyproject.toml's python_files collects bench_*.py); here the copy bandwidth that the
results are compared with is measured once per session.
"""

from __future__ import annotations

import time

import pytest
import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Q of the paper shape in bf16 (16 x 128^2 x 1024 x 2 bytes = 512 MiB) on a GPU; a smaller
# buffer on the CPU, still far larger than its caches.
_COPY_BYTES = {"cuda": 16 * 128 * 128 * 1024 * 2, "cpu": 64 * 2**20}


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    dev = device()
    nbytes = _COPY_BYTES[dev.type]
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(3):
        dst.copy_(src)
    reps = 20 if dev.type == "cuda" else 5
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = (time.perf_counter() - t0) / reps
    return 2 * nbytes / seconds

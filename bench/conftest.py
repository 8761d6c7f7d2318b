"""Benchmarks of the SEAT op (pytest-benchmark): `pytest bench/ --benchmark-only`.

The repository's conftest.py (one level up) switches Triton to its interpreter when there is
no GPU (pyproject.toml's python_files collects bench_*.py); here the copy bandwidth that the
results are compared with is measured once per session.
"""

from __future__ import annotations

import pytest
import torch

from bench.nvml import gpu_info
from bench.timing import copy_bandwidth as measure_copy_bandwidth


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    return measure_copy_bandwidth(device())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the GPU and its state (clocks, temperature, power) beside the timings: a reader
    comparing two result files should see whether the card ran at the same clocks."""
    if not torch.cuda.is_available():
        machine_info["gpu"] = None
        return
    info = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    info.update(gpu_info(torch.cuda.current_device()))
    machine_info["gpu"] = info

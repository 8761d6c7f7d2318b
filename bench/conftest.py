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


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the GPU and its state (clocks, temperature, power) beside the timings: a reader
    comparing two result files should see whether the card ran at the same clocks."""
    if not torch.cuda.is_available():
        machine_info["gpu"] = None
        return
    info = {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is a test extra; the timings stand without it
        machine_info["gpu"] = info
        return
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        info.update(
            driver=pynvml.nvmlSystemGetDriverVersion(),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            memory_clock_mhz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            temperature_c=pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            power_w=pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        )
    finally:
        pynvml.nvmlShutdown()
    machine_info["gpu"] = info

"""Device timing shared by the benchmarks and the GPU check's stages.

On CUDA, `triton.testing.do_bench` does the timing: CUDA events around each run and an L2
flush (a write over a buffer larger than L2) before each, so no run reads its inputs from the
cache the previous run left warm. On the CPU (benchmark smoke runs, the GPU check's dry run)
a host clock times a few rounds: those numbers only show that the code runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from san_fast.step_profile import event_us, is_device_work  # noqa: F401 (profile_step imports them here)

# Q of the paper shape in bf16 (16 x 128^2 x 1024 x 2 bytes = 512 MiB) on a GPU; a smaller
# buffer on the CPU, still far larger than its caches.
COPY_BYTES = {"cuda": 16 * 128 * 128 * 1024 * 2, "cpu": 64 * 2**20}


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_rounds: int = 3) -> dict:
    """Median, min and max milliseconds of `fn` (which must not depend on earlier runs' state)."""
    if device.type == "cuda":
        import triton.testing

        try:
            times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (AssertionError, TypeError):  # a triton without return_mode="all": three quantiles
            times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.0, 1.0])
        method = "cuda events, L2 flushed before each run (triton.testing.do_bench)"
    else:
        fn()
        times = []
        for _ in range(cpu_rounds):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        method = "host clock (CPU)"
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": len(times), "method": method}


def graph_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> Optional[dict]:
    """time_ms of `fn` captured once as a CUDA graph and replayed (L2 flushed before each
    replay, as there): the device's time for the work without the host issuing each launch, as
    a training step runs it under --compile's CUDA graphs. None off CUDA. `fn` must not read a
    device value on the host (capture fails on a synchronisation) and must be warm (autotuned,
    compiled) already."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # capture needs its allocations warmed away from the default stream
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    try:
        return time_ms(graph.replay, device, warmup_ms, rep_ms)
    finally:
        del out, graph


def step_ms(step: Callable[[], object], device: torch.device, steps: int) -> tuple[float, float]:
    """(host, wall) milliseconds per call of `step` over `steps` calls: the host's time to issue
    them, and the time until the device has finished them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    return host * 1e3 / steps, wall * 1e3 / steps


def kernel_ms(fn: Callable[[], object], device: torch.device, runs: int = 5) -> Optional[float]:
    """Milliseconds of GPU work (kernels, copies, fills) per run of `fn`, from torch.profiler's
    device records (CUDA only). time_ms's events also count the GPU waiting for the host to issue
    launches: where this figure is well below time_ms's, the case is bound by the host."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize(device)
    return sum(event_us(e, "cuda") for e in prof.key_averages() if is_device_work(e)) / runs / 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = COPY_BYTES[device.type]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    seconds = time_ms(lambda: dst.copy_(src), device, warmup_ms=10, rep_ms=50)["ms"] / 1e3
    return 2 * nbytes / seconds


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory allocated while `fn` runs beyond what was allocated before (CUDA only),
    counting what `fn` returns while it is alive."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak

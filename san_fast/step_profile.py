"""`--profile-steps N`: torch.profiler over N training steps right after warm-up, as the trainer
runs them (data loading, augmentation, compiled graphs, optimizer, bookkeeping).

bench/profile_step.py profiles a bare loop of compiled steps on one batch; a run's steps can
differ from that loop (data loading, augmentation, bookkeeping), and only a trace of the real
loop shows where the host or the GPU waits (on an H100 it showed the CUDA-graph step bound by
its kernels, the host well ahead). The trainer labels its phases (`phase`: the batch wait, augmentation,
forward, backward, optimizer, loss sums); the summary gives, per step, the window's wall time,
the GPU's kernel time (CUDA only), and each phase's host time. Written to the run folder:
profile_trace.json (chrome://tracing or https://ui.perfetto.dev) and metrics.json's
train.profile.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from san_fast.io_utils import atomic_write

PHASE_PREFIX = "san."
TRACE_FILE = "profile_trace.json"
_active = False  # phases cost a dispatcher call each, so they are labelled only while profiling


def phase(name: str):
    """A labelled phase of the step while a StepProfiler runs; nothing otherwise."""
    return record_function(PHASE_PREFIX + name) if _active else contextlib.nullcontext()


class StepProfiler:
    """Profiles `steps` steps: start() before the first, step_done() after each."""

    def __init__(self, steps: int, device: torch.device, folder: Path):
        self.steps, self.device, self.folder = steps, device, Path(folder)
        self.done = 0
        self.prof: Optional[profile] = None
        self.started = 0.0
        self.result: Optional[dict[str, Any]] = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        global _active
        if self.prof is not None or self.result is not None or self.steps < 1:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        _active = True
        self.started = time.perf_counter()

    def step_done(self) -> None:
        if self.prof is None:
            return
        self.done += 1
        if self.done == self.steps:
            self.stop()

    def stop(self) -> None:
        """End the window early or on time (a run shorter than the window ends it at its end)."""
        global _active
        if self.prof is None:
            return
        self._sync()
        wall = time.perf_counter() - self.started
        _active = False
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        self.result = summarise(prof.key_averages(), prof.events(), self.done, wall, self.device)
        trace = self.folder / TRACE_FILE
        atomic_write(trace, lambda f: f.write(_chrome_trace(prof)))
        self.result["trace"] = str(trace)

    def line(self) -> Optional[str]:
        r = self.result
        if not r or not r["steps"]:
            return None
        gpu = "" if r["gpu_kernel_ms_per_step"] is None else (
            f", GPU kernels {r['gpu_kernel_ms_per_step']:.2f} ms ({100 * r['gpu_busy_fraction']:.0f}% busy)")
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["host_ms_per_step"].items())
        return (f"profile: {r['steps']} steps, {r['wall_ms_per_step']:.2f} ms each{gpu}; host ms per step: "
                f"{phases}; trace {r['trace']}")


def _chrome_trace(prof: profile) -> bytes:
    """The chrome trace as bytes (torch writes it only to a path: through a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TRACE_FILE
        prof.export_chrome_trace(str(path))
        return path.read_bytes()


def event_us(evt, device_type: str) -> float:
    """Own microseconds of a torch.profiler averaged event on the device (or the CPU), across
    torch versions (device_time was cuda_time before)."""
    names = ["self_device_time_total", "self_cuda_time_total"] if device_type == "cuda" else ["self_cpu_time_total"]
    for name in names:
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def is_device_work(evt) -> bool:
    """A kernel, copy or fill on the GPU. User annotations (the optimizer's step, inductor's graph
    ranges, this module's phases) show on the GPU's timeline too but cover kernels counted
    already: the 2026-11-26 profile double-counted Adam."""
    return (getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(evt, "is_user_annotation", False))


def summarise(averages, events, steps: int, wall_s: float, device: torch.device) -> dict[str, Any]:
    """Per step: wall ms, GPU kernel ms and busy share (CUDA), host ms of each labelled phase.
    `averages` is prof.key_averages(), `events` prof.events()."""
    per = max(steps, 1)
    host: dict[str, float] = {}
    for e in events:
        if e.name.startswith(PHASE_PREFIX) and e.device_type == torch.autograd.DeviceType.CPU:
            key = e.name[len(PHASE_PREFIX):]
            host[key] = host.get(key, 0.0) + e.time_range.elapsed_us() / 1e3 / per
    kernel_ms = None
    if device.type == "cuda":
        total_us = sum(event_us(e, "cuda") for e in averages if is_device_work(e))
        kernel_ms = total_us / 1e3 / per
    wall_ms = 1e3 * wall_s / per
    return {"steps": steps, "wall_ms_per_step": round(wall_ms, 3),
            "gpu_kernel_ms_per_step": None if kernel_ms is None else round(kernel_ms, 3),
            "gpu_busy_fraction": None if kernel_ms is None else round(kernel_ms / wall_ms, 3),
            "host_ms_per_step": {k: round(v, 3) for k, v in sorted(host.items(), key=lambda kv: -kv[1])}}

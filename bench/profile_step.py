"""Where a compiled training step's GPU time goes (issue 13, item 4): torch.profiler over a few
steps at the paper preset (bf16, channels-last, fused SEAT, --compile: row (d) of
bench/train_rows.py), after warm-up steps that compile; the top kernels by GPU time, each with
its calls and share, as a compact table.

    python -m bench.profile_step --json profile.json --budget 90 [--dry-run]
The dry run profiles a tiny eager step on the CPU (CPU time) to check the code.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.runner import StageReport
from bench.timing import event_us, is_device_work, step_ms
from san_fast.config import resolve
from san_fast.model import SAN
from san_fast.runtime import build_runtime

PAPER_D = {"preset": "paper", "num_semantics": 27, "amp": "bf16", "channels_last": True, "seat_impl": "triton",
           "compile": True}
TINY = {"preset": "cpu", "crop_size": 32, "embed_dim": 32, "vit_dim": 32, "vit_heads": 2, "vit_depth": 1,
        "batch_size": 4, "device": "cpu", "amp": "off", "seat_impl": "torch"}


def build_step(cfg):
    """A training step as the trainer runs it: autocast forward of SAN.losses (compiled when
    cfg.compile), backward, Adam (fused where the project builds it fused)."""
    runtime = build_runtime(cfg)
    model = SAN(cfg).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_attention_backend(cfg.attn, runtime.device)
    try:
        from san_fast.train_step import build_optimizer

        optimizer = build_optimizer(model, cfg, announce=False)
    except ImportError:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    try:  # the trainer compiles this module: the same graph finds row (d)'s compiled kernels cached
        from san_fast.train_step import Objective

        objective = Objective(model)
    except ImportError:
        objective = model.losses
    losses = torch.compile(objective) if cfg.compile else objective
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.crop_size, cfg.crop_size), dtype=torch.uint8)
    x = runtime.prepare(images)

    def step():
        with runtime.autocast():
            terms = losses(x)[0]
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    return step, runtime.device


def top_kernels(events, device_type: str, steps: int, limit: int = 15) -> tuple[float, list[dict]]:
    """The profiler's averaged `events` (prof.key_averages()): kernel time per step and the top kernels."""
    if device_type == "cuda":
        kernels = [e for e in events if is_device_work(e)]
    else:
        kernels = list(events)
    kernels.sort(key=lambda e: event_us(e, device_type), reverse=True)
    total = sum(event_us(e, device_type) for e in kernels) / 1e3 / steps
    rows = []
    for e in kernels[:limit]:
        ms = event_us(e, device_type) / 1e3 / steps
        rows.append({"kernel": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": ms,
                     "share": ms / total if total else None})
    return total, rows


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def host_summary(events, steps: int, limit: int = 8) -> dict:
    """What the host does per step: kernel launches, calls that wait for the GPU (cudaMemcpy
    without Async is one), and the host's top operators by their own CPU time. A step whose
    wall time is well above its kernel time is paced by these (`events`: prof.key_averages())."""
    host = [e for e in events if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in host if e.key in LAUNCH_CALLS)
    syncs = sum(e.count for e in host if e.key in SYNC_CALLS)
    host.sort(key=lambda e: event_us(e, "cpu"), reverse=True)
    top = [{"op": e.key[:100], "self_cpu_ms_per_step": event_us(e, "cpu") / 1e3 / steps, "calls_per_step": e.count / steps}
           for e in host[:limit]]
    return {"launches_per_step": launches / steps, "syncs_per_step": syncs / steps, "host_top": top}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    dry_run = args.dry_run or not torch.cuda.is_available()
    report = StageReport(args.json, "profile", args.budget)
    cfg = resolve(TINY if dry_run else PAPER_D, cuda_available=not dry_run)
    step, device = build_step(cfg)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    report.set(warmup_s=round(time.perf_counter() - t0, 1), config={k: str(v) for k, v in (TINY if dry_run else PAPER_D).items()})
    # Without the profiler too: its own host cost inflates the wall time under it.
    clean_ms = step_ms(step, device, max(args.steps, 5))[1]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_ms = step_ms(step, device, args.steps)[1]
    events = prof.key_averages()
    total_ms, rows = top_kernels(events, device.type, args.steps)
    report.set(wall_ms_per_step=wall_ms, kernel_ms_per_step=total_ms, unprofiled_ms_per_step=clean_ms,
               gpu_busy_fraction=total_ms / clean_ms if device.type == "cuda" and clean_ms else None,
               **host_summary(events, args.steps))
    for row in rows:
        report.row(row)
    print(f"[profile] {clean_ms:.2f} ms per step unprofiled ({wall_ms:.2f} under the profiler), "
          f"{total_ms:.2f} ms in kernels", flush=True)
    for row in rows:
        print(f"  {row['ms_per_step']:8.3f} ms  {row['calls_per_step']:5.1f}x  {row['kernel'][:90]}")
    report.finish("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training step end to end, five ways on the same GPU (issue 13, item 2): the paper preset on
the embedded synthetic data (128x128 crops, P=1024, ViT-6, N=27, batch 16), each row one short
`train.py` run whose metrics.json gives images/s after warm-up, peak GPU memory and the fraction
of step time spent waiting for data, while a thread here samples the GPU's busy % (NVML).

    (a) eager fp32: --amp off --no-channels-last --seat-impl torch
    (b) bf16 AMP + channels-last, --seat-impl torch
    (c) (b) with the fused SEAT kernels (--seat-impl triton)
    (d) (c) with --compile --compile-mode default
    (e) (d) with --compile-mode reduce-overhead (CUDA graphs; what --compile alone picks on one GPU)
Target: (d) at least 5x (a), GPU busy at least 90%.

    python -m bench.train_rows --json rows.json --budget 200      # on a GPU
    python -m bench.train_rows --model-only --json floors.json    # the step model's floor per row
`--dry-run` runs rows (a) and (d) with a tiny CPU config (no NVML, no AMP).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.nvml import BusySampler
from bench.runner import StageReport, error_line

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["--preset", "paper", "--dataset", "synthetic", "--num-semantics", "27", "--batch-size", "16",
         "--crop-size", "128", "--epochs", "1", "--synthetic-val-size", "32"]
TINY = ["--crop-size", "32", "--embed-dim", "32", "--vit-dim", "32", "--vit-heads", "2", "--vit-depth", "1",
        "--batch-size", "4", "--synthetic-train-size", "16", "--synthetic-val-size", "8", "--epochs", "1",
        "--device", "cpu", "--num-workers", "0"]
ROWS = {
    "a": ("eager fp32", ["--amp", "off", "--no-channels-last", "--seat-impl", "torch"]),
    "b": ("bf16 + channels-last", ["--amp", "bf16", "--channels-last", "--seat-impl", "torch"]),
    "c": ("(b) + fused SEAT", ["--amp", "bf16", "--channels-last", "--seat-impl", "triton"]),
    # --compile alone picks CUDA graphs on one GPU (--compile-mode auto): (d) names the default
    # mode, so that it measures the compiled step with the host issuing every launch.
    "d": ("(c) + compile", ["--amp", "bf16", "--channels-last", "--seat-impl", "triton", "--compile",
                            "--compile-mode", "default"]),
    # The H200 run of 2026-11-26 found (d) bound by the host (GPU busy 31%): CUDA graphs replay
    # the compiled step's launches without the host issuing each one.
    "e": ("(d) + CUDA graphs", ["--amp", "bf16", "--channels-last", "--seat-impl", "triton", "--compile",
                                "--compile-mode", "reduce-overhead"]),
}
TARGET_SPEEDUP, TARGET_BUSY = 5.0, 90.0
# Shares of the stage's time: the compiled row compiles the whole step first.
WEIGHTS = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 3.0, "e": 3.0}


# The dry run checks the stage's code with rows (a) and (d) only: each train.py start costs
# seconds on a CI machine, and the rows differ only in their flags.
DRY_ROWS = ("a", "d")


def row_flags(row: str, dry_run: bool) -> list[str]:
    """train.py flags of a row. The dry run keeps the row's switches but runs tiny in fp32 on
    the CPU (bf16 in Triton's interpreter gives garbage) and without --compile (a CPU compile of
    the step takes minutes)."""
    flags = list(ROWS[row][1])
    if dry_run:
        flags[flags.index("--amp") + 1] = "off"
        return TINY + [f for f in _without_compile_mode(flags) if f != "--compile"]
    return PAPER + flags


def _without_compile_mode(flags: list[str]) -> list[str]:
    if "--compile-mode" not in flags:
        return flags
    at = flags.index("--compile-mode")
    return flags[:at] + flags[at + 2:]


def read_metrics(path: Path) -> dict:
    """The row's figures from train.py's metrics.json ("train" section); keys absent from an
    older trainer come back as None."""
    try:
        train = json.loads(path.read_text()).get("train", {})
    except (OSError, ValueError):
        return {}
    return {
        "images_per_second_after_warmup": train.get("images_per_second_after_warmup"),
        "images_per_second": train.get("images_per_second"),
        "median_step_ms": train.get("median_step_ms_after_warmup"),
        "peak_gpu_memory_bytes": train.get("peak_gpu_memory_bytes"),
        "data_wait_fraction": train.get("data_wait_fraction"),
        "data_wait_fraction_after_warmup": train.get("data_wait_fraction_after_warmup"),
        "steps": train.get("steps"),
        "attention": train.get("attention"),
        "optimizer": train.get("optimizer"),
        "window_unix_s": train.get("measured_window_unix_s"),
        "cudagraph_skips": train.get("cudagraph_skips"),
    }


def cudagraph_skip_reasons(log_text: str) -> list[str]:
    """The distinct reasons inductor gave for running a compiled graph without CUDA graphs (its
    `cudagraphs` log artifact, on with TORCH_LOGS=cudagraphs), in order of first appearance."""
    reasons: list[str] = []
    for line in log_text.splitlines():
        at = line.find("skipping cudagraphs due to ")
        if at >= 0:
            reason = line[at + len("skipping cudagraphs due to "):].strip()
            if reason and reason not in reasons:
                reasons.append(reason)
    return reasons


def run_row(row: str, flags: list[str], out: Path, limit_s: float, env: dict) -> dict:
    """One train.py subprocess under a busy-% sampler; the subprocess is stopped at `limit_s`."""
    argv = [sys.executable, str(ROOT / "train.py"), *flags, "--no-baseline", "--out", str(out)]
    log = out.parent / f"{out.name}.log"
    graphs = "reduce-overhead" in flags
    if graphs:  # why a graph ran without CUDA graphs, if one did (cudagraph_skip_reasons)
        env = dict(env, TORCH_LOGS=",".join(filter(None, [env.get("TORCH_LOGS"), "cudagraphs"])))
    t0 = time.time()
    with BusySampler() as sampler, open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    metrics = read_metrics(out / "metrics.json")
    window = metrics.pop("window_unix_s", None)
    busy = sampler.mean(tuple(window) if window else None)
    result = {"row": row, "name": ROWS[row][0], "flags": flags, "rc": rc, "wall_s": round(time.time() - t0, 1),
              **metrics, "gpu_busy_percent": busy,
              "busy_window": "training steps (metrics.json)" if window else "whole run (start-up included)"}
    if sampler.error:
        result["gpu_busy_note"] = sampler.error
    if graphs and log.exists():
        result["cudagraph_skip_reasons"] = cudagraph_skip_reasons(log.read_text(errors="replace"))
    ips = metrics.get("images_per_second_after_warmup") or metrics.get("images_per_second")
    result["step_ms"] = None if not ips else 1e3 * _batch(flags) / ips
    result["status"] = "ok" if rc == 0 and ips else ("timeout" if rc is None else f"failed (exit {rc})")
    if result["status"] != "ok":
        result["log_tail"] = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    return result


def _batch(flags: list[str]) -> int:
    return int(flags[flags.index("--batch-size") + 1])


def target_line(rows: dict[str, dict]) -> dict:
    """(d)'s speed-up over (a) and GPU busy %, against the targets."""
    a, d = rows.get("a", {}), rows.get("d", {})
    speed = None
    if a.get("step_ms") and d.get("step_ms"):
        speed = a["step_ms"] / d["step_ms"]
    busy = d.get("gpu_busy_percent")
    e = rows.get("e", {})
    speed_e = a["step_ms"] / e["step_ms"] if a.get("step_ms") and e.get("step_ms") else None
    return {"speedup_d_over_a": speed, "target_speedup": TARGET_SPEEDUP,
            "speedup_met": None if speed is None else speed >= TARGET_SPEEDUP,
            "busy_d_percent": busy, "target_busy_percent": TARGET_BUSY,
            "busy_met": None if busy is None else busy >= TARGET_BUSY,
            "speedup_e_over_a": speed_e, "busy_e_percent": e.get("gpu_busy_percent")}


def measure(report: StageReport, dry_run: bool, steps: int, workers: int, out_dir: Path,
            only: Optional[list[str]] = None) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows: dict[str, dict] = {}
    names = [r for r in (DRY_ROWS if dry_run else ROWS) if not only or r in only]
    if dry_run:
        report.note(f"dry run: rows {', '.join(DRY_ROWS)} only, tiny, fp32, (d) without --compile")
    report.set(loader=measure_loader(dry_run, workers))
    for i, row in enumerate(names):
        share = report.deadline.left() * WEIGHTS[row] / sum(WEIGHTS[r] for r in names[i:])
        if share < 20:
            report.row({"row": row, "name": ROWS[row][0], "status": "skipped (time)"})
            continue
        flags = row_flags(row, dry_run) + ["--max-steps", str(steps), "--logger", "none"]
        if not dry_run:
            flags += ["--num-workers", str(workers)]
        rows[row] = report.row(run_row(row, flags, out_dir / f"row_{row}", share - 5, env))
        r = rows[row]
        print(f"[train] ({row}) {r['name']}: {r['status']}, step {r['step_ms'] or float('nan'):.1f} ms, "
              f"busy {r['gpu_busy_percent'] if r['gpu_busy_percent'] is not None else '-'}%", flush=True)
    report.set(target=target_line(rows))


def measure_loader(dry_run: bool, workers: int) -> dict:
    """The rows' training loader alone (same data, crops and workers): the fastest step it feeds."""
    from bench.loader_rate import loader_rate

    flags = TINY if dry_run else PAPER + ["--num-workers", str(workers)]
    try:
        rate = loader_rate(flags)
    except Exception as exc:  # the rows still run; the table says why this line is missing
        return {"error": error_line(exc)}
    print(f"[train] loader alone: {rate['images_per_second']:.0f} images/s with {rate['num_workers']} workers, "
          f"no step faster than {rate['fastest_step_ms']:.1f} ms", flush=True)
    return rate


def model_floors(report: StageReport, dry_run: bool, copy_gbps: Optional[float]) -> None:
    """The step model's floor for each row's configuration, on the table's H100 and on this GPU's
    table entry with the measured copy bandwidth when given."""
    from bench.step_model import model_step

    gpus = ["H100"]
    # The model has no term for --compile-mode (CUDA graphs change the host's work, not the
    # kernels'): rows that differ only there share one trace.
    traced: dict = {}
    for row in (DRY_ROWS if dry_run else ROWS):
        flags = _without_compile_mode([f for f in row_flags(row, dry_run) if f not in ("--device", "cpu")])
        try:
            key = tuple(flags)
            if key not in traced:
                traced[key] = model_step(flags, gpus, copy_gbps=copy_gbps)
            table = traced[key]["gpus"]["H100"]
            report.row({"row": row, "name": ROWS[row][0], "floor_ms": table.get("total_ms"),
                        "gpu": table.get("gpu"), "copy_gbps": copy_gbps, "error": table.get("error")})
        except Exception as exc:  # a row the model cannot trace is reported, not fatal
            report.row({"row": row, "name": ROWS[row][0], "floor_ms": None, "error": f"{type(exc).__name__}: {exc}"})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="--max-steps of each row (default 40 on a GPU, 2 dry)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="folder for the rows' run folders (default: a temporary one)")
    p.add_argument("--rows", default=None, help="comma-separated rows to run (default all: a,b,c,d,e)")
    p.add_argument("--model-only", action="store_true", help="the step model's floor per row, no training")
    p.add_argument("--copy-gbps", type=float, default=None, help="measured copy bandwidth for the model")
    args = p.parse_args(argv)
    dry_run = args.dry_run or not torch.cuda.is_available()
    report = StageReport(args.json, "step_model" if args.model_only else "train", args.budget)
    if args.model_only:
        model_floors(report, dry_run, args.copy_gbps)
        report.finish("ok")
        return 0
    if dry_run and not args.dry_run:
        report.note("no CUDA device: the rows run as the dry run (tiny config on the CPU)")
    steps = args.steps or (2 if dry_run else 40)
    with tempfile.TemporaryDirectory(prefix="san_rows_") as tmp:
        run_dir = Path(args.out) if args.out else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        measure(report, dry_run, steps, args.num_workers, run_dir, args.rows.split(",") if args.rows else None)
    bad = [r for r in report.data["rows"] if r.get("status") not in ("ok",)]
    report.finish("ok" if not bad else "partial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one-call GPU check: every number the project needs from a GPU, collected by one command
that fits the lent machine's 10-minute command limit (whole run within 8 minutes).

    bash bench/gpu_check.sh [DIR]                 # the image's own python3; carried wheels installed
    python3 -m bench.gpu_check [DIR] [--budget S] [--only a,b] [--skip a,b] [--cache PATH] [--dry-run]

Stages, in order, each a script of its own run under bench/runner.py's budget (a stage gets what
it wants unless that would starve the later stages' minimum; below its own minimum it is
skipped; the results say which stages shrank or were skipped):
  environment  GPU, driver, clocks (NVML), torch/triton/CUDA versions, date, git commit
  tests        pytest -m gpu                                      (bench/stage_tests.py)
  seat         SEAT benchmarks: paper shape first, sweeps as time allows (bench/seat_measure.py)
  train        the four training-step rows                         (bench/train_rows.py)
  step_model   the step model's floor beside each row              (bench/train_rows.py --model-only)
  xformers     xformers vs SDPA in the ViT                          (bench/attn_check.py)
  profile      top kernels of compiled training steps               (bench/profile_step.py)

Triton and Inductor compiles are cached in DIR/cache (or --cache), so a rerun on the same
machine skips them. DIR (default bench/results/<gpu>-<date>) receives results.json (everything,
with the environment), results.md (the tables) and gpu_check.log (every stage's output). Exit
status: 0; 1 when a GPU test failed (or the test stage crashed); 3 when the tests did not
complete (stopped at their limit or skipped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.nvml import gpu_info
from bench.results_table import markdown
from bench.runner import Runner, Stage, python, read_report
from san_fast.io_utils import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0  # 8 minutes of stages: the whole call, wheel install included, within 9
# (want, minimum) seconds per stage on a GPU; the dry run's stages are small and get the same.
STAGE_TIMES = {"tests": (105, 40), "seat": (80, 25), "train": (240, 60), "step_model": (20, 10),
               "xformers": (30, 15), "profile": (40, 25)}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "xformers", "nvidia-cuda-runtime-cu12", "pytest", "nvidia-ml-py"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    import torch

    out["torch_cuda"] = torch.version.cuda
    return out


def git_commit() -> dict:
    """The commit and whether the tree differs from it. SAN_GIT_COMMIT, when set, wins: the lent
    machine gets the working tree without this checkout's .git, and a .git found there can be an
    older one (the H100 run of 2026-11-26 reported its base commit, not the tree's)."""
    given = os.environ.get("SAN_GIT_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "note": "commit from SAN_GIT_COMMIT"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None, "note": "no git repository here and no SAN_GIT_COMMIT"}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "cpu"


def stages(dry_run: bool) -> list[Stage]:
    py = python()
    dry = ["--dry-run"] if dry_run else []
    argv = {
        "tests": [py, "-m", "bench.stage_tests"] + dry,
        "seat": [py, "-m", "bench.seat_measure"] + dry,
        "train": [py, "-m", "bench.train_rows"] + dry,
        "step_model": [py, "-m", "bench.train_rows", "--model-only"] + dry,
        "xformers": [py, "-m", "bench.attn_check"] + dry,
        "profile": [py, "-m", "bench.profile_step"] + dry,
    }
    return [Stage(name, argv[name], *STAGE_TIMES[name]) for name in argv]


def stage_env(cache: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(cache / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if not _cuda_visible():
        env.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter on the CPU
    return env


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def exit_code(outcomes: dict) -> int:
    tests = outcomes.get("tests")
    if tests is None:
        return 0
    if tests["status"] in ("failed", "crashed"):
        return 1
    if tests["status"] in ("timeout", "skipped"):
        return 3
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=None, help="results folder (default bench/results/<gpu>-<date>)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages")
    p.add_argument("--cache", default=None, help="Triton/Inductor compile cache (default DIR/cache)")
    p.add_argument("--only", default=None, help="comma-separated stages to run")
    p.add_argument("--skip", default=None, help="comma-separated stages to leave out")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks every stage's code")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    gpu = gpu_info()
    today = dt.datetime.now(dt.timezone.utc)
    out = Path(args.dir) if args.dir else ROOT / "bench" / "results" / f"{slug(gpu.get('name', 'cpu'))}-{today:%Y-%m-%d}"
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "cache"
    if not args.cache:
        atomic_write_text(out / ".gitignore", "cache/\n")  # compiled kernels stay out of the commit
    selected = [s for s in stages(args.dry_run)
                if (not args.only or s.name in args.only.split(",")) and s.name not in (args.skip or "").split(",")]
    results = {"gpu": gpu.get("name"), "driver": gpu.get("driver"), "versions": versions(),
               "date": today.isoformat(timespec="seconds"), "git": git_commit(), "dry_run": args.dry_run,
               "budget_s": args.budget, "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "gpu_info": gpu, "stages": {}}
    print(f"gpu_check: {results['gpu'] or 'no GPU'} | torch {results['versions']['torch']} "
          f"(CUDA {results['versions']['torch_cuda']}), triton {results['versions']['triton']} | "
          f"budget {args.budget:.0f} s | results in {out}", flush=True)
    (out / "gpu_check.log").write_text(f"gpu_check {results['date']}\n")
    runner = Runner(args.budget, out, out / "gpu_check.log", stage_env(cache), ROOT)

    def before(stage: Stage) -> None:
        if stage.name == "step_model":  # the model uses the copy bandwidth the seat stage measured
            copy = read_report(out / "seat.json").get("copy_gbps")
            if copy and not args.dry_run:
                stage.argv += ["--copy-gbps", f"{copy:.0f}"]

    def after(name: str, outcome: dict) -> None:
        results["stages"][name] = outcome
        atomic_write_json(out / "results.json", results)

    runner.run(selected, before, after)
    for stage in selected:  # the stages' own reports are inside results.json now
        (out / f"{stage.name}.json").unlink(missing_ok=True)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["exit_code"] = exit_code(results["stages"])
    atomic_write_json(out / "results.json", results)
    table = markdown(results)
    atomic_write_text(out / "results.md", table)
    print(table)
    print(f"gpu_check: exit {results['exit_code']} after {results['wall_s']:.0f} s; results in {out}", flush=True)
    return results["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

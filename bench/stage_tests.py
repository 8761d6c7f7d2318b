"""The GPU tests as a stage of the GPU check: `pytest -m gpu` (every CUDA-only test: bf16, inductor,
every autotune config, the paper-shape checks), in parallel workers when pytest-xdist is there
(most of the time goes to Triton compiles on the CPU), with per-test outcomes parsed from the
verbose output as it comes, so a run stopped at its limit still says what passed and failed.

    python -m bench.stage_tests --json tests.json --budget 180 [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.runner import StageReport

ROOT = Path(__file__).resolve().parents[1]
OUTCOME = re.compile(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
NODEID = re.compile(r"(tests/\S+::\S+)")
SUMMARY = re.compile(r"^(FAILED|ERROR) (tests/\S+)(?: - (.*))?$")


def pytest_argv(dry_run: bool, workers: int) -> list[str]:
    # A test file that fails to import must not stop the others: one GPU call has to see them all.
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
            "--benchmark-disable", "--color=no", "--continue-on-collection-errors"]
    if importlib.util.find_spec("xdist") is not None and workers > 1:
        argv += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        argv += ["--timeout", "300"]  # one hung test must not eat the whole stage
    # The dry run checks the stage on one small file (its GPU tests skip on the CPU).
    return argv + (["tests/test_attention.py"] if dry_run else ["tests/"])


def parse(lines: list[str]) -> tuple[dict, list[dict]]:
    """Counts per outcome and the failed tests (node id, first line of the reason)."""
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for line in lines:
        summary = SUMMARY.match(line.strip())
        if summary:
            failures[summary.group(2)] = (summary.group(3) or "")[:300]
            continue
        node, outcome = NODEID.search(line), OUTCOME.search(line)
        if node and outcome and "::" in node.group(1):
            counts[outcome.group(1)] = counts.get(outcome.group(1), 0) + 1
            if outcome.group(1) in ("FAILED", "ERROR"):
                failures.setdefault(node.group(1), "")
    return counts, [{"test": k, "reason": v} for k, v in failures.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    args = p.parse_args(argv)
    report = StageReport(args.json, "tests", args.budget)
    cmd = pytest_argv(args.dry_run, args.workers)
    report.set(command=" ".join(cmd[1:]))
    lines: list[str] = []
    limit = None if args.budget is None else max(5.0, args.budget - 5)
    # Wide lines: pytest cuts each failure's reason in the summary to the terminal's width.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, COLUMNS="300"))
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=limit)
        lines = out.splitlines()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        lines = (out or "").splitlines()
        timed_out = True
    # All of it, tracebacks included, goes to the GPU check's log: a failure on a lent GPU must be
    # fixable without a second call to see why it failed.
    sys.stdout.write("\n".join(lines) + "\n")
    counts, failures = parse(lines)
    report.set(counts=counts, failures=failures, exit_code=proc.returncode, tail=lines[-15:])
    if timed_out:
        report.note(f"stopped after {limit:.0f} s: the counts cover the tests that finished")
    failed = counts.get("FAILED", 0) + counts.get("ERROR", 0) or (0 if proc.returncode in (0, 5) or timed_out else 1)
    # Exit 5 is pytest's "no tests collected": no test carries the gpu mark.
    if proc.returncode == 5:
        report.note("no test is marked gpu")
    report.finish("failed" if failed else ("timeout" if timed_out else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

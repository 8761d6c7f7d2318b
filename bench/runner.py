"""Time budgets for the GPU check, in one place: the runner that gives each stage its share,
runs it as a subprocess with that limit, and the report each stage writes as it goes.

A stage is a script (`python -m bench.<stage> --json PATH --budget SECONDS [--dry-run]`) that
can also be run on its own. It writes its report after every row, so a stage stopped at its
limit still leaves what it measured. Each stage runs in its own process: a CUDA error that
poisons one process's context cannot take the later stages down with it.

Budget rule: a stage gets min(what it wants, time left - the minimum of every later stage that
can still fit); below its own minimum it is skipped, and the results say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from san_fast.io_utils import atomic_write_json

# Seconds a stage may run past its budget to write its report before it is killed.
GRACE_S = 15.0


def error_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line for a report row: its type and its message's first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:limit]}"


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


class StageReport:
    """A stage's results file: status, rows, notes; rewritten atomically after every change."""

    def __init__(self, path: Optional[str], stage: str, budget_s: Optional[float] = None):
        self.path = Path(path) if path else None
        self.data = {"stage": stage, "status": "running", "budget_s": budget_s, "rows": [], "notes": []}
        self.deadline = Deadline(budget_s if budget_s is not None else float("inf"))
        self.save()

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data)

    def row(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        print(f"[{self.data['stage']}] {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def set(self, **values) -> None:
        self.data.update(values)
        self.save()

    def finish(self, status: str = "ok") -> dict:
        self.data["status"] = status
        self.save()
        return self.data


@dataclass
class Stage:
    name: str
    argv: list[str]  # the command; --json PATH --budget S are appended
    want_s: float
    min_s: float
    notes: list[str] = field(default_factory=list)


def plan(stage: Stage, left_s: float, later: list[Stage]) -> float:
    """Seconds for `stage` now: its wish, or what is left once this stage's grace period (to
    write its report when stopped) and the later stages' minimums (with their grace) are set
    aside; a later stage whose minimum cannot fit anyway reserves nothing."""
    reserve = 0.0
    for s in later:
        if left_s - GRACE_S - stage.min_s - reserve - (s.min_s + GRACE_S) >= 0:
            reserve += s.min_s + GRACE_S
    return min(stage.want_s, left_s - GRACE_S - reserve)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_command(argv: list[str], limit_s: float, log, env: dict, cwd: Path) -> tuple[Optional[int], float]:
    """Run `argv` in its own process group with its output appended to `log`; kill the whole
    group (DataLoader workers, compile workers) past `limit_s`. Returns (exit code or None
    when killed, wall seconds)."""
    t0 = time.monotonic()
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        rc: Optional[int] = proc.wait(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        rc = None
    _kill_group(proc)  # leftovers of a finished stage (stray workers) go too
    return rc, time.monotonic() - t0


def read_report(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class Runner:
    """Runs stages in order within `total_s` seconds; records each stage's outcome."""

    def __init__(self, total_s: float, workdir: Path, log_path: Path, env: dict, cwd: Path):
        self.deadline = Deadline(total_s)
        self.workdir, self.log_path, self.env, self.cwd = workdir, log_path, env, cwd
        self.outcomes: dict[str, dict] = {}

    def run(self, stages: list[Stage], before=None, after=None) -> dict[str, dict]:
        """Run `stages` in order; `before(stage)` may adjust a stage's command from earlier
        results, `after(name, outcome)` sees each outcome as it comes."""
        with open(self.log_path, "a") as log:
            for i, stage in enumerate(stages):
                if before is not None:
                    before(stage)
                self.outcomes[stage.name] = self._run_one(stage, stages[i + 1:], log)
                if after is not None:
                    after(stage.name, self.outcomes[stage.name])
        return self.outcomes

    def _run_one(self, stage: Stage, later: list[Stage], log) -> dict:
        budget = plan(stage, self.deadline.left(), later)
        outcome = {"status": "skipped", "want_s": stage.want_s, "allotted_s": round(max(budget, 0), 1),
                   "notes": list(stage.notes)}
        if budget < stage.min_s:
            outcome["notes"].append(f"skipped: {budget:.0f} s left for it, needs at least {stage.min_s:.0f} s")
            print(f"== {stage.name}: skipped (time)", flush=True)
            return outcome
        if budget < stage.want_s:
            outcome["notes"].append(f"shrunk: {budget:.0f} s of the {stage.want_s:.0f} s it wants")
        report_path = self.workdir / f"{stage.name}.json"
        report_path.unlink(missing_ok=True)
        argv = stage.argv + ["--json", str(report_path), "--budget", f"{budget:.0f}"]
        print(f"== {stage.name}: up to {budget:.0f} s", flush=True)
        start = log.tell()
        rc, wall = run_command(argv, budget + GRACE_S, log, self.env, self.cwd)
        report = read_report(report_path)
        status = report.get("status", "crashed")
        if rc is None:
            status = "timeout"
            outcome["notes"].append(f"stopped at its limit ({budget + GRACE_S:.0f} s); rows so far kept")
        elif rc != 0 and status in ("ok", "running"):
            status = "crashed"
        if status == "crashed":  # the stage's last words (a missing package, a traceback's end)
            log.flush()
            with open(self.log_path, errors="replace") as f:
                f.seek(start)
                tail = [line for line in f.read().splitlines() if line.strip()][-3:]
            outcome["notes"].append("crashed: " + " | ".join(tail))
        outcome.update(status=status, rc=rc, wall_s=round(wall, 1), report=report)
        print(f"== {stage.name}: {status} in {wall:.0f} s", flush=True)
        return outcome


def python() -> str:
    """The interpreter the runner itself runs on: the stages use the same one."""
    return sys.executable

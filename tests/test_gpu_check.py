"""The one-call GPU check: its budget rules, its parsing, and a CPU dry run of the whole runner
(tiny shapes, Triton's interpreter) in which every stage runs."""

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_check, results_table, runner, stage_tests

ROOT = Path(__file__).resolve().parents[1]

FAKE_STAGE = """
import json, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
seconds = float(args["--sleep"])
json.dump({"status": "running", "rows": []}, open(args["--json"], "w"))
time.sleep(seconds)
json.dump({"status": "ok", "rows": [{"slept": seconds, "budget": float(args["--budget"])}]}, open(args["--json"], "w"))
"""


def fake_stage(tmp_path, name, sleep, want, minimum):
    script = tmp_path / "stage.py"
    script.write_text(FAKE_STAGE)
    return runner.Stage(name, [sys.executable, str(script), "--sleep", str(sleep)], want, minimum)


def test_budget_shrinks_skips_and_stops_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 1.0)
    stages = [fake_stage(tmp_path, "first", 0.1, 4, 1), fake_stage(tmp_path, "sleeper", 30, 3, 1),
              fake_stage(tmp_path, "last", 0.1, 50, 2), fake_stage(tmp_path, "starved", 0.1, 50, 40)]
    with open(tmp_path / "log", "w"):
        pass
    out = runner.Runner(12, tmp_path, tmp_path / "log", {}, tmp_path).run(stages)
    assert out["first"]["status"] == "ok" and out["first"]["report"]["rows"][0]["budget"] == 4
    # The sleeper outlives its 3 s (+ grace) and is stopped; what it wrote so far is kept.
    assert out["sleeper"]["status"] == "timeout" and out["sleeper"]["wall_s"] < 10
    assert out["last"]["status"] == "ok" and any("shrunk" in n for n in out["last"]["notes"])
    assert out["starved"]["status"] == "skipped" and "needs at least 40 s" in out["starved"]["notes"][0]
    assert "$ " in (tmp_path / "log").read_text()


def test_stage_tests_parses_plain_and_xdist_output():
    lines = [
        "tests/test_seat_op.py::test_forward[bf16-27] PASSED                    [  3%]",
        "[gw1] [ 50%] FAILED tests/test_seat_op.py::test_backward[bf16-256] ",
        "[gw0] [ 60%] SKIPPED tests/test_model.py::test_compile ",
        "tests/test_attention.py::test_real_xformers_matches_sdpa_on_cuda[dtype0] SKIPPED (no xformers)",
        "FAILED tests/test_seat_op.py::test_backward[bf16-256] - AssertionError: rel err 0.3 > 0.02",
    ]
    counts, failures = stage_tests.parse(lines)
    assert counts == {"PASSED": 1, "FAILED": 1, "SKIPPED": 2}
    assert failures == [{"test": "tests/test_seat_op.py::test_backward[bf16-256]",
                         "reason": "AssertionError: rel err 0.3 > 0.02"}]


def test_exit_code_follows_the_tests():
    assert gpu_check.exit_code({"tests": {"status": "ok"}, "seat": {"status": "errors"}}) == 0
    assert gpu_check.exit_code({"tests": {"status": "failed"}}) == 1
    assert gpu_check.exit_code({"tests": {"status": "timeout"}}) == 3
    assert gpu_check.exit_code({}) == 0


def test_results_table_tolerates_missing_stages():
    text = results_table.markdown({"gpu": "NVIDIA H100 80GB HBM3", "stages": {"tests": {"status": "skipped",
                                                                                         "notes": ["skipped: time"]}}})
    assert "# GPU check, NVIDIA H100" in text and "| tests | skipped |" in text


def test_a_given_commit_wins_over_a_git_found_there(monkeypatch):
    monkeypatch.setenv("SAN_GIT_COMMIT", "abc123")
    assert gpu_check.git_commit()["commit"] == "abc123"
    monkeypatch.delenv("SAN_GIT_COMMIT")
    assert gpu_check.git_commit()["commit"] not in ("abc123", "unknown")  # this checkout's own


def test_results_table_says_why_cuda_graphs_were_skipped():
    rows = [{"row": "d", "name": "(c) + compile", "step_ms": 40.0, "status": "ok"},
            {"row": "e", "name": "(d) + CUDA graphs", "step_ms": 30.0, "status": "ok", "cudagraph_skips": 2,
             "cudagraph_skip_reasons": ["mutated inputs (1 instances)"]}]
    text = results_table.markdown({"gpu": "NVIDIA H100 80GB HBM3",
                                   "stages": {"train": {"status": "ok", "report": {"rows": rows}}}})
    assert "(e) ran 2 compiled graph(s) without CUDA graphs: mutated inputs (1 instances)" in text
    assert "(d) ran" not in text


def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", str(out), "--dry-run", "--budget", "400"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["tests", "seat", "train", "step_model", "xformers", "profile"]
    assert {name: s["status"] for name, s in stages.items()} == {name: "ok" for name in stages}
    assert results["date"] and results["git"]["commit"] and results["versions"]["torch"]
    seat_rows = stages["seat"]["report"]["rows"]
    assert {(r["variant"], r["mode"]) for r in seat_rows} >= {("triton", "loss"), ("eager", "fwdbwd")}
    assert all(r["ms"] > 0 and r["floor_bytes"] > 0 for r in seat_rows)
    assert all(r["modeled_bytes"] >= r["floor_bytes"] for r in seat_rows if r["variant"] == "triton")
    train = {r["row"]: r for r in stages["train"]["report"]["rows"]}
    assert set(train) == {"a", "d"} and all(r["step_ms"] > 0 for r in train.values())
    assert stages["train"]["report"]["target"]["speedup_d_over_a"] > 0
    assert all(r["floor_ms"] > 0 for r in stages["step_model"]["report"]["rows"])
    assert stages["xformers"]["report"]["rows"][0]["ok"]
    assert stages["profile"]["report"]["rows"]
    table = (out / "results.md").read_text()
    for heading in ("## Stages", "## SEAT op", "## Training step", "## xformers", "## Profile"):
        assert heading in table
    assert (out / ".gitignore").read_text() == "cache/\n" and (out / "gpu_check.log").stat().st_size > 0
    assert not list(out.glob("seat.json"))  # the stage reports live inside results.json

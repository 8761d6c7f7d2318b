"""The SEAT kernels compile for sm70 (fp16, fp32), sm80 (bf16, fp32) and sm90 (bf16; fp64, the
gradcheck path) without a GPU, and the bf16 configs the launchers can pick do not spill up to
N = 64 (issue 8): at N = 64 the backward runs split where the whole kernel spilled.

Runs `python -m san_fast.kernels.compile_report` in a subprocess: the kernels in this pytest
process are interpreted (TRITON_INTERPRET=1, set by conftest.py) and cannot be compiled.
The spill check compiles every config of the N <= 64 buckets for sm90 and sm80 (about a minute
from a cold Triton cache on two cores); the other dtypes one config per kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from san_fast.gpu_specs import GPUS
from san_fast.kernels import compile_report, seat_plan

pytest.importorskip("triton")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "san_fast.kernels.compile_report", "--quiet", "--jobs", "2", "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _check_rows(rows, kinds=compile_report.KINDS):
    assert {r["kind"] for r in rows} == set(kinds)
    for row in rows:
        assert row["ok"], row
        assert row["fits"], row
        # ptxas ran and reported on the real cubin: registers within the hardware's 255.
        assert row["registers"] is not None and 0 < row["registers"] <= 255, row
        assert row["spill_bytes"] is not None and row["spill_bytes"] >= 0, row
        assert row["shared_bytes"] >= 0, row


@pytest.mark.parametrize("arch,dtypes", [("70", ["fp16", "fp32"]), ("80", ["fp32"]), ("90", ["fp64"])])
def test_every_kernel_compiles_for_arch(tmp_path, arch, dtypes):
    proc, report = _run(tmp_path, "--arch", arch, "--dtype", *dtypes, "--n", "27", "--first-config-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _check_rows(report["rows"])
    assert {r["dtype"] for r in report["rows"]} == set(dtypes)


def test_chosen_bf16_configs_do_not_spill_up_to_n64(tmp_path):
    """Every config a launcher can pick at N <= 64 compiles for sm80 and sm90 bf16 without
    register spills (issue 8), on triton 3.9 and, in CI's triton-3.6 run, 3.6. The fused
    design's kernel at N = 64 spills on sm80 at every tile tried, so the launcher never runs it there
    (seat_plan.FUSED_LOSS_MAX_BLOCK_N): those rows are compiled and reported but marked not
    chosen. The relay design's rows (loss_relay*) are chosen at every N."""
    proc, report = _run(tmp_path, "--arch", "90", "80", "--dtype", "bf16", "--n", "27", "64")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = report["rows"]
    _check_rows(rows)
    assert {(r["arch"], r["n"]) for r in rows} == {(90, 27), (90, 64), (80, 27), (80, 64)}
    chosen = [r for r in rows if r["chosen"]]
    assert {r["kind"] for r in chosen} == set(compile_report.KINDS)
    assert {(r["kind"], r["n"]) for r in rows if not r["chosen"]} == {("loss_image", 64), ("loss_rec_q", 64)}
    for r in chosen:
        assert r["spill_bytes"] == 0, r
    # At N = 64 the backward runs split (seat_plan.SPLIT_BACKWARD_BLOCK_N): its passes are compiled,
    # the sums pass with its own configs (seat_plan.SUMS_PASS_TUNE).
    for arch in (80, 90):
        grad = {n: [r["config"] for r in chosen if (r["kind"], r["kernel"], r["arch"], r["n"])
                    == ("backward", "seat_grad_kernel", arch, n)] for n in (27, 64)}
        assert grad[27] and not any("pass=" in c for c in grad[27])
        assert {c.split("pass=")[-1] for c in grad[64]} == {"sums", "dq"}
        assert all("w=8" in c for c in grad[64] if c.endswith("pass=sums"))
    assert "not chosen: the launcher never runs the fused design" in proc.stdout
    # The premise of traffic.py's L1 rule, which the relay at N = 64 rests on: its one-stage
    # config issues no asynchronous copies (its loads are plain, L1-cached ld.global), while
    # the pipelined configs do.
    relay = {(r["arch"], r["n"]): r for r in rows
             if r["kind"] == "loss_relay" and r["kernel"] == "seat_grad_kernel"}
    for arch in (80, 90):
        assert relay[(arch, 64)]["config"].endswith("s=1") and relay[(arch, 64)]["async_copies"] == 0
        assert relay[(arch, 27)]["async_copies"] > 0, relay[(arch, 27)]


def test_the_launcher_never_picks_an_unchosen_fused_loss():
    """The rows marked not chosen are the fused design where loss_design never picks it; at
    N <= 32 it still picks fused where the traffic model says so (small P), elsewhere relay or
    two_pass."""
    shapes = ((1, 1024, 64), (16, 4096, 128), (16, 4096, 256), (16, 16384, 1024))
    for n in (6, 27, 32, 33, 64, 256):
        designs = {seat_plan.loss_design(b, m, p, n, 3, torch.bfloat16, GPUS["H100"]) for b, m, p in shapes}
        assert ("fused" in designs) == (n in (6, 27)) and designs <= {"fused", "relay", "two_pass"}, (n, designs)
        assert compile_report._chosen("loss_image", n) == (n <= 32)
        assert compile_report._chosen("loss_relay", n)
        assert compile_report._chosen("backward", n)


def test_bf16_is_not_compiled_for_sm70(tmp_path):
    proc, report = _run(tmp_path, "--arch", "70", "--dtype", "bf16", "--n", "27", "--kind", "forward")
    assert proc.returncode == 0, proc.stderr
    assert report["rows"] == []


def test_candidate_configs_replace_the_autotune_list(tmp_path):
    proc, report = _run(
        tmp_path, "--arch", "80", "--dtype", "fp16", "--n", "5", "--kind", "forward", "--try", "M=32,P=16,w=4,s=1",
        "M=64,P=32,w=4,s=2",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["config"] for r in report["rows"]] == ["M=32,P=16,w=4,s=1", "M=64,P=32,w=4,s=2"]


def test_candidates_can_change_the_plans_tiles(tmp_path):
    """For the gradient kernel a candidate may set the plan's BLOCK_M and BLOCK_P2 too."""
    proc, report = _run(tmp_path, "--arch", "90", "--dtype", "bf16", "--n", "27", "--kind", "backward",
                        "--try", "M=32,P2=64,PD=32,w=4,s=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grad = [r for r in report["rows"] if r["kernel"] == "seat_grad_kernel"]
    assert [r["config"] for r in grad] == ["M=32,P=16,P2=64,PD=32,w=4,s=2"]


def test_a_register_cap_reaches_ptxas(tmp_path):
    """r=R compiles the candidate with triton's maxnreg: ptxas keeps to R registers (spilling
    what does not fit), and the row's label says so."""
    proc, report = _run(tmp_path, "--arch", "90", "--dtype", "bf16", "--n", "27", "--kind", "backward",
                        "--try", "M=64,P2=64,PD=64,w=4,s=2", "M=64,P2=64,PD=64,w=4,s=2,r=128")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    free, capped = [r for r in report["rows"] if r["kernel"] == "seat_grad_kernel"]
    assert capped["config"].endswith(",r=128") and not free["config"].endswith(",r=128")
    assert free["registers"] > 128 and capped["registers"] <= 128, (free, capped)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "60"], "need sm70"),
        (["--n", "300"], "N must be in [2, 256]"),
        (["--try", "64,32,8"], "expected KEY=VALUE pairs"),
        (["--try", "M=64,P=32"], "give the warps and stages too"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, args, message):
    proc, _ = _run(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "san_fast.kernels.compile_report"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2
    assert "TRITON_INTERPRET=1" in proc.stderr


def test_summary_fails_a_bucket_without_a_fitting_config():
    rows = [
        compile_report.Row("forward", "k", "fp16", 70, 27, "a", ok=True, registers=100, spill_bytes=0,
                           shared_bytes=200_000, fits=False),
        compile_report.Row("forward", "k", "fp16", 70, 27, "b", ok=False, error="boom"),
        compile_report.Row("labels", "k", "fp16", 70, 27, "c", ok=True, registers=90, spill_bytes=8,
                           shared_bytes=1000, fits=True),
    ]
    lines, good = compile_report.summarise(rows)
    assert not good
    assert "FAIL" in lines[0] and "compiled 1/2" in lines[0]
    assert "  ok  " in lines[1] and "spill-free 0" in lines[1]

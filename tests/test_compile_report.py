"""The SEAT kernels compile for sm70 (fp16), sm80 and sm90 (bf16; fp64, the gradcheck path) without a GPU.

Runs `python -m san_fast.kernels.compile_report` in a subprocess: the kernels in this pytest
process are interpreted (TRITON_INTERPRET=1, set by conftest.py) and cannot be compiled.
One config per kernel and N bucket keeps it to about half a minute; the full lists are
checked by running the module by hand (see kernels/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from san_fast.kernels import compile_report

pytest.importorskip("triton")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "san_fast.kernels.compile_report", "--quiet", "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize(
    "arch,dtypes",
    [("70", ["fp16", "fp32"]), ("80", ["bf16", "fp32"]), ("90", ["bf16", "fp64"])],
)
def test_every_kernel_compiles_for_arch(tmp_path, arch, dtypes):
    proc, report = _run(tmp_path, "--arch", arch, "--dtype", *dtypes, "--n", "27", "--first-config-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = report["rows"]
    assert {r["kind"] for r in rows} == set(compile_report.KINDS)
    assert {r["dtype"] for r in rows} == set(dtypes)
    for row in rows:
        assert row["ok"], row
        assert row["fits"], row
        # ptxas ran and reported on the real cubin: registers within the hardware's 255.
        assert row["registers"] is not None and 0 < row["registers"] <= 255, row
        assert row["spill_bytes"] is not None and row["spill_bytes"] >= 0, row
        assert row["shared_bytes"] > 0, row


def test_bf16_is_not_compiled_for_sm70(tmp_path):
    proc, report = _run(tmp_path, "--arch", "70", "--dtype", "bf16", "--n", "27", "--kind", "forward")
    assert proc.returncode == 0, proc.stderr
    assert report["rows"] == []


def test_candidate_configs_replace_the_autotune_list(tmp_path):
    proc, report = _run(
        tmp_path, "--arch", "80", "--dtype", "fp16", "--n", "5", "--kind", "backward", "--try", "32,16,4,1", "64,32,4,2"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["config"] for r in report["rows"]] == ["M=32,P=16,w=4,s=1", "M=64,P=32,w=4,s=2"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--arch", "60"], "need sm70"),
        (["--n", "300"], "N must be in [2, 256]"),
        (["--try", "64,32,8"], "expected BLOCK_M,BLOCK_P,WARPS,STAGES"),
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
        compile_report.Row("forward", "fp16", 70, 27, "a", ok=True, registers=100, spill_bytes=0,
                           shared_bytes=200_000, fits=False),
        compile_report.Row("forward", "fp16", 70, 27, "b", ok=False, error="boom"),
        compile_report.Row("labels", "fp16", 70, 27, "c", ok=True, registers=90, spill_bytes=8,
                           shared_bytes=1000, fits=True),
    ]
    lines, good = compile_report.summarise(rows)
    assert not good
    assert "FAIL" in lines[0] and "compiled 1/2" in lines[0]
    assert "  ok  " in lines[1] and "spill-free 0" in lines[1]

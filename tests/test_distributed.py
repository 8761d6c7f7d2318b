"""DDP on the CPU (gloo, 2 processes) against one process, and exact resume after SIGKILL.

One set of runs shared by the tests (module fixture), all with the same tiny flags (6 steps; the
2nd epoch stops after 2 of its 4 steps; a checkpoint every 3 steps):
- single: one process, global batch 8; ddp_plain: two ranks of 4 images each (same model);
- with colour jitter and dropping (random draws on every step, so resume must restore them):
  single_full / ddp_full: uninterrupted; single_killed / ddp_killed: SIGKILL right after the
  checkpoint of step 3, then resumed to step 6 (the DDP one by torchrun, the README's command).
- python -m san_fast.evaluate by one process and by the two ranks: of ddp_plain's checkpoint, and
  of a 4-band Potsdam model under IIC's held-out IID+ plan (matching fitted on other tiles).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from spawn_ranks import run_ranks

from san_fast.checkpoint import load_checkpoint
from san_fast.config import resolve

ROOT = Path(__file__).resolve().parents[1]
FLAGS = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
             synthetic_train_size=32, synthetic_val_size=17, epochs=2, max_steps=6, save_every=3,
             log_every=2, num_workers=0, synthetic_classes=4, num_vis=0, baseline=False)
JITTER = dict(color_jitter=0.2, color_drop=0.3)
KILL_AT = 3


def config(out, **extra):
    return resolve(dict(FLAGS, out=str(out), **extra), cuda_available=False)


def ddp_runs(rank, base):
    """One rank: the plain run, the jittered run, then the jittered run that SIGKILLs itself after
    the checkpoint of step 3. One process group for all three (the engine joins an existing one)."""
    import torch.distributed as dist

    from san_fast import engine

    dist.init_process_group("gloo")
    from san_fast.evaluate import main as evaluate

    outcome = {}
    for name, extra in (("ddp_plain", {}), ("ddp_full", JITTER)):
        outcome[name] = keep_buffers(lambda: engine.run(config(Path(base) / name, **extra)))
    for argv in evaluations(base, "ddp").values():
        assert evaluate(argv) == 0
    torch.save(outcome, Path(base) / f"outcome-rank{rank}.pt")  # this process ends by SIGKILL
    kill_after_checkpoint(KILL_AT)
    engine.run(config(Path(base) / "ddp_killed", **JITTER))
    raise AssertionError("the run should have been killed")


def evaluations(base, who):
    """evaluate's flags per checkpoint; `who` names the output folders."""
    base = Path(base)
    return {"synthetic": ["--checkpoint", str(base / "ddp_plain" / "checkpoint.pt"), "--device", "cpu",
                          "--out", str(base / f"{who}_eval_synthetic")],
            "potsdam": ["--checkpoint", str(base / "potsdam.pt"), "--device", "cpu", "--num-workers", "0",
                        "--eval-split", "iid+", "--out", str(base / f"{who}_eval_potsdam")]}


def single_killed(rank, out):
    from san_fast import engine

    kill_after_checkpoint(KILL_AT)
    engine.run(config(out, **JITTER))


def kill_after_checkpoint(step):
    from san_fast.trainer import Trainer

    save = Trainer.save

    def save_then_die(self):
        save(self)
        if self.progress.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.save = save_then_die


def keep_buffers(train):
    """train()'s result and the running statistics this rank's model ends with."""
    from san_fast.trainer import Trainer

    fit, buffers = Trainer.fit, {}

    def fit_and_keep(self):
        out = fit(self)
        buffers.update({k: v.clone() for k, v in self.model.state_dict().items() if "running" in k})
        return out

    Trainer.fit = fit_and_keep
    try:
        return {"result": train(), "buffers": buffers}
    finally:
        Trainer.fit = fit


def params(out):
    return load_checkpoint(str(Path(out) / "checkpoint.pt"))["model"]


def relative_difference(a, b):
    """|a - b| / |b| over all floating-point entries of two state dicts, as one vector."""
    keys = [k for k in b if b[k].is_floating_point()]
    va, vb = (torch.cat([d[k].double().flatten() for k in keys]) for d in (a, b))
    return ((va - vb).norm() / vb.norm()).item()


def worst_tensor_difference(a, b):
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item()
               for k in b if b[k].is_floating_point())


def cli_flags(out, **extra):
    flags = []
    for key, value in dict(FLAGS, out=str(out), **extra).items():
        flags += ["--no-baseline"] if key == "baseline" else [f"--{key.replace('_', '-')}", str(value)]
    return flags


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from san_fast.engine import run

    from san_fast.evaluate import main as evaluate
    from test_data_potsdam import make_potsdam
    from tiny_model import save_checkpoint, tiny_model

    base = tmp_path_factory.mktemp("ddp")
    make_potsdam(base / "data")
    save_checkpoint(base / "potsdam.pt", tiny_model(dataset="potsdam", data_root=str(base / "data"), num_semantics=8))
    runs = {"base": base, "single": run(config(base / "single")),
            "single_full": run(config(base / "single_full", **JITTER))}
    assert run_ranks(single_killed, 1, str(base / "single_killed")) == [None]
    runs["single_resumed"] = run(config(base / "single_killed", resume=str(base / "single_killed" / "checkpoint.pt"),
                                        **JITTER))
    assert run_ranks(ddp_runs, 2, str(base)) == [None, None]  # both ranks killed at the end
    for argv in evaluations(base, "single").values():
        assert evaluate(argv) == 0
    killed = base / "ddp_killed"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *cli_flags(killed, resume=killed / "checkpoint.pt", **JITTER)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["torchrun_stdout"] = proc.stdout
    return runs


def outcome(runs, rank):
    return torch.load(runs["base"] / f"outcome-rank{rank}.pt", weights_only=True)


def metrics(runs, name):
    return json.loads((runs["base"] / name / "metrics.json").read_text())


def test_two_processes_train_the_same_model_as_one(runs):
    ddp, single = params(runs["base"] / "ddp_plain"), params(runs["base"] / "single")
    assert relative_difference(ddp, single) <= 1e-5
    # Per tensor the bound is looser: the attention's key bias gets a gradient of pure rounding
    # noise (softmax ignores a shift of every logit), which Adam scales up to a full step.
    assert worst_tensor_difference(ddp, single) <= 1e-3
    got, want = metrics(runs, "ddp_plain"), runs["single"]
    # Every validation image counted once (17 images: 9 on rank 0, 8 on rank 1; 32x32 pixels each).
    assert got["san"]["num_pixels"] == want["san"]["num_pixels"] == 17 * 32 * 32
    assert got["san"]["confusion"] == want["san"]["confusion"]
    assert got["san"]["acc"] == want["san"]["acc"] and got["san"]["miou"] == want["san"]["miou"]
    assert got["train"]["distributed"] == {"world_size": 2, "per_rank_batch": 4, "backend": "gloo"}
    assert json.loads((runs["base"] / "ddp_plain" / "config.json").read_text())["distributed"] == \
        got["train"]["distributed"]


def test_evaluate_under_torchrun_gives_the_scores_of_one_process(runs):
    # on the run's own validation set, the ranks reproduce the run's final scores
    assert metrics(runs, "ddp_eval_synthetic")["san"] == metrics(runs, "ddp_plain")["san"]
    for name in ("synthetic", "potsdam"):
        got, want = metrics(runs, f"ddp_eval_{name}"), metrics(runs, f"single_eval_{name}")
        assert got["san"] == want["san"], name
        assert got["evaluation"]["distributed"]["world_size"] == 2
    potsdam = metrics(runs, "ddp_eval_potsdam")
    assert potsdam["protocol"]["evaluation"]["held_out_matching"] and potsdam["protocol"]["channels"] == 4
    assert potsdam["evaluation"]["images_fitted"] == potsdam["evaluation"]["images_scored"] == 2


def test_every_rank_keeps_the_same_running_statistics(runs):
    for name in ("ddp_plain", "ddp_full"):
        rank0, rank1 = outcome(runs, 0)[name], outcome(runs, 1)[name]
        saved = params(runs["base"] / name)
        assert "running_g" in rank0["buffers"] and any("running_var" in k for k in rank0["buffers"])
        for key, value in rank0["buffers"].items():
            assert torch.equal(value, rank1["buffers"][key]), key
            assert torch.equal(value, saved[key]), key
        assert rank0["result"]["san"] == rank1["result"]["san"]
        assert rank0["result"]["history"] == rank1["result"]["history"]


def test_ddp_resume_after_sigkill_is_bit_identical(runs):
    resumed, full = params(runs["base"] / "ddp_killed"), params(runs["base"] / "ddp_full")
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    got, want = metrics(runs, "ddp_killed"), metrics(runs, "ddp_full")
    assert got["san"] == want["san"] and got["history"] == want["history"]
    assert "2 processes (gloo), 4 images each" in runs["torchrun_stdout"]
    assert "resumed from" in runs["torchrun_stdout"] and "batch 3, step 3" in runs["torchrun_stdout"]


def test_single_process_resume_after_sigkill_is_bit_identical(runs):
    resumed, full = params(runs["base"] / "single_killed"), params(runs["base"] / "single_full")
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert runs["single_resumed"]["san"] == runs["single_full"]["san"]
    assert runs["single_resumed"]["history"] == runs["single_full"]["history"]
    # The jitter really drew random numbers: without it the run ends elsewhere.
    assert not torch.equal(full["recon.weight"], params(runs["base"] / "single")["recon.weight"])

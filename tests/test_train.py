"""The training CLI end to end on a tiny synthetic run: every file a run promises is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from san_fast.checkpoint import load_checkpoint
from san_fast.config import resolve
from san_fast.engine import run

ROOT = Path(__file__).resolve().parents[1]


def tiny_flags(out: Path, **extra) -> dict:
    flags = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
                 synthetic_train_size=32, synthetic_val_size=16, epochs=2, num_workers=0,
                 synthetic_classes=4, out=str(out), num_vis=3)
    flags.update(extra)
    return flags


def test_run_writes_config_metrics_checkpoint_and_pictures(tmp_path):
    result = run(resolve(tiny_flags(tmp_path), cuda_available=False))
    for name in ("config.json", "metrics.json", "checkpoint.pt", "predictions.png", "curves.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for method in ("san", "baseline"):
        scores = metrics[method]
        assert 0.0 <= scores["acc"] <= 1.0 and 0.0 <= scores["miou"] <= 1.0
        assert len(scores["assignment"]) == 4 and len(scores["iou"]) == 4
    assert metrics["san"] == result["san"]
    assert metrics["train"]["steps"] == 8  # 32 images / batch 8, two epochs
    train = metrics["train"]
    assert train["peak_gpu_memory_bytes"] is None and 0.0 <= train["data_wait_fraction"] <= 1.0
    assert 0.0 <= train["data_wait_fraction_after_warmup"] <= 1.0
    assert train["compile"] is False and train["compile_mode"] is None  # the mode that ran, none here
    assert train["images_per_second_after_warmup"] > 0 and train["images_per_second"] > 0  # 3 steps after 5
    assert train["median_step_ms_after_warmup"] > 0  # the median of those 3 steps' host intervals
    assert train["distributed"] == {"world_size": 1, "per_rank_batch": 8, "backend": "none (single process)"}
    assert len(metrics["history"]["loss"]) == 2
    saved = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert saved["progress"] == {"epoch": 3, "batch": 0, "step": 8}  # the next epoch is 3
    assert saved["config"]["embed_dim"] == 32


def test_seat_impls_give_the_same_losses(tmp_path):
    a = run(resolve(tiny_flags(tmp_path / "torch", seat_impl="torch", epochs=1, baseline=False),
                    cuda_available=False))
    b = run(resolve(tiny_flags(tmp_path / "triton", seat_impl="triton", epochs=1, baseline=False),
                    cuda_available=False))
    for key in ("loss", "rec", "con", "uni"):
        assert abs(a["history"][key][0] - b["history"][key][0]) <= 1e-3 * abs(a["history"][key][0])


def test_cli_help_lists_the_flags():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--dataset", "--data-root", "--compile", "--amp", "--batch-size", "--epochs", "--lr",
                 "--seed", "--device", "--no-reconstruction", "--no-batch-wise", "--no-token-matcher",
                 "--encoder", "--vit-depth", "--attn", "--seat-impl", "--out"):
        assert flag in out


def test_cli_missing_dataset_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--dataset", "coco27", "--data-root",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "not found" in proc.stderr and "expected layout" in proc.stderr


def test_resume_continues_after_the_saved_epoch(tmp_path):
    run(resolve(tiny_flags(tmp_path / "a", epochs=1, baseline=False), cuda_available=False))
    result = run(resolve(tiny_flags(tmp_path / "b", epochs=2, baseline=False,
                                    resume=str(tmp_path / "a" / "checkpoint.pt")), cuda_available=False))
    assert result["train"]["steps"] == 8
    assert len(result["history"]["loss"]) == 2


def test_train_on_a_coco27_fixture_in_the_real_layout(tmp_path):
    from test_data_coco import make_coco

    make_coco(tmp_path / "data")
    flags = tiny_flags(tmp_path / "run", dataset="coco27", data_root=str(tmp_path / "data"), batch_size=2,
                       epochs=1, num_vis=2)
    flags = {k: v for k, v in flags.items() if not k.startswith("synthetic_")}  # refused for real data
    result = run(resolve(flags, cuda_available=False))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["protocol"]["protocol"] == "picie"
    assert len(result["san"]["iou"]) == 27 and result["class_names"][0] == "electronic"
    assert result["train"]["steps"] == 1  # 3 images, batch 2, last ragged batch dropped


def test_cli_rejects_a_kernel_it_cannot_run_before_reading_data(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "train.py", "--seat-impl", "triton", "--device", "cpu",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "needs CUDA tensors" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_data_wait_after_warm_up_leaves_out_the_workers_start(monkeypatch):
    """A first batch that waits for the workers to start weighs in the whole loop's wait, not
    in the wait over the steps after warm-up (a fake clock: 10 s for the first batch, then
    1 s of waiting in each 4 s step)."""
    from san_fast import trainer as module

    now = [0.0]
    monkeypatch.setattr(module.time, "perf_counter", lambda: now[0])

    def batches():
        now[0] += 10.0
        yield 0
        while True:
            now[0] += 1.0
            yield 0

    clock, items = module.StepClock(torch.device("cpu")), batches()
    clock.start()
    for step in range(1, 11):
        clock.next_batch(items)
        now[0] += 3.0  # the step itself
        if step == 5:
            clock.mark_warm(step)
        else:
            clock.tick()
    clock.stop()
    summary = clock.summary(10)
    assert summary["data_wait_fraction_after_warmup"] == pytest.approx(0.25)  # 5 x 1 s of 5 x 4 s
    assert summary["data_wait_fraction"] == pytest.approx(19 / 49, abs=1e-4)  # 10 + 9 x 1 s of 10 x 3 + 19 s


def test_objects_alive_after_warm_up_are_frozen_out_of_the_collector_until_the_run_ends(tmp_path, monkeypatch):
    """After warm-up the collector no longer walks the run's long-lived objects (a full
    collection over a compiled model's is a step-sized pause); fit() gives them back."""
    import gc

    from san_fast import trainer as module

    frozen_at_warm = []
    mark_warm = module.StepClock.mark_warm

    def spy(self, images):
        frozen_at_warm.append(gc.get_freeze_count())
        return mark_warm(self, images)

    monkeypatch.setattr(module.StepClock, "mark_warm", spy)
    assert gc.get_freeze_count() == 0
    run(resolve(tiny_flags(tmp_path), cuda_available=False))  # 8 steps: warm after 5
    assert len(frozen_at_warm) == 1 and frozen_at_warm[0] > 1000
    assert gc.get_freeze_count() == 0


def test_profile_steps_profile_the_steps_after_warm_up(tmp_path):
    """--profile-steps N: N steps after warm-up under torch.profiler, their phases' host time in
    metrics.json and a chrome trace in the run folder; phases are labelled only meanwhile."""
    from san_fast import step_profile

    run(resolve(tiny_flags(tmp_path, epochs=2, profile_steps=2, num_vis=0), cuda_available=False))
    profile = json.loads((tmp_path / "metrics.json").read_text())["train"]["profile"]
    assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0
    assert profile["gpu_kernel_ms_per_step"] is None  # no GPU
    phases = profile["host_ms_per_step"]
    assert {"next_batch", "prepare", "forward", "backward", "optimizer", "sums"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["forward"] > 0 and phases["backward"] > 0
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "san.forward" in names and "san.optimizer" in names
    assert not step_profile._active


def test_a_profile_window_longer_than_the_epoch_ends_with_it(tmp_path):
    """8 steps in all, 5 of them warm-up: a 10-step window profiles the 3 left."""
    run(resolve(tiny_flags(tmp_path, epochs=2, profile_steps=10, num_vis=0), cuda_available=False))
    assert json.loads((tmp_path / "metrics.json").read_text())["train"]["profile"]["steps"] == 3


def test_on_a_gpu_the_median_step_is_the_devices_not_the_hosts(monkeypatch):
    """The host may run ahead of the GPU for a whole run: its intervals then measure the host.
    On CUDA the clock times step ends with events (a fake device here: steps of 12 ms on the
    device while the host ticks every 5 ms; the device passes events only when asked after the
    clock stops, so no gap is read early)."""
    from san_fast import trainer as module

    now = [0.0]
    monkeypatch.setattr(module.time, "perf_counter", lambda: now[0])
    done = [False]

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = 12.0 * FakeEvent.count  # device ms at which this step ends
            FakeEvent.count += 1

        def record(self):
            pass

        def query(self):
            return done[0]

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(module.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(module.torch.cuda, "synchronize", lambda device=None: done.__setitem__(0, True))
    monkeypatch.setattr(module.torch.cuda, "max_memory_allocated", lambda device=None: 0)
    clock = module.StepClock(torch.device("cuda"))
    clock.start()
    for step in range(1, 11):
        now[0] += 0.005
        if step == 5:
            clock.mark_warm(step)
            done[0] = False  # mark_warm synchronises; the later events are still pending
        else:
            clock.tick()
    assert clock.gaps == []  # nothing read while the device had not passed the events
    clock.stop()
    summary = clock.summary(10)
    assert summary["median_step_ms_after_warmup"] == pytest.approx(12.0)
    assert len(clock.gaps) == 5

"""Checkpoints, the run folder and the resumable sampler, piece by piece."""

import json
import os

import pytest
import torch
import torch.nn as nn

from san_fast.checkpoint import (CheckpointError, check_compatible, config_from_checkpoint, load_checkpoint,
                                 load_model_state)
from san_fast.config import load_config, resolve
from san_fast.distributed import DistEnv
from san_fast.engine import run
from san_fast.loader import EpochBatches, RankShard
from san_fast.model import SAN
from san_fast.model.sync_batchnorm import GlobalBatchNorm
from san_fast.run_folder import RunFolder, RunFolderError

TINY = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
            synthetic_train_size=16, synthetic_val_size=8, epochs=1, num_workers=0, synthetic_classes=4,
            num_vis=0, baseline=False, seat_impl="torch")


def tiny(**extra):
    return resolve(dict(TINY, **extra), cuda_available=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run(tiny(out=str(out)))
    return out, result


def test_a_checkpoint_rebuilds_its_config_and_model(trained):
    out, _ = trained
    state = load_checkpoint(str(out / "checkpoint.pt"))
    cfg = config_from_checkpoint(state)
    assert cfg == tiny(out=str(out))
    model = SAN(cfg)
    load_model_state(model, state, "x")
    assert not any(k.startswith("module.") for k in state["model"])
    assert set(state) >= {"model", "config", "optimizer", "progress", "history", "rng", "running", "distributed"}
    # config.json beside it says the same, plus how the run was launched
    assert load_config(str(out / "config.json")) == cfg
    assert json.loads((out / "config.json").read_text())["distributed"]["world_size"] == 1


def test_another_model_size_is_one_line_naming_the_fields(trained):
    out, _ = trained
    state = load_checkpoint(str(out / "checkpoint.pt"))
    with pytest.raises(CheckpointError) as err:
        check_compatible(tiny(embed_dim=64, num_semantics=5, epochs=3, out="elsewhere"), state, "c.pt")
    message = str(err.value)
    assert "\n" not in message
    assert "embed_dim 32 (this run: 64)" in message and "num_semantics None (this run: 5)" in message
    assert "epochs" not in message and "out" not in message  # run control may change on resume
    with pytest.raises(CheckpointError, match="does not fit this model: .*size mismatch"):
        load_model_state(SAN(tiny(embed_dim=48)), state, "c.pt")


def test_foreign_files_are_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a san_fast checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(tmp_path / "half.pt"))
    with pytest.raises(CheckpointError, match="is a folder: expected a checkpoint file, e.g. .*checkpoint.pt"):
        load_checkpoint(str(tmp_path))


def test_resume_of_a_finished_run_only_reports(trained, tmp_path):
    out, result = trained
    again = run(tiny(out=str(tmp_path), resume=str(out / "checkpoint.pt")))
    assert again["train"]["steps"] == result["train"]["steps"] == 2
    assert again["san"] == result["san"]
    # Resumed in its own folder with a run-control flag changed and nothing left to train (so
    # no checkpoint is written): config.json still says what the checkpoint says.
    before = (out / "config.json").read_text()
    run(tiny(out=str(out), resume=str(out / "checkpoint.pt"), eval_every=3))
    assert (out / "config.json").read_text() == before
    assert load_config(str(out / "config.json")) == config_from_checkpoint(load_checkpoint(str(out / "checkpoint.pt")))


def test_the_run_folder_is_locked_and_not_reused(tmp_path):
    first = RunFolder(str(tmp_path / "run"), resume=None, overwrite=False)
    first.acquire()
    second = RunFolder(str(tmp_path / "run"), resume=None, overwrite=False)
    with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        second.acquire()
    with pytest.raises(RunFolderError, match="in use by another run"):
        second.check_not_in_use()  # what a run does before its data checks: no file written
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "run" / "metrics.json").write_text("{}")
    first.release()
    second.check_not_in_use()  # the lock is free again
    with pytest.raises(RunFolderError, match="already holds a run"):
        second.acquire()
    resumed = RunFolder(str(tmp_path / "run"), resume=str(tmp_path / "run" / "checkpoint.pt"), overwrite=False)
    resumed.acquire()
    resumed.release()
    # --resume of a checkpoint kept elsewhere: its own run's may roll the folder back, another
    # run's (other settings than the folder's config.json) may not.
    (tmp_path / "run" / "config.json").write_text(json.dumps({**tiny().to_dict(), "distributed": {}}))
    (tmp_path / "kept.pt").write_bytes(b"x")
    same_run, other_run = tiny(epochs=5).to_dict(), tiny(embed_dim=48, lr=0.5).to_dict()
    RunFolder(str(tmp_path / "run"), str(tmp_path / "kept.pt"), False, resume_config=same_run).check()
    with pytest.raises(RunFolderError, match="holds another run than --resume .*kept.pt .*differs in embed_dim, lr"):
        RunFolder(str(tmp_path / "run"), str(tmp_path / "kept.pt"), False, resume_config=other_run).check()
    RunFolder(str(tmp_path / "empty"), str(tmp_path / "kept.pt"), False, resume_config=other_run).check()
    (tmp_path / "run" / "tensorboard").mkdir()
    (tmp_path / "run" / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    (tmp_path / "run" / "confusion.png").write_bytes(b"x")
    (tmp_path / "run" / "notes.txt").write_text("not the run's")
    fresh = RunFolder(str(tmp_path / "run"), resume=None, overwrite=True)
    fresh.acquire()
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == [".lock", "notes.txt"]  # every file of the earlier run, its TensorBoard logs too


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_draw_the_global_batches_of_one_process(world):
    size, batch, seed = 37, 8, 5
    one = EpochBatches(size, batch, DistEnv(), seed)
    ranks = [EpochBatches(size, batch // world, DistEnv(rank=r, world_size=world), seed) for r in range(world)]
    for epoch in (1, 2):
        one.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        batches = list(one)
        per_rank = [list(s) for s in ranks]
        assert len(batches) == size // batch and all(len(p) == len(batches) for p in per_rank)
        for s, global_batch in enumerate(batches):
            union = sorted(item for p in per_rank for item in p[s])
            assert union == sorted(global_batch)  # same images, same per-item seeds
        seeds = [seed_ for b in batches for _, seed_ in b]
        assert len(set(seeds)) == len(seeds)  # every item its own augmentation stream
    one.set_epoch(2, start=3)
    assert list(one) == batches[3:]  # resume inside the epoch


def test_validation_shards_count_every_image_once():
    shards = [list(RankShard(10, DistEnv(rank=r, world_size=3))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_global_batchnorm_is_batchnorm_in_one_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    reference = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    reference.load_state_dict(model.state_dict())
    bn = model[1]
    converted = GlobalBatchNorm.convert(model)
    assert isinstance(converted[1], GlobalBatchNorm) and converted[1].weight is bn.weight
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted(x), reference(x))
    assert converted.state_dict().keys() == reference.state_dict().keys()

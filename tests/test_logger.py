"""The TensorBoard logger: what it writes (read back with TensorBoard's own reader), who writes."""

import time

import numpy as np
import pytest
import torch.distributed as dist

from san_fast import logger as logger_module
from san_fast.logger import NullLogger, TensorBoardLogger, resolve_logger

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(folder):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_writes_scalars_and_prediction_panels(tmp_path):
    grid = np.zeros((30, 40, 3), np.uint8)
    grid[:, :20] = (255, 0, 0)
    with resolve_logger("tensorboard", tmp_path) as log:
        assert isinstance(log, TensorBoardLogger) and log.log_dir == tmp_path / "tensorboard"
        for step in (1, 2, 3):
            log.log_train(step, {"loss": 1.0 / step, "rec": 0.5 / step}, lr=1e-3,
                          images_per_second=100.0 + step, clusters_used=6 - step)
        log.log_eval(3, {"acc": 0.625, "miou": 0.5, "clusters_used": 5, "iou": [0.5]}, grid=grid)
    events = read_events(tmp_path / "tensorboard")
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/rec", "train/lr", "train/images_per_second",
            "train/clusters_used", "val/acc", "val/miou", "val/clusters_used"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert np.allclose([e.value for e in loss], [1.0, 0.5, 1 / 3])
    assert [(e.step, e.value) for e in events.Scalars("val/acc")] == [(3, 0.625)]
    assert [e.value for e in events.Scalars("train/clusters_used")] == [5, 4, 3]
    (image,) = events.Images("val/predictions")
    assert (image.step, image.width, image.height) == (3, 40, 30)


def test_resume_purges_events_past_the_checkpoint(tmp_path):
    with resolve_logger("tensorboard", tmp_path) as log:
        for step in range(1, 6):
            log.scalars(step, {"loss": float(step)})
    # TensorBoard reads event files in name order: "events.out.tfevents.<second>.<host>.<pid>.<n>",
    # where n counts this process's writers (after writer 9 comes 10, which sorts first). A resumed
    # run is a later second (and process); here, wait for one.
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    with resolve_logger("tensorboard", tmp_path, purge_step=3) as log:
        for step in (3, 4):
            log.scalars(step, {"loss": 10.0 * step})
    loss = read_events(tmp_path / "tensorboard").Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_none_and_missing_package(tmp_path, monkeypatch, capsys):
    log = resolve_logger("none", tmp_path)
    assert type(log) is NullLogger and not log.enabled
    log.log_train(1, {"loss": 1.0})
    log.log_eval(1, {"acc": 0.5}, grid=np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / "tensorboard").exists()

    monkeypatch.setattr(logger_module, "tensorboard_available", lambda: False)
    monkeypatch.setattr(logger_module, "_notice_shown", False)
    assert type(resolve_logger("auto", tmp_path)) is NullLogger
    assert type(resolve_logger("auto", tmp_path)) is NullLogger
    assert capsys.readouterr().err.count("tensorboard is not installed") == 1
    with pytest.raises(ValueError, match=r"pip install 'san-fast\[tensorboard\]'"):
        resolve_logger("tensorboard", tmp_path)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_logger("wandb", tmp_path)


def test_auto_uses_tensorboard_when_installed(tmp_path):
    with resolve_logger("auto", tmp_path) as log:
        assert type(log) is TensorBoardLogger


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert type(resolve_logger("tensorboard", tmp_path)) is NullLogger
    assert not (tmp_path / "tensorboard").exists()
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with resolve_logger("tensorboard", tmp_path) as log:
        assert type(log) is TensorBoardLogger


def test_image_must_be_rgb_pixels(tmp_path):
    with resolve_logger("tensorboard", tmp_path) as log:
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
            log.image("x", np.zeros((3, 8, 8), np.float32), 0)

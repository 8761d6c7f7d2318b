"""Training checks every file of its splits once, before the first step: a bad file that would
never be drawn still stops the run, with one line naming it, and nothing is written."""

import os

import numpy as np
import pytest
from scipy.io import savemat
from test_data_coco import cfg_for, fine_label, make_coco, save
from test_data_potsdam import make_potsdam

import train
from san_fast.data import build_dataset
from san_fast.data._io import DatasetFileError
from san_fast.data.verify import RECORD, verify_dataset

TINY = ["--crop-size", "32", "--embed-dim", "32", "--vit-dim", "32", "--vit-heads", "2", "--vit-depth", "1",
        "--batch-size", "2", "--epochs", "1", "--no-baseline", "--num-workers", "0", "--seat-impl", "torch"]


def train_fails(tmp_path, capsys, dataset):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--dataset", dataset, "--data-root", str(tmp_path / "data"), "--out", str(out)])
    assert exit_info.value.code == 2
    # What a terminal shows: each progress bar is redrawn after "\r" and cleared when it closes.
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), lines
    assert not out.exists()
    return lines[0]


def test_a_label_value_out_of_range_stops_training(tmp_path, capsys):
    base = make_coco(tmp_path / "data")
    label = fine_label(48, 64)
    label[5, 5] = 200
    bad = os.path.join(base, "annotations", "train2017", "000000000030.png")
    save(bad, label)
    line = train_fails(tmp_path, capsys, "coco27")
    assert f"coco27 train split: label {bad}: values 200 out of range" in line


def test_a_label_of_the_wrong_size_stops_training(tmp_path, capsys):
    base = make_coco(tmp_path / "data")
    bad = os.path.join(base, "annotations", "val2017", "000000000285.png")
    save(bad, fine_label(40, 64))
    line = train_fails(tmp_path, capsys, "coco27")
    assert "coco27 val split: image" in line and f"but its label {bad} is 64x40" in line


def test_a_tile_without_its_key_stops_training(tmp_path, capsys):
    base = make_potsdam(tmp_path / "data", size=32)
    bad = os.path.join(base, "gt", "4.mat")
    savemat(bad, {"labels": np.zeros((32, 32), np.uint8)})
    line = train_fails(tmp_path, capsys, "potsdam")
    assert f"{bad}: no variable 'gt' in this .mat file" in line


def test_checked_files_are_recorded_and_skipped_until_they_change(tmp_path, monkeypatch):
    from san_fast.data import verify

    base = make_coco(tmp_path)
    cfg = cfg_for(tmp_path)
    record = str(tmp_path / "san_fast_cache")
    train_set = build_dataset(cfg, "train")
    assert verify_dataset(train_set, "train", record, progress=False) == 3
    assert os.path.isfile(os.path.join(record, RECORD))
    assert verify_dataset(train_set, "train", record, progress=False) == 0
    changed = os.path.join(base, "images", "train2017", "000000000025.jpg")
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert verify_dataset(train_set, "train", record, progress=False) == 1


def test_ranks_check_their_own_share(tmp_path, monkeypatch):
    from san_fast.data import verify

    make_coco(tmp_path)
    train_set = build_dataset(cfg_for(tmp_path), "train")
    checked = []
    real = verify.check_sample
    monkeypatch.setattr(verify, "check_sample", lambda files, i: checked.append(i) or real(files, i))
    assert verify_dataset(train_set, "train", None, progress=False, rank=1, world_size=2) == 1
    assert checked == [1]
    # every rank sees every rank's errors, so all stop together
    with pytest.raises(DatasetFileError, match="rank 0's bad file"):
        verify_dataset(train_set, "train", None, progress=False, rank=1, world_size=2,
                       gather=lambda mine: [([], ["rank 0's bad file"], 2), mine])

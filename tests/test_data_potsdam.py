"""Potsdam loader on tiny fixtures in IIC's layout (imgs/<id>.mat, gt/<id>.mat, split lists).
The writer here is reused by tests/test_data_prepare.py."""

import os

import numpy as np
import pytest
import torch
from scipy.io import savemat

from san_fast.config import Config
from san_fast.data import build_dataset
from san_fast.data._io import DatasetFileError, DatasetLayoutError

LISTS = {"labelled_train.txt": ["11", "4"], "labelled_test.txt": ["7", "2"], "unlabelled_train.txt": ["30"]}


def tile_label(size):
    """Columns of classes 0..5 (roads, buildings, low vegetation, tree, car, clutter)."""
    return np.repeat((np.arange(size) * 6 // size)[None, :], size, axis=0).astype(np.int32)


def make_potsdam(root, size=200, lists=None):
    base = os.path.join(root, "potsdam")
    os.makedirs(os.path.join(base, "imgs"))
    os.makedirs(os.path.join(base, "gt"))
    rng = np.random.default_rng(2)
    for list_name, ids in (lists or LISTS).items():
        with open(os.path.join(base, list_name), "w") as f:
            f.write("".join(i + "\n" for i in ids))
        for i in ids:
            savemat(os.path.join(base, "imgs", i + ".mat"),
                    {"img": rng.integers(0, 256, (size, size, 4), dtype=np.uint8)})
            if list_name != "unlabelled_train.txt":
                savemat(os.path.join(base, "gt", i + ".mat"), {"gt": tile_label(size)})
    return base


def cfg_for(root, dataset="potsdam", protocol="iic", crop=32):
    return Config(dataset=dataset, data_root=str(root), crop_size=crop, eval_protocol=protocol)


def test_splits_follow_iic_lists(tmp_path):
    make_potsdam(tmp_path)
    train = build_dataset(cfg_for(tmp_path), "train")
    val = build_dataset(cfg_for(tmp_path), "val")
    assert [os.path.basename(t.image) for t in train.samples] == ["11.mat", "4.mat", "30.mat"]
    assert [os.path.basename(t.image) for t in val.samples] == ["7.mat", "2.mat"]
    assert train.samples[2].label is None


def test_val_is_the_whole_rgb_tile_under_iic(tmp_path):
    from scipy.io import loadmat

    base = make_potsdam(tmp_path)
    image, label = build_dataset(cfg_for(tmp_path), "val")[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 200, 200)
    assert label.dtype == torch.int64 and label.shape == (200, 200)
    raw = loadmat(os.path.join(base, "imgs", "7.mat"))["img"]
    assert torch.equal(image, torch.from_numpy(raw[:, :, :3]).permute(2, 0, 1))  # IR dropped
    assert torch.equal(label, torch.from_numpy(tile_label(200)).long())


def test_potsdam3_merges_classes(tmp_path):
    make_potsdam(tmp_path)
    _, label = build_dataset(cfg_for(tmp_path, "potsdam3"), "val")[0]
    expected = np.array([0, 1, 2, 2, 0, 1])[tile_label(200)]
    assert torch.equal(label, torch.from_numpy(expected))


def test_train_crops_and_unlabelled_tiles(tmp_path):
    make_potsdam(tmp_path)
    ds = build_dataset(cfg_for(tmp_path, crop=64), "train")
    image, label = ds[2]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert (label == 255).all()
    assert set(ds[0][1].unique().tolist()) <= set(range(6))


def test_picie_protocol_upsamples_tiles(tmp_path):
    make_potsdam(tmp_path, size=40)
    image, label = build_dataset(cfg_for(tmp_path, protocol="picie"), "val")[0]
    assert image.shape == (3, 320, 320) and label.shape == (320, 320)


def test_grayscale_tile_becomes_rgb(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    savemat(os.path.join(base, "imgs", "7.mat"), {"img": np.full((40, 40), 9, np.uint8)})
    image, _ = build_dataset(cfg_for(tmp_path), "val")[0]
    assert image.shape == (3, 200, 200) and int(image[1, 100, 100]) == 9


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset(cfg_for(tmp_path), "train")
    assert f"Potsdam (IIC's tiles) not found at {tmp_path / 'potsdam'}" in str(err.value)
    assert "labelled_test.txt" in str(err.value)


def test_missing_split_list(tmp_path):
    base = make_potsdam(tmp_path)
    os.remove(os.path.join(base, "unlabelled_train.txt"))
    with pytest.raises(DatasetLayoutError, match="split list unlabelled_train.txt not found at .*expected layout"):
        build_dataset(cfg_for(tmp_path), "train")


def test_labelled_tile_without_label(tmp_path):
    base = make_potsdam(tmp_path)
    os.remove(os.path.join(base, "gt", "2.mat"))
    with pytest.raises(DatasetLayoutError, match="(?s)labelled_test.txt without a label.*gt/2.mat"):
        build_dataset(cfg_for(tmp_path), "val")


def test_listed_tile_missing(tmp_path):
    base = make_potsdam(tmp_path)
    os.remove(os.path.join(base, "imgs", "30.mat"))
    with pytest.raises(DatasetLayoutError, match="(?s)tiles of unlabelled_train.txt not found.*30.mat"):
        build_dataset(cfg_for(tmp_path), "train")


def test_label_values_out_of_range(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    gt = tile_label(40)
    gt[0, 0] = 7
    savemat(os.path.join(base, "gt", "7.mat"), {"gt": gt})
    with pytest.raises(DatasetFileError, match="values 7 out of range \\(expected Potsdam class ids 0-5"):
        build_dataset(cfg_for(tmp_path), "val")[0]
    gt[0, 0] = -1
    savemat(os.path.join(base, "gt", "7.mat"), {"gt": gt})
    with pytest.raises(DatasetFileError, match="out of range 0..255"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_corrupt_mat_and_wrong_key(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    with open(os.path.join(base, "imgs", "7.mat"), "wb") as f:
        f.write(b"garbage" * 20)
    with pytest.raises(DatasetFileError, match="cannot read .mat file .*7.mat"):
        build_dataset(cfg_for(tmp_path), "val")[0]
    savemat(os.path.join(base, "imgs", "2.mat"), {"image": np.zeros((40, 40, 4), np.uint8)})
    with pytest.raises(DatasetFileError, match="no variable 'img'"):
        build_dataset(cfg_for(tmp_path), "val")[1]

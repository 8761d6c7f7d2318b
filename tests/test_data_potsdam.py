"""Potsdam loader on tiny fixtures in IIC's layout (imgs/<id>.mat, gt/<id>.mat, split lists).
The writer here is reused by tests/test_data_prepare.py."""

import os

import numpy as np
import pytest
import torch
from scipy.io import savemat

from san_fast.config import Config
from san_fast.data import build_dataset, build_eval_datasets
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


def cfg_for(root, dataset="potsdam", protocol="iic", crop=32, **extra):
    return Config(dataset=dataset, data_root=str(root), crop_size=crop, eval_protocol=protocol,
                  **extra)


def names(ds):
    return [os.path.basename(t.image) for d in getattr(ds, "datasets", [ds]) for t in d.samples]


def test_iid_trains_on_all_lists_and_scores_labelled_train_and_test(tmp_path):
    make_potsdam(tmp_path)
    cfg = cfg_for(tmp_path)  # eval_split auto = IIC's IID for Potsdam
    assert names(build_dataset(cfg, "train")) == ["11.mat", "4.mat", "30.mat", "7.mat", "2.mat"]
    plan, fit, score = build_eval_datasets(cfg)
    assert plan.name == "iid" and fit is score
    assert names(fit) == ["11.mat", "4.mat", "7.mat", "2.mat"]  # unlabelled tiles not scored
    assert names(build_dataset(cfg, "val")) == ["7.mat", "2.mat"]


def test_iid_plus_fits_on_labelled_train_and_scores_test(tmp_path):
    make_potsdam(tmp_path)
    cfg = cfg_for(tmp_path, eval_split="iid+")
    train = build_dataset(cfg, "train")
    assert names(train) == ["11.mat", "4.mat", "30.mat"]
    assert train.samples[2].label is None
    plan, fit, score = build_eval_datasets(cfg)
    assert plan.held_out and names(fit) == ["11.mat", "4.mat"] and names(score) == ["7.mat", "2.mat"]
    image, label = fit[0]
    assert image.shape == (4, 200, 200) and torch.equal(label, torch.from_numpy(tile_label(200)).long())


def test_val_is_the_whole_rgbir_tile_under_iic(tmp_path):
    from scipy.io import loadmat

    base = make_potsdam(tmp_path)
    image, label = build_dataset(cfg_for(tmp_path), "val")[0]
    assert image.dtype == torch.uint8 and image.shape == (4, 200, 200)
    assert label.dtype == torch.int64 and label.shape == (200, 200)
    raw = loadmat(os.path.join(base, "imgs", "7.mat"))["img"]
    assert torch.equal(image, torch.from_numpy(raw).permute(2, 0, 1))  # RGB + IR
    assert torch.equal(label, torch.from_numpy(tile_label(200)).long())


def test_rgb_bands_drop_ir(tmp_path):
    from scipy.io import loadmat

    base = make_potsdam(tmp_path)
    image, _ = build_dataset(cfg_for(tmp_path, potsdam_bands="rgb"), "val")[0]
    raw = loadmat(os.path.join(base, "imgs", "7.mat"))["img"]
    assert torch.equal(image, torch.from_numpy(raw[:, :, :3]).permute(2, 0, 1))


def test_potsdam3_merges_classes(tmp_path):
    make_potsdam(tmp_path)
    _, label = build_dataset(cfg_for(tmp_path, "potsdam3"), "val")[0]
    expected = np.array([0, 1, 2, 2, 0, 1])[tile_label(200)]
    assert torch.equal(label, torch.from_numpy(expected))


def test_train_crops_keep_ir_flip_and_unlabelled_tiles(tmp_path):
    make_potsdam(tmp_path)
    ds = build_dataset(cfg_for(tmp_path, crop=64, eval_split="iid+"), "train")
    image, label = ds[2]
    assert image.shape == (4, 64, 64) and label.shape == (64, 64)
    assert (label == 255).all()
    # label columns run 0..5 left to right: a flipped crop runs right to left (the paper flips
    # Potsdam, p = 0.5), and no crop is resampled (every column keeps a single class)
    orders = set()
    for seed in range(12):
        torch.manual_seed(seed)
        _, label = ds[0]
        assert (label == label[:1]).all()
        orders.add(bool(label[0, 0] > label[0, -1]) if label[0, 0] != label[0, -1] else None)
    assert {True, False} <= orders


def test_picie_protocol_upsamples_tiles_with_their_ir(tmp_path):
    make_potsdam(tmp_path, size=40)
    image, label = build_dataset(cfg_for(tmp_path, protocol="picie"), "val")[0]
    assert image.shape == (4, 320, 320) and label.shape == (320, 320)


def test_grayscale_tile_becomes_rgb_with_rgb_bands(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    savemat(os.path.join(base, "imgs", "7.mat"), {"img": np.full((40, 40), 9, np.uint8)})
    image, _ = build_dataset(cfg_for(tmp_path, potsdam_bands="rgb"), "val")[0]
    assert image.shape == (3, 200, 200) and int(image[1, 100, 100]) == 9
    with pytest.raises(DatasetFileError, match=r"expected HxWx4 \(RGB \+ IR\); for RGB tiles use "
                                               "--potsdam-bands rgb"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_rgb_tile_needs_rgb_bands(tmp_path):
    base = make_potsdam(tmp_path, size=40)
    savemat(os.path.join(base, "imgs", "7.mat"), {"img": np.full((40, 40, 3), 9, np.uint8)})
    assert build_dataset(cfg_for(tmp_path, potsdam_bands="rgb"), "val")[0][0].shape[0] == 3
    with pytest.raises(DatasetFileError, match="7.mat: 'img' has shape \\(40, 40, 3\\)"):
        build_dataset(cfg_for(tmp_path), "val")[0]


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

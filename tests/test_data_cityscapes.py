"""Cityscapes loader on tiny fixtures in the official layout (leftImg8bit/, gtFine/<split>/<city>/).
The writer here is reused by tests/test_data_prepare.py."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from san_fast.config import Config
from san_fast.data import build_dataset
from san_fast.data._io import DatasetFileError, DatasetLayoutError

CITIES = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}}


def cityscapes_label(h, w):
    """Top: road (id 7 -> 0); bottom left: bicycle (33 -> 26); bottom right: ego vehicle (1, void)."""
    label = np.full((h, w), 7, np.uint8)
    label[h // 2:, : w // 2] = 33
    label[h // 2:, w // 2:] = 1
    return label


def make_cityscapes(root, size=(32, 64), cities=None, image_mode="RGB"):
    base = os.path.join(root, "cityscapes")
    rng = np.random.default_rng(1)
    h, w = size
    for split, per_city in (cities or CITIES).items():
        for city, n in per_city.items():
            for k in range(n):
                stem = f"{city}_{k:06d}_000019"
                image = rng.integers(0, 256, (h, w, len(image_mode)), dtype=np.uint8)
                for folder, name, array in (
                    ("leftImg8bit", stem + "_leftImg8bit.png", image),
                    ("gtFine", stem + "_gtFine_labelIds.png", cityscapes_label(h, w)),
                ):
                    path = os.path.join(base, folder, split, city, name)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Image.fromarray(array).save(path)
                # files the loader must skip
                color = os.path.join(base, "gtFine", split, city, stem + "_gtFine_color.png")
                Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(color)
    return base


def cfg_for(root, protocol="picie", crop=32):
    return Config(dataset="cityscapes", data_root=str(root), crop_size=crop, eval_protocol=protocol)


def test_splits_shapes_and_dtypes(tmp_path):
    make_cityscapes(tmp_path)
    train = build_dataset(cfg_for(tmp_path), "train")
    val = build_dataset(cfg_for(tmp_path), "val")
    assert (len(train), len(val)) == (3, 2)
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert label.dtype == torch.int64 and label.shape == (32, 32)
    image, label = val[0]
    assert image.shape == (3, 320, 320) and label.shape == (320, 320)


def test_label_ids_map_to_27_classes(tmp_path):
    make_cityscapes(tmp_path)
    _, label = build_dataset(cfg_for(tmp_path), "val")[0]
    assert label[0, 0] == 0 and label[-1, 0] == 26 and label[-1, -1] == 255
    assert set(label.unique().tolist()) == {0, 26, 255}


def test_samples_are_sorted_by_city_and_skip_other_files(tmp_path):
    make_cityscapes(tmp_path)
    ds = build_dataset(cfg_for(tmp_path), "train")
    names = [os.path.basename(p.image) for p in ds.samples]
    assert names == ["aachen_000000_000019_leftImg8bit.png", "aachen_000001_000019_leftImg8bit.png",
                     "bochum_000000_000019_leftImg8bit.png"]
    assert all(p.label.endswith("_gtFine_labelIds.png") for p in ds.samples)


def test_rgba_images_become_rgb(tmp_path):
    make_cityscapes(tmp_path, image_mode="RGBA")
    image, _ = build_dataset(cfg_for(tmp_path), "val")[1]
    assert image.shape == (3, 320, 320)


def test_iic_protocol_is_refused_for_cityscapes(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(ValueError, match="use --eval-protocol picie"):
        build_dataset(cfg_for(tmp_path, "iic"), "val")


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        build_dataset(cfg_for(tmp_path), "train")
    message = str(err.value)
    assert f"Cityscapes not found at {tmp_path / 'cityscapes'}" in message
    assert "gtFine/train/<city>/" in message and "missing: leftImg8bit/, gtFine/" in message


def test_missing_split_folder(tmp_path):
    make_cityscapes(tmp_path, cities={"train": {"aachen": 1}})
    with pytest.raises(DatasetLayoutError, match="leftImg8bit/val; expected layout"):
        build_dataset(cfg_for(tmp_path), "val")


def test_image_without_label(tmp_path):
    base = make_cityscapes(tmp_path)
    os.remove(os.path.join(base, "gtFine", "val", "frankfurt", "frankfurt_000001_000019_gtFine_labelIds.png"))
    with pytest.raises(DatasetLayoutError, match="(?s)images without a label.*frankfurt_000001_000019"):
        build_dataset(cfg_for(tmp_path), "val")


def test_split_without_images(tmp_path):
    base = make_cityscapes(tmp_path)
    for name in os.listdir(os.path.join(base, "leftImg8bit", "val", "frankfurt")):
        os.remove(os.path.join(base, "leftImg8bit", "val", "frankfurt", name))
    with pytest.raises(DatasetLayoutError, match="no \\*_leftImg8bit.png images"):
        build_dataset(cfg_for(tmp_path), "val")


def test_label_values_out_of_range(tmp_path):
    base = make_cityscapes(tmp_path)
    label = cityscapes_label(32, 64)
    label[3, 3] = 40
    path = os.path.join(base, "gtFine", "val", "frankfurt", "frankfurt_000000_000019_gtFine_labelIds.png")
    Image.fromarray(label).save(path)
    with pytest.raises(DatasetFileError, match="values 40 out of range \\(expected Cityscapes label ids 0-33"):
        build_dataset(cfg_for(tmp_path), "val")[0]


def test_corrupt_png(tmp_path):
    base = make_cityscapes(tmp_path)
    path = os.path.join(base, "leftImg8bit", "train", "bochum", "bochum_000000_000019_leftImg8bit.png")
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(DatasetFileError, match="cannot decode image .*bochum_000000"):
        build_dataset(cfg_for(tmp_path), "train")[2]

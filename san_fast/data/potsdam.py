"""ISPRS Potsdam as prepared by IIC (``potsdam_prepare.py``): 200x200 tiles stored as .mat files,
6 classes (potsdam) or 3 merged classes (potsdam3).

Tiles are RGB+IR (200x200x4 uint8); the model input is the RGB part (the first 3 channels), the
IR channel is dropped. Splits follow IIC's held-out partitions ("IID+" in IIC's code): train =
labelled_train + unlabelled_train (the unlabelled tiles have no gt/ file; their labels are all
255), val = labelled_test.

The tiles need no cache: a .mat tile loads in about 0.1 ms, far below the cost of a JPEG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from san_fast.data import labels as L
from san_fast.data._io import (
    DatasetFileError,
    LabelSpace,
    SegmentationFiles,
    find_dataset_root,
    layout_error,
    list_files,
    missing_files_error,
    read_id_list,
    read_mat,
    to_uint8_label,
)
from san_fast.data.transforms import protocol_for, train_crop_scale

TITLE = "Potsdam (IIC's tiles)"
FOLDER = "potsdam"
SPLIT_LISTS = {"train": ("labelled_train.txt", "unlabelled_train.txt"), "val": ("labelled_test.txt",)}
PUBLISHED_COUNTS = {"labelled_train.txt": 4545, "labelled_test.txt": 855, "unlabelled_train.txt": 3150}
LABELLED_LISTS = ("labelled_train.txt", "labelled_test.txt")
IMAGE_KEY, LABEL_KEY = "img", "gt"
LAYOUT = """\
<data-root>/potsdam/                   (or --data-root pointing at this folder)
  imgs/<id>.mat              key "img": 200x200x4 uint8 (RGB + IR)
  gt/<id>.mat                key "gt": 200x200 class ids 0-5 (labelled tiles only)
  labelled_train.txt         4,545 ids
  labelled_test.txt          855 ids
  unlabelled_train.txt       3,150 ids"""

_EXPECTED = "Potsdam class ids 0-5, or 255"
LABELS = {
    "potsdam": LabelSpace(L.POTSDAM_6_TO_6, L.POTSDAM_VALID, _EXPECTED),
    "potsdam3": LabelSpace(L.POTSDAM_6_TO_3, L.POTSDAM_VALID, _EXPECTED),
}
INPUT_DESCRIPTION = "RGB: the first 3 channels of IIC's RGB+IR tiles (IR dropped)"


@dataclass(frozen=True)
class Tile:
    image: str
    label: Optional[str]  # None for unlabelled tiles


def dataset_root(data_root: str) -> str:
    return find_dataset_root(data_root, FOLDER, ("imgs",), TITLE, LAYOUT)


def list_path(root: str, list_name: str) -> str:
    path = os.path.join(root, list_name)
    if not os.path.isfile(path):
        raise layout_error(f"{TITLE} split list {list_name}", path, LAYOUT,
                           "(the split lists come with IIC's prepared Potsdam, or STEGO's copy)")
    return path


def tiles(root: str, list_names: tuple[str, ...]) -> list[Tile]:
    """The tiles of the given lists, in list order; labelled lists need every gt/ file."""
    image_dir = os.path.join(root, "imgs")
    label_dir = os.path.join(root, "gt")
    images = list_files(image_dir)
    labels = list_files(label_dir) if os.path.isdir(label_dir) else set()
    out: list[Tile] = []
    for list_name in list_names:
        ids = read_id_list(list_path(root, list_name))
        if not ids:
            raise DatasetFileError(f"split list {os.path.join(root, list_name)} is empty")
        missing = [os.path.join(image_dir, i + ".mat") for i in ids if i + ".mat" not in images]
        if missing:
            raise missing_files_error(TITLE, f"tiles of {list_name} not found", missing, LAYOUT)
        labelled = list_name in LABELLED_LISTS
        if labelled:
            missing = [os.path.join(label_dir, i + ".mat") for i in ids if i + ".mat" not in labels]
            if missing:
                raise missing_files_error(
                    TITLE, f"labelled tiles of {list_name} without a label: these gt/ files "
                    "are missing", missing, LAYOUT)
        for i in ids:
            has_label = i + ".mat" in labels
            out.append(Tile(os.path.join(image_dir, i + ".mat"),
                            os.path.join(label_dir, i + ".mat") if has_label else None))
    return out


def read_tile(tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """(RGB HxWx3 uint8, raw label HxW uint8); 255 everywhere for an unlabelled tile."""
    image = read_mat(tile.image, IMAGE_KEY)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise DatasetFileError(
            f"{tile.image}: 'img' has shape {image.shape}: expected HxWx4 (RGB + IR) or HxWx3"
        )
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
            raise DatasetFileError(f"{tile.image}: 'img' is {image.dtype}, expected uint8 0-255")
        image = image.astype(np.uint8)
    rgb = np.ascontiguousarray(image[:, :, :3])
    if tile.label is None:
        return rgb, np.full(rgb.shape[:2], L.IGNORE, dtype=np.uint8)
    label = read_mat(tile.label, LABEL_KEY)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise DatasetFileError(
            f"{tile.label}: 'gt' is {label.dtype} of shape {label.shape}: expected an HxW integer "
            "map of class ids 0-5"
        )
    label = to_uint8_label(label, tile.label)
    if label.shape != rgb.shape[:2]:
        raise DatasetFileError(f"{tile.image} is {rgb.shape[1]}x{rgb.shape[0]} but its label "
                               f"{tile.label} is {label.shape[1]}x{label.shape[0]}")
    return rgb, label


def build(cfg: Any, split: str) -> SegmentationFiles:
    if cfg.dataset not in LABELS:
        raise ValueError(f"dataset {cfg.dataset!r} is not a Potsdam variant")
    protocol = protocol_for(cfg.dataset, cfg.eval_protocol)
    root = dataset_root(cfg.data_root)
    return SegmentationFiles(
        cfg.dataset, tiles(root, SPLIT_LISTS[split]), read_tile, LABELS[cfg.dataset],
        protocol.steps(split, cfg.crop_size, train_crop_scale(cfg)), source=root,
    )


def describe_splits(dataset: str) -> dict:
    labels = {
        "potsdam": "6 classes: roads, buildings, low vegetation, tree, car, clutter",
        "potsdam3": "3 classes: roads+cars 0, buildings+clutter 1, vegetation+trees 2",
    }[dataset]
    return {
        "train": "labelled_train.txt + unlabelled_train.txt (published: 4,545 + 3,150 tiles)",
        "val": "labelled_test.txt (published: 855 tiles)",
        "labels": labels,
        "partitions": ("IIC's held-out partitions (IID+ in IIC's code); IIC's fully unsupervised "
                       "table trained on all three lists and scored on labelled_train + "
                       "labelled_test"),
    }

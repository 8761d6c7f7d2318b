"""ISPRS Potsdam as prepared by IIC (``potsdam_prepare.py``): 200x200 tiles stored as .mat files,
6 classes (potsdam) or 3 merged classes (potsdam3).

Tiles are RGB+IR (200x200x4 uint8). ``cfg.potsdam_bands``: ``rgbir`` (default) feeds all four
bands to the model, as the paper ("8550 RGBIR 200x200 px satellite images") and IIC do;
``rgb`` keeps the first three (STEGO's choice: "TODO add ir channel back", src/data.py).
Parts: train = labelled_train + unlabelled_train when training (the unlabelled tiles have no gt/
file; their labels are all 255), labelled_train alone when evaluating; val = labelled_test.
Which parts train, fit and score is the evaluation plan's choice (san_fast.data.splits).

The tiles need no cache: a .mat tile loads in about 0.1 ms, far below the cost of a JPEG.
"""

from __future__ import annotations

import functools
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
from san_fast.data.transforms import protocol_for, train_crop_step

TITLE = "Potsdam (IIC's tiles)"
FOLDER = "potsdam"
TRAIN_LISTS = {"train": ("labelled_train.txt", "unlabelled_train.txt"), "val": ("labelled_test.txt",)}
EVAL_LISTS = {"train": ("labelled_train.txt",), "val": ("labelled_test.txt",)}
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
BANDS = {"rgbir": 4, "rgb": 3}
INPUT_WORDS = {"rgbir": "RGB + IR: all 4 bands of IIC's tiles (the paper, IIC)",
               "rgb": "RGB: the first 3 bands of IIC's RGB+IR tiles, IR dropped (as STEGO)"}


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


def read_tile(tile: Tile, bands: str = "rgbir") -> tuple[np.ndarray, np.ndarray]:
    """(HxWx4 RGB+IR or HxWx3 RGB uint8, raw label HxW uint8); 255 everywhere for an
    unlabelled tile. ``bands="rgb"`` also accepts RGB and grayscale tiles."""
    if bands not in BANDS:
        raise ValueError(f"potsdam_bands={bands!r}: expected one of {', '.join(BANDS)}")
    image = read_mat(tile.image, IMAGE_KEY)
    if bands == "rgb" and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < BANDS[bands]:
        raise DatasetFileError(
            f"{tile.image}: 'img' has shape {image.shape}: expected HxWx4 (RGB + IR)"
            + (" or HxWx3" if bands == "rgb" else "; for RGB tiles use --potsdam-bands rgb")
        )
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
            raise DatasetFileError(f"{tile.image}: 'img' is {image.dtype}, expected uint8 0-255")
        image = image.astype(np.uint8)
    image = np.ascontiguousarray(image[:, :, :BANDS[bands]])
    if tile.label is None:
        return image, np.full(image.shape[:2], L.IGNORE, dtype=np.uint8)
    label = read_mat(tile.label, LABEL_KEY)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise DatasetFileError(
            f"{tile.label}: 'gt' is {label.dtype} of shape {label.shape}: expected an HxW integer "
            "map of class ids 0-5"
        )
    label = to_uint8_label(label, tile.label)
    if label.shape != image.shape[:2]:
        raise DatasetFileError(f"{tile.image} is {image.shape[1]}x{image.shape[0]} but its label "
                               f"{tile.label} is {label.shape[1]}x{label.shape[0]}")
    return image, label


def build(cfg: Any, part: str, training: bool) -> SegmentationFiles:
    """Training crops or evaluation items of one part (see the module docstring)."""
    if cfg.dataset not in LABELS:
        raise ValueError(f"dataset {cfg.dataset!r} is not a Potsdam variant")
    protocol = protocol_for(cfg.dataset, cfg.eval_protocol)
    root = dataset_root(cfg.data_root)
    lists = TRAIN_LISTS[part] if training else EVAL_LISTS[part]
    steps = (protocol.training_steps(train_crop_step(cfg), from_cache=False) if training
             else protocol.evaluation_steps(part, from_cache=False))
    reader = functools.partial(read_tile, bands=cfg.potsdam_bands)
    return SegmentationFiles(cfg.dataset, tiles(root, lists), reader, LABELS[cfg.dataset], steps,
                             source=root)


def part_words(cfg: Any, part: str, training: bool) -> str:
    lists = TRAIN_LISTS[part] if training else EVAL_LISTS[part]
    counts = " + ".join(f"{PUBLISHED_COUNTS[n]:,}" for n in lists)
    return f"{' + '.join(lists)} (published: {counts} tiles)"


def describe_splits(cfg: Any) -> dict:
    labels = {
        "potsdam": "6 classes: roads, buildings, low vegetation, tree, car, clutter",
        "potsdam3": "3 classes: roads+cars 0, buildings+clutter 1, vegetation+trees 2",
    }[cfg.dataset]
    return {"train": part_words(cfg, "train", True), "val": part_words(cfg, "val", False),
            "labels": labels}


def input_words(cfg: Any) -> str:
    return INPUT_WORDS[cfg.potsdam_bands]

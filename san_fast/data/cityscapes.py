"""Cityscapes (gtFine) with 27 classes: label ids 7..33 -> 0..26, ids 0..6 void, as PiCIE and
STEGO. Parts: train (2,975 gtFine train images) and val (the 500 val images); which of them
train, fit and score is the evaluation plan's choice (san_fast.data.splits)."""

from __future__ import annotations

import os
from typing import Any

from san_fast.data import labels as L
from san_fast.data._io import (
    CACHE_IMAGE_EXT,
    DatasetLayoutError,
    FilePair,
    LabelSpace,
    SegmentationFiles,
    cache_matches,
    cache_root_of,
    find_dataset_root,
    list_files,
    make_manifest,
    manifest_path,
    missing_files_error,
    read_pair,
    require_dir,
)
from san_fast.data.transforms import EvalProtocol, protocol_for, train_crop_step

TITLE = "Cityscapes"
FOLDER = "cityscapes"
SPLIT_DIRS = {"train": "train", "val": "val"}
PUBLISHED_COUNTS = {"train": 2975, "val": 500}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = """\
<data-root>/cityscapes/                (or --data-root pointing at this folder)
  leftImg8bit/train/<city>/<city>_<seq>_<frame>_leftImg8bit.png   leftImg8bit_trainvaltest.zip
  leftImg8bit/val/<city>/...
  gtFine/train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    gtFine_trainvaltest.zip
  gtFine/val/<city>/..."""

LABELS = LabelSpace(L.CITYSCAPES_TO_27, L.CITYSCAPES_VALID,
                    "Cityscapes label ids 0-33, or 255")
CACHE_LABELS = LABELS
CACHED_LABELS = LabelSpace(L.COARSE27_TO_27, L.COARSE27_VALID, "class ids 0-26, or 255 (prepare cache)")
MANIFEST_LIST = "gtFine"


def dataset_root(data_root: str) -> str:
    return find_dataset_root(data_root, FOLDER, ("leftImg8bit", "gtFine"), TITLE, LAYOUT)


def original_items(root: str, split_dir: str) -> list[tuple[str, FilePair]]:
    """(stem, pair) for every image of the split, sorted; every image needs its labelIds PNG."""
    image_root = require_dir(os.path.join(root, "leftImg8bit", split_dir), TITLE, LAYOUT)
    label_root = require_dir(os.path.join(root, "gtFine", split_dir), TITLE, LAYOUT)
    items, missing = [], []
    for city in sorted(os.listdir(image_root)):
        image_dir = os.path.join(image_root, city)
        if not os.path.isdir(image_dir):
            continue
        label_dir = os.path.join(label_root, city)
        labels = list_files(label_dir) if os.path.isdir(label_dir) else set()
        for name in sorted(list_files(image_dir)):
            if not name.endswith(IMAGE_SUFFIX):
                continue
            stem = name[: -len(IMAGE_SUFFIX)]
            label_name = stem + LABEL_SUFFIX
            if label_name not in labels:
                missing.append(os.path.join(label_dir, label_name))
                continue
            items.append((stem, FilePair(os.path.join(image_dir, name),
                                         os.path.join(label_dir, label_name))))
    if missing:
        raise missing_files_error(
            TITLE, "images without a label: these gtFine labelIds PNGs are missing", missing, LAYOUT)
    if not items:
        raise DatasetLayoutError(
            f"{TITLE}: no *{IMAGE_SUFFIX} images under {image_root}/<city>/; expected layout:\n{LAYOUT}"
        )
    return items


def cache_folder(cache: str, protocol: EvalProtocol, split_dir: str) -> str:
    return os.path.join(cache, FOLDER, protocol.name, split_dir)


def cache_manifest(ids: list[str], protocol: EvalProtocol, split: str) -> dict:
    return make_manifest(ids, protocol.cache_key(), "cityscapes27", split)


def build(cfg: Any, part: str, training: bool) -> SegmentationFiles:
    """Training crops or evaluation items of one part (train or val with gtFine labels)."""
    protocol = protocol_for(cfg.dataset, cfg.eval_protocol)
    root = dataset_root(cfg.data_root)
    items = original_items(root, SPLIT_DIRS[part])
    ids = [stem for stem, _ in items]
    folder = cache_folder(cache_root_of(cfg), protocol, SPLIT_DIRS[part])
    # The val cache holds evaluation crops: training on val images reads the originals.
    cached = not (training and part == "val") and cache_matches(
        manifest_path(folder, MANIFEST_LIST), cache_manifest(ids, protocol, part))
    steps = (protocol.training_steps(train_crop_step(cfg), cached) if training
             else protocol.evaluation_steps(part, cached))
    if cached:
        ext = CACHE_IMAGE_EXT[part]
        pairs = [FilePair(os.path.join(folder, "images", i + ext),
                          os.path.join(folder, "labels", i + ".png")) for i in ids]
        return SegmentationFiles(cfg.dataset, pairs, read_pair, CACHED_LABELS, steps, source=folder)
    return SegmentationFiles(cfg.dataset, [pair for _, pair in items], read_pair, LABELS, steps,
                             source=root)


def part_words(cfg: Any, part: str, training: bool) -> str:
    return (f"leftImg8bit/{SPLIT_DIRS[part]} with gtFine labels (published: "
            f"{PUBLISHED_COUNTS[part]:,} images)")


def describe_splits(cfg: Any) -> dict:
    return {
        "train": part_words(cfg, "train", True),
        "val": part_words(cfg, "val", False),
        "labels": "27 classes: label ids 7..33 -> 0..26, ids 0..6 (void) ignored",
    }


def input_words(cfg: Any) -> str:
    return "RGB"

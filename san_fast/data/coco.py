"""COCO-Stuff-164k as coco27 (27 coarse classes), coco15 (15 stuff classes) and coco3 (sky,
plant, ground), on IIC's curated image lists, as PiCIE, STEGO and IIC use them.

Layout: the one STEGO reads (``<root>/cocostuff``; PiCIE's is the same tree without the
``cocostuff/`` level, which is accepted too). Lists:
- coco27 and coco15: ``Coco164kFull_Stuff_Coarse_7.txt`` (published: 49,629 train / 2,175 val
  images); coco3: ``Coco164kFew_Stuff_6.txt``. Both come from IIC's ``coco164k_prepare.py``:
  keep an image when both sides are >= 360 px and >= 75% of its pixels fall in the target
  coarse classes (the 15 stuff classes; {ground, plant, sky} for the _6 list).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from san_fast.data import labels as L
from san_fast.data._io import (
    CACHE_IMAGE_EXT,
    DatasetFileError,
    FilePair,
    LabelSpace,
    SegmentationFiles,
    cache_matches,
    cache_root_of,
    find_dataset_root,
    layout_error,
    list_files,
    make_manifest,
    manifest_path,
    missing_files_error,
    read_id_list,
    read_pair,
    require_dir,
)
from san_fast.data.transforms import EvalProtocol, protocol_for, train_crop_step

TITLE = "COCO-Stuff-164k"
FOLDER = "cocostuff"
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
LAYOUT = """\
<data-root>/cocostuff/                 (or --data-root pointing at this folder)
  images/train2017/000000000009.jpg ...      COCO 2017 train images (118k)
  images/val2017/000000000139.jpg ...        COCO 2017 val images (5k)
  annotations/train2017/000000000009.png ... stuffthingmaps_trainval2017.zip: fine ids 0-181, 255 unlabeled
  annotations/val2017/000000000139.png ...
  curated/train2017/Coco164kFull_Stuff_Coarse_7.txt   IIC's curated lists (coco27, coco15) ...
  curated/train2017/Coco164kFew_Stuff_6.txt           ... and coco3; optional: prepare builds them
  curated/val2017/Coco164kFull_Stuff_Coarse_7.txt
  curated/val2017/Coco164kFew_Stuff_6.txt"""

LIST_27 = "Coco164kFull_Stuff_Coarse_7.txt"
LIST_3 = "Coco164kFew_Stuff_6.txt"
CURATED_LISTS = {"coco27": LIST_27, "coco15": LIST_27, "coco3": LIST_3}
PUBLISHED_COUNTS = {LIST_27: {"train2017": 49629, "val2017": 2175}}

# IIC's curation rule (coco164k_prepare.py: _size_thresh, _class_thresh, _datasets_to_coarse).
CURATION_MIN_SIDE = 360
CURATION_MIN_FRACTION = 0.75
CURATION_TARGET_COARSE = {
    LIST_27: tuple(range(L.COCO_FIRST_STUFF_COARSE, 27)),
    LIST_3: tuple(L.COCO27_NAMES.index(n, L.COCO_FIRST_STUFF_COARSE) for n in L.COCO3_NAMES),
}

_FINE = "COCO-Stuff fine ids 0-181, or 255 for unlabeled"
_COARSE = "coarse ids 0-26, or 255 (prepare cache)"
FINE_LABELS = {
    "coco27": LabelSpace(L.COCO_FINE_TO_27, L.COCO_FINE_VALID, _FINE),
    "coco15": LabelSpace(L.COCO_FINE_TO_15, L.COCO_FINE_VALID, _FINE),
    "coco3": LabelSpace(L.COCO_FINE_TO_3, L.COCO_FINE_VALID, _FINE),
}
# The cache stores coarse-27 maps, shared by the three label sets.
CACHE_LABELS = LabelSpace(L.COCO_FINE_TO_27, L.COCO_FINE_VALID, _FINE)
CACHED_LABELS = {
    "coco27": LabelSpace(L.COARSE27_TO_27, L.COARSE27_VALID, _COARSE),
    "coco15": LabelSpace(L.COARSE27_TO_15, L.COARSE27_VALID, _COARSE),
    "coco3": LabelSpace(L.COARSE27_TO_3, L.COARSE27_VALID, _COARSE),
}


def dataset_root(data_root: str) -> str:
    return find_dataset_root(data_root, FOLDER, ("images", "annotations"), TITLE, LAYOUT)


def curated_list_candidates(root: str, cache: str, split_dir: str, list_name: str) -> tuple[str, str]:
    """(published copy in the dataset tree, copy built by prepare in the cache)."""
    return (os.path.join(root, "curated", split_dir, list_name),
            os.path.join(cache, FOLDER, "curated", split_dir, list_name))


def find_curated_list(root: str, cache: str, split_dir: str, list_name: str, dataset: str) -> str:
    for path in curated_list_candidates(root, cache, split_dir, list_name):
        if os.path.isfile(path):
            return path
    published, built = curated_list_candidates(root, cache, split_dir, list_name)
    raise layout_error(
        f"{TITLE} curated list {list_name}", published, LAYOUT,
        f"(nor at {built}). Copy IIC's/PiCIE's/STEGO's published lists there, or build them "
        f"from the annotations by IIC's rule with:\n"
        f"  python -m san_fast.data.prepare {dataset} --data-root <data-root>",
    )


def curation_lut(list_name: str) -> np.ndarray:
    """bool[256]: which fine ids count towards IIC's 75% for this list."""
    targets = np.isin(L.COCO_FINE_TO_27, CURATION_TARGET_COARSE[list_name])
    targets[L.IGNORE] = False
    return targets


def meets_curation_rule(label: np.ndarray, target_lut: np.ndarray) -> bool:
    """IIC's ``meets_conditions``: both sides >= 360 and >= 75% of all pixels (unlabeled
    included in the denominator) in the target classes."""
    h, w = label.shape
    if h < CURATION_MIN_SIDE or w < CURATION_MIN_SIDE:
        return False
    return int(target_lut[label].sum()) >= h * w * CURATION_MIN_FRACTION


def original_pairs(root: str, split_dir: str, ids: list[str]) -> list[FilePair]:
    """The listed ids' JPEG + annotation PNG; every one must exist."""
    image_dir = require_dir(os.path.join(root, "images", split_dir), TITLE, LAYOUT)
    label_dir = require_dir(os.path.join(root, "annotations", split_dir), TITLE, LAYOUT)
    images, annotations = list_files(image_dir), list_files(label_dir)
    missing_images = [os.path.join(image_dir, i + ".jpg") for i in ids if i + ".jpg" not in images]
    if missing_images:
        raise missing_files_error(TITLE, "listed images not found", missing_images, LAYOUT)
    missing_labels = [os.path.join(label_dir, i + ".png") for i in ids if i + ".png" not in annotations]
    if missing_labels:
        raise missing_files_error(
            TITLE, "images without a label: these annotation PNGs are missing", missing_labels, LAYOUT)
    return [FilePair(os.path.join(image_dir, i + ".jpg"), os.path.join(label_dir, i + ".png"))
            for i in ids]


def cache_folder(cache: str, protocol: EvalProtocol, split_dir: str) -> str:
    return os.path.join(cache, FOLDER, protocol.name, split_dir)


def cache_manifest(ids: list[str], protocol: EvalProtocol, split: str) -> dict:
    return make_manifest(ids, protocol.cache_key(), "coco-coarse27", split)


def cached_pairs(folder: str, split: str, ids: list[str]) -> list[FilePair]:
    ext = CACHE_IMAGE_EXT[split]
    return [FilePair(os.path.join(folder, "images", i + ext), os.path.join(folder, "labels", i + ".png"))
            for i in ids]


def split_ids(cfg: Any, split: str) -> tuple[str, str, list[str]]:
    """(dataset folder, split dir, listed ids) of one split."""
    root = dataset_root(cfg.data_root)
    split_dir = SPLIT_DIRS[split]
    list_name = CURATED_LISTS[cfg.dataset]
    path = find_curated_list(root, cache_root_of(cfg), split_dir, list_name, cfg.dataset)
    ids = read_id_list(path)
    if not ids:
        raise DatasetFileError(f"curated list {path} is empty")
    return root, split_dir, ids


def build(cfg: Any, part: str, training: bool) -> SegmentationFiles:
    """Training crops or evaluation items of one part (train2017 or val2017 of the list)."""
    if cfg.dataset not in CURATED_LISTS:
        raise ValueError(f"dataset {cfg.dataset!r} is not a COCO-Stuff variant")
    protocol = protocol_for(cfg.dataset, cfg.eval_protocol)
    root, split_dir, ids = split_ids(cfg, part)
    folder = cache_folder(cache_root_of(cfg), protocol, split_dir)
    list_name = CURATED_LISTS[cfg.dataset]
    # The val cache holds evaluation crops: training on val images (IIC's IID) reads originals.
    cached = not (training and part == "val") and cache_matches(
        manifest_path(folder, list_name), cache_manifest(ids, protocol, part))
    steps = (protocol.training_steps(train_crop_step(cfg), cached) if training
             else protocol.evaluation_steps(part, cached))
    if cached:
        return SegmentationFiles(cfg.dataset, cached_pairs(folder, part, ids), read_pair,
                                 CACHED_LABELS[cfg.dataset], steps, source=folder)
    return SegmentationFiles(cfg.dataset, original_pairs(root, split_dir, ids), read_pair,
                             FINE_LABELS[cfg.dataset], steps, source=root)


def _published(list_name: str, split_dir: str) -> str:
    count = PUBLISHED_COUNTS.get(list_name, {}).get(split_dir)
    return f" (published list: {count:,} images)" if count else ""


def part_words(cfg: Any, part: str, training: bool) -> str:
    list_name, split_dir = CURATED_LISTS[cfg.dataset], SPLIT_DIRS[part]
    return f"{split_dir} images in curated/{split_dir}/{list_name}{_published(list_name, split_dir)}"


def describe_splits(cfg: Any) -> dict:
    labels = {
        "coco27": "27 coarse classes (12 things + 15 stuff)",
        "coco15": "15 stuff classes (coarse - 12); thing pixels ignored",
        "coco3": ("sky 0, plant 1, ground 2; all other pixels ignored (IIC scores unlabeled "
                  "pixels as sky; we ignore them, as STEGO)"),
    }[cfg.dataset]
    return {"train": part_words(cfg, "train", True), "val": part_words(cfg, "val", False),
            "labels": labels}


def input_words(cfg: Any) -> str:
    return "RGB (grayscale JPEGs converted to RGB)"

"""Datasets: the embedded synthetic default and the five real benchmarks.

Every dataset yields ``(image, label)``: image a uint8 tensor (C, H, W) with C = 3 (RGB), or 4
for Potsdam's RGB + IR (``input_channels``), label an int64 tensor (H, W) of class ids with 255
for ignored pixels. Training items are crops of ``cfg.crop_size`` (``cfg.train_crop``);
evaluation items follow ``cfg.eval_protocol``; which images train, fit the cluster-to-class
matching and are scored follows ``cfg.eval_split`` (san_fast.data.splits). Conversion to float,
normalisation and memory format happen on the training device, not in the workers.
"""

from __future__ import annotations

import importlib
from typing import Sequence

from torch.utils.data import ConcatDataset, Dataset

from san_fast.config import Config
from san_fast.data.splits import EvalPlan, evaluation_plan

# dataset name -> module in this package with build(cfg, part, training) -> Dataset
_MODULES = {
    "synthetic": "synthetic",
    "coco27": "coco",
    "coco3": "coco",
    "coco15": "coco",
    "cityscapes": "cityscapes",
    "potsdam": "potsdam",
    "potsdam3": "potsdam",
}
SPLITS = ("train", "val")
PARTS = ("train", "val")


def dataset_module(dataset: str):
    if dataset not in _MODULES:
        raise ValueError(f"dataset={dataset!r}: expected one of {sorted(_MODULES)}")
    return importlib.import_module(f"san_fast.data.{_MODULES[dataset]}")


def input_channels(cfg: Config) -> int:
    """Channels of the images the model sees: 4 for Potsdam's RGB + IR (the default bands), else 3."""
    if cfg.dataset in ("potsdam", "potsdam3") and cfg.potsdam_bands == "rgbir":
        return 4
    return 3


class Parts(ConcatDataset):
    """Several parts of one dataset read as one (IIC's IID trains and scores on train + test)."""

    def __init__(self, name: str, parts: Sequence[Dataset]):
        super().__init__(parts)
        self.name = name
        self.source = " + ".join(str(getattr(p, "source", type(p).__name__)) for p in parts)

    def __repr__(self) -> str:
        return f"Parts({self.name}, {len(self)} items, from {self.source})"


def build_parts(cfg: Config, parts: Sequence[str], training: bool) -> Dataset:
    """Training crops (``training``) or evaluation items of the given parts, in order."""
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts={tuple(parts)}: expected one or more of {PARTS}")
    module = dataset_module(cfg.dataset)
    sets = [module.build(cfg, part, training) for part in parts]
    return sets[0] if len(sets) == 1 else Parts(cfg.dataset, sets)


def build_dataset(cfg: Config, split: str) -> Dataset:
    """``train``: what the model trains on (random crops of the plan's training parts: the train
    split, plus the val split under IIC's IID); ``val``: the val split's evaluation items."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if split == "train":
        return build_parts(cfg, evaluation_plan(cfg).train, training=True)
    return build_parts(cfg, ("val",), training=False)


def build_eval_datasets(cfg: Config) -> tuple[EvalPlan, Dataset, Dataset]:
    """(plan, fit set, score set): the labelled images the cluster-to-class matching is fitted
    on and those scored with it; the same object when the plan fits and scores the same images."""
    plan = evaluation_plan(cfg)
    fit = build_parts(cfg, plan.fit, training=False)
    score = fit if not plan.held_out else build_parts(cfg, plan.score, training=False)
    return plan, fit, score

"""Datasets: the embedded synthetic default and the five real benchmarks.

Every dataset yields ``(image, label)``: image a uint8 tensor (3, H, W), label an int64
tensor (H, W) of class ids with 255 for ignored pixels. Training items are crops of
``cfg.crop_size``; validation items follow ``cfg.eval_protocol``. Conversion to float,
normalisation and memory format happen on the training device, not in the workers.
"""

from __future__ import annotations

import importlib

from torch.utils.data import Dataset

from san_fast.config import Config

# dataset name -> module under san_fast.data that defines build(cfg, split)
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


def build_dataset(cfg: Config, split: str) -> Dataset:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    if cfg.dataset not in _MODULES:
        raise ValueError(f"dataset={cfg.dataset!r}: expected one of {sorted(_MODULES)}")
    module = importlib.import_module(f"san_fast.data.{_MODULES[cfg.dataset]}")
    return module.build(cfg, split)

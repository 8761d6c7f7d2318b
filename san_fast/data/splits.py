"""Which images train the model, which fit the cluster-to-class matching, and which are scored
(``cfg.eval_split``), per dataset, as each peer does it.

A plan names *parts* of a dataset: ``train`` and ``val`` (COCO-Stuff: train2017 / val2017 of the
curated list; Cityscapes: train / val; Potsdam: labelled_train (+ unlabelled_train when
training) / labelled_test; synthetic: the train / val scenes). Evaluation reads the labelled
images of a part at the evaluation protocol's resolution and crop; training reads random crops.

- ``val``: train on train, fit and score on val. PiCIE and STEGO on COCO-Stuff-27; STEGO on
  Cityscapes (the default there, "as STEGO"). On IIC's datasets it is STEGO's practice, none of
  IIC's partitions.
- ``train+val`` (Cityscapes only): PiCIE's evaluation set, val + train with gtFine (3,475
  images, data/cityscapes_eval_dataset.py), one matching fitted and scored on the union. PiCIE
  also trains on the test + train_extra images, which this option does not.
- ``iid`` (coco15, coco3, potsdam, potsdam3): IIC's fully unsupervised setting ("IID",
  code/utils/segmentation/data.py): train on train + test (Potsdam: all three lists), fit and
  score on the labelled train + test images. The default for these four: IIC's published numbers,
  and those of the other methods in the paper's Table 2, are IID numbers.
- ``iid+`` (the same four): IIC's held-out setting ("IID+"): train on train (Potsdam:
  labelled + unlabelled train), fit the matching on the labelled train images, score the test
  images with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IIC_DATASETS = ("coco15", "coco3", "potsdam", "potsdam3")
DEFAULT_SPLIT = {"synthetic": "val", "coco27": "val", "cityscapes": "val",
                 "coco15": "iid", "coco3": "iid", "potsdam": "iid", "potsdam3": "iid"}
ALLOWED = {
    "val": tuple(DEFAULT_SPLIT),
    "train+val": ("cityscapes",),
    "iid": IIC_DATASETS,
    "iid+": IIC_DATASETS,
}


@dataclass(frozen=True)
class EvalPlan:
    name: str
    train: tuple[str, ...]  # parts whose images train the model
    fit: tuple[str, ...]  # parts whose labelled images fit the matching
    score: tuple[str, ...]  # parts whose labelled images are scored with it
    follows: str

    @property
    def held_out(self) -> bool:
        """True when the matching is fitted on other images than those scored (IID+)."""
        return self.fit != self.score


def _follows(name: str, dataset: str) -> str:
    if name == "val":
        if dataset == "coco27":
            return "PiCIE and STEGO"
        if dataset == "cityscapes":
            return "STEGO (PiCIE scores val + train: --eval-split train+val)"
        if dataset in IIC_DATASETS:
            return "STEGO's practice (a held-out split, not one of IIC's partitions)"
        return "held-out generated scenes"
    return {"train+val": "PiCIE's Cityscapes evaluation (PiCIE trains on test + train_extra; "
                         "this run trains on train)",
            "iid": "IIC's fully unsupervised IID partitions",
            "iid+": "IIC's held-out IID+ partitions"}[name]


def evaluation_plan(cfg: Any) -> EvalPlan:
    """The plan of ``cfg.eval_split`` for ``cfg.dataset`` ("auto": the dataset's default)."""
    name = DEFAULT_SPLIT.get(cfg.dataset) if cfg.eval_split == "auto" else cfg.eval_split
    if name not in ALLOWED:
        raise ValueError(f"eval_split={cfg.eval_split!r}: expected auto or one of "
                         f"{', '.join(ALLOWED)}")
    if cfg.dataset not in ALLOWED[name]:
        raise ValueError(
            f"--eval-split {name} is defined for {', '.join(ALLOWED[name])}, not "
            f"{cfg.dataset} (train+val is PiCIE's Cityscapes split; iid and iid+ are IIC's "
            f"partitions of {', '.join(IIC_DATASETS)})")
    parts = {"val": (("train",), ("val",), ("val",)),
             "train+val": (("train",), ("val", "train"), ("val", "train")),
             "iid": (("train", "val"), ("train", "val"), ("train", "val")),
             "iid+": (("train",), ("train",), ("val",))}[name]
    return EvalPlan(name, *parts, follows=_follows(name, cfg.dataset))

"""Resizing, cropping and flipping of (image, label) pairs, and the evaluation protocols.

Each step is a small frozen dataclass called as ``step(image, label, generator=None)`` on numpy
arrays (image HxWxC uint8 with C = 3, or 4 for Potsdam's RGB + IR; label HxW uint8 of training
ids, 255 ignored) and returns the new pair. Steps are picklable, so datasets holding them work in
DataLoader workers under any start method. Images are resampled bilinearly, labels by nearest
neighbour; padding, where a crop is larger than the image, is 0 for images and 255 (ignored) for
labels.

Augmentation runs in the workers on uint8 arrays (cheap to pin and copy); colour augmentation
runs on whole batches on the device (san_fast.augment).

Protocols (``cfg.eval_protocol``):
- ``picie`` (PiCIE, Cho et al. 2021; STEGO, Hamilton et al. 2022): short side resized to 320,
  centre crop 320x320. Both peers do this with torchvision on PIL images; the steps below make
  the same PIL calls with torchvision's size and offset rounding (PiCIE's bilinear; STEGO
  resizes images with nearest neighbour, see README, Evaluation protocol).
- ``iic`` (IIC, Ji et al. 2019): COCO-Stuff images prescaled by 0.33 (``cv2.resize`` with
  INTER_LINEAR / INTER_NEAREST, i.e. no antialiasing), then centre crop 128 with IIC's
  ``pad_and_or_crop``; Potsdam tiles kept at 200x200 (centre crop 200 = the whole tile).

Training crops (``cfg.train_crop``), taken from the protocol's base resolution, so training sees
objects at the scale they are evaluated at:
- ``paper``: random ``crop_size`` crops with no resampling ("images are cropped to 128x128");
  a horizontal flip for Potsdam only (the paper augments Potsdam alone, "following IIC").
- ``resized``: torchvision's random resized crop (area ``train_crop_scale``, aspect 3/4-4/3)
  resampled to ``crop_size``, plus a horizontal flip, for every dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image

from san_fast.data.labels import IGNORE

Pair = tuple[np.ndarray, np.ndarray]

# Random resized crop defaults (torchvision's aspect range; area 50-100% of the image at the
# protocol's base resolution). Override with cfg.train_crop_scale = (lo, hi).
TRAIN_CROP_SCALE = (0.5, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5


def _pil_resize(image: np.ndarray, label: np.ndarray, size_wh: tuple[int, int],
                box: Optional[tuple[int, int, int, int]] = None) -> Pair:
    """PIL bilinear (antialiased when shrinking, as torchvision on PIL images) for the image,
    nearest for the label. A 4-channel image (RGB + IR) is resized as RGB plus one 8-bit band:
    as RGBA, PIL would premultiply the IR channel into the colours."""
    if image.ndim == 3 and image.shape[2] == 4:
        rgb, ir = image[:, :, :3], np.ascontiguousarray(image[:, :, 3])
        out_rgb = Image.fromarray(rgb).resize(size_wh, Image.BILINEAR, box=box)
        out_ir = Image.fromarray(ir).resize(size_wh, Image.BILINEAR, box=box)
        out_image = np.concatenate([np.asarray(out_rgb), np.asarray(out_ir)[:, :, None]], axis=2)
    else:
        out_image = np.asarray(Image.fromarray(image).resize(size_wh, Image.BILINEAR, box=box))
    out_label = Image.fromarray(label).resize(size_wh, Image.NEAREST, box=box)
    return out_image, np.asarray(out_label)


@dataclass(frozen=True)
class ResizeShortSide:
    """torchvision ``Resize(size)``: short side to ``size``, long side ``int(size*long/short)``."""

    size: int

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if w <= h:
            return int(self.size * h / w), self.size
        return self.size, int(self.size * w / h)

    def __call__(self, image: np.ndarray, label: np.ndarray, generator=None) -> Pair:
        h, w = label.shape
        oh, ow = self.output_size(h, w)
        if (oh, ow) == (h, w):
            return image, label
        return _pil_resize(image, label, (ow, oh))


def _linear_axis(n_in: int, n_out: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.INTER_LINEAR sample positions along one axis: src = (dst + 0.5) / factor - 0.5,
    clamped to the edges."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / factor - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


@dataclass(frozen=True)
class Rescale:
    """IIC's prescale: ``cv2.resize(fx=fy=factor)``, INTER_LINEAR for images (no antialiasing)
    and INTER_NEAREST for labels; output size rounded as OpenCV does."""

    factor: float

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return max(1, round(h * self.factor)), max(1, round(w * self.factor))

    def __call__(self, image: np.ndarray, label: np.ndarray, generator=None) -> Pair:
        if self.factor == 1.0:
            return image, label
        h, w = label.shape
        oh, ow = self.output_size(h, w)
        y0, y1, wy = _linear_axis(h, oh, self.factor)
        x0, x1, wx = _linear_axis(w, ow, self.factor)
        src = image.astype(np.float32)
        rows = src[y0] * (1.0 - wy)[:, None, None] + src[y1] * wy[:, None, None]
        out = rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
        out_image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        ny = np.minimum(np.floor(np.arange(oh) / self.factor).astype(np.intp), h - 1)
        nx = np.minimum(np.floor(np.arange(ow) / self.factor).astype(np.intp), w - 1)
        return out_image, label[ny[:, None], nx[None, :]]


def _pad(image: np.ndarray, label: np.ndarray, top: int, bottom: int, left: int, right: int) -> Pair:
    if top == bottom == left == right == 0:
        return image, label
    image = np.pad(image, ((top, bottom), (left, right), (0, 0)), constant_values=0)
    label = np.pad(label, ((top, bottom), (left, right)), constant_values=IGNORE)
    return image, label


@dataclass(frozen=True)
class CentreCrop:
    """A ``size`` x ``size`` centre crop, padding first where the image is smaller.

    rounding="torchvision": torchvision ``center_crop`` (PiCIE, STEGO): pad (d//2, (d+1)//2),
    top = round((h - size) / 2). rounding="iic": IIC's ``pad_and_or_crop(mode="centre")``:
    the image sits at int(new/2) - int(old/2), top = int(h/2) - int(size/2).
    """

    size: int
    rounding: str = "torchvision"

    def __call__(self, image: np.ndarray, label: np.ndarray, generator=None) -> Pair:
        s = self.size
        h, w = label.shape
        if self.rounding == "torchvision":
            dh, dw = max(s - h, 0), max(s - w, 0)
            image, label = _pad(image, label, dh // 2, (dh + 1) // 2, dw // 2, (dw + 1) // 2)
            h, w = label.shape
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        elif self.rounding == "iic":
            nh, nw = max(h, s), max(w, s)
            pt, pl = nh // 2 - h // 2, nw // 2 - w // 2
            image, label = _pad(image, label, pt, nh - h - pt, pl, nw - w - pl)
            h, w = label.shape
            top, left = h // 2 - s // 2, w // 2 - s // 2
        else:
            raise ValueError(f"CentreCrop rounding={self.rounding!r}: expected torchvision or iic")
        return image[top:top + s, left:left + s], label[top:top + s, left:left + s]


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=generator))


def _randint(lo: int, hi_inclusive: int, generator: Optional[torch.Generator]) -> int:
    return int(torch.randint(lo, hi_inclusive + 1, (1,), generator=generator))


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """torchvision's RandomResizedCrop box sampling (10 tries, then a centre crop of clamped
    aspect), resized to ``size`` x ``size``, then a horizontal flip with probability
    ``flip_p``. Pass a torch.Generator for a reproducible draw; None uses torch's default
    generator (seeded per DataLoader worker)."""

    size: int
    scale: tuple[float, float] = TRAIN_CROP_SCALE
    ratio: tuple[float, float] = TRAIN_CROP_RATIO
    flip_p: float = FLIP_P

    def sample(self, h: int, w: int, generator: Optional[torch.Generator] = None
               ) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip) of one draw."""
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        box = None
        for _ in range(10):
            target = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                box = (_randint(0, h - ch, generator), _randint(0, w - cw, generator), ch, cw)
                break
        if box is None:
            in_ratio = w / h
            if in_ratio < min(self.ratio):
                cw, ch = w, int(round(w / min(self.ratio)))
            elif in_ratio > max(self.ratio):
                ch, cw = h, int(round(h * max(self.ratio)))
            else:
                cw, ch = w, h
            box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
        flip = float(torch.rand(1, generator=generator)) < self.flip_p
        return (*box, flip)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 generator: Optional[torch.Generator] = None) -> Pair:
        h, w = label.shape
        top, left, ch, cw, flip = self.sample(h, w, generator)
        image, label = _pil_resize(image, label, (self.size, self.size),
                                   box=(left, top, left + cw, top + ch))
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        return image, label

    def words(self) -> str:
        return (f"random resized crop to {self.size}x{self.size} (area {self.scale[0]:g}-"
                f"{self.scale[1]:g}, aspect 3/4-4/3, bilinear / nearest), horizontal flip "
                f"p={self.flip_p:g}")


@dataclass(frozen=True)
class RandomCropFlip:
    """The paper's training crop: a random ``size`` x ``size`` window of the image as it is (no
    resampling), after centred padding (0 for images, 255 for labels) where the image is
    smaller, then a horizontal flip with probability ``flip_p``. IIC's training crops are also
    random windows at the evaluation scale (``pad_and_or_crop(mode="random")`` in
    code/datasets/segmentation/cocostuff.py and potsdam.py)."""

    size: int
    flip_p: float = 0.0

    def sample(self, h: int, w: int, generator: Optional[torch.Generator] = None
               ) -> tuple[int, int, bool]:
        """(top, left, flip) of one draw on an image of at least size x size."""
        top = _randint(0, h - self.size, generator)
        left = _randint(0, w - self.size, generator)
        flip = self.flip_p > 0 and float(torch.rand(1, generator=generator)) < self.flip_p
        return top, left, flip

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 generator: Optional[torch.Generator] = None) -> Pair:
        s = self.size
        h, w = label.shape
        dh, dw = max(s - h, 0), max(s - w, 0)
        image, label = _pad(image, label, dh // 2, (dh + 1) // 2, dw // 2, (dw + 1) // 2)
        top, left, flip = self.sample(*label.shape, generator)
        image, label = image[top:top + s, left:left + s], label[top:top + s, left:left + s]
        if flip:
            image, label = image[:, ::-1], label[:, ::-1]
        return image, label

    def words(self) -> str:
        flip = f", horizontal flip p={self.flip_p:g}" if self.flip_p else ", no flip"
        return (f"random {self.size}x{self.size} crop, no resampling (padding 0 / 255 where the "
                f"image is smaller){flip}")


# --- training crops and protocols --------------------------------------------------------------

PICIE_FOLLOWS = "PiCIE (Cho et al. 2021) and STEGO (Hamilton et al. 2022)"
IIC_FOLLOWS = "IIC (Ji, Henriques and Vedaldi 2019)"
POTSDAM_DATASETS = ("potsdam", "potsdam3")
TrainCrop = Union[RandomCropFlip, RandomResizedCropFlip]


def train_crop_scale(cfg: Any) -> tuple[float, float]:
    scale = tuple(getattr(cfg, "train_crop_scale", TRAIN_CROP_SCALE))
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"train_crop_scale={scale}: expected (lo, hi) with 0 < lo <= hi <= 1")
    return float(scale[0]), float(scale[1])


def train_crop_step(cfg: Any) -> TrainCrop:
    """The training crop of ``cfg.train_crop`` (see the module docstring)."""
    if cfg.train_crop == "paper":
        # The paper flips Potsdam only ("For the POTSDAM dataset, we applied ... horizontal
        # flipping ... following IIC"); its other datasets get the crop alone.
        return RandomCropFlip(cfg.crop_size, FLIP_P if cfg.dataset in POTSDAM_DATASETS else 0.0)
    if cfg.train_crop == "resized":
        return RandomResizedCropFlip(cfg.crop_size, scale=train_crop_scale(cfg))
    raise ValueError(f"train_crop={cfg.train_crop!r}: expected paper or resized")


@dataclass(frozen=True)
class EvalProtocol:
    """Where images are resampled before both training crops and evaluation (``base``), and the
    evaluation crop. The prepare cache stores train images after ``base`` and val images after
    ``base`` + ``crop``; the step lists below say what remains to do for an item read from the
    original files or from the cache."""

    name: str
    follows: str
    base: Optional[Any]  # ResizeShortSide | Rescale | None
    crop: CentreCrop

    def _base(self) -> list:
        return [self.base] if self.base is not None else []

    def cache_steps(self, split: str) -> list:
        return self._base() if split == "train" else self._base() + [self.crop]

    def training_steps(self, train_crop: TrainCrop, from_cache: bool) -> list:
        """A training item: the cache holds train images at the base resolution already."""
        return ([] if from_cache else self._base()) + [train_crop]

    def evaluation_steps(self, split: str, from_cache: bool) -> list:
        """An evaluation item of either split (IIC's partitions also score train images): the
        cache holds val images cropped and train images at the base resolution."""
        if from_cache:
            return [] if split == "val" else [self.crop]
        return self._base() + [self.crop]

    def cache_key(self) -> str:
        """Identifies what a cache built for this protocol holds (checked by the loaders)."""
        return f"{self.name}:{self.base!r}:{self.crop!r}"

    def base_words(self) -> str:
        if isinstance(self.base, ResizeShortSide):
            return (f"short side resized to {self.base.size} (PIL bilinear for images, nearest "
                    "for labels), long side int(size*long/short)")
        if isinstance(self.base, Rescale):
            return (f"prescaled by {self.base.factor} (bilinear without antialiasing for images, "
                    "as cv2.INTER_LINEAR; nearest for labels)")
        return "native resolution, no resize"


def protocol_for(dataset: str, protocol: str) -> EvalProtocol:
    family = dataset_family(dataset)
    if protocol == "picie":
        return EvalProtocol("picie", PICIE_FOLLOWS, ResizeShortSide(320), CentreCrop(320))
    if protocol == "iic":
        if family == "cocostuff":
            return EvalProtocol("iic", IIC_FOLLOWS, Rescale(0.33), CentreCrop(128, "iic"))
        if family == "potsdam":
            return EvalProtocol("iic", IIC_FOLLOWS, None, CentreCrop(200, "iic"))
        raise ValueError(
            f"eval_protocol='iic' is defined for IIC's datasets (coco3, coco15, coco27, potsdam, "
            f"potsdam3), not {dataset}: IIC never evaluated on it. Cityscapes follows "
            "PiCIE/STEGO: use --eval-protocol picie"
        )
    raise ValueError(f"eval_protocol={protocol!r}: expected picie or iic")


_FAMILIES = {"coco27": "cocostuff", "coco15": "cocostuff", "coco3": "cocostuff",
             "cityscapes": "cityscapes", "potsdam": "potsdam", "potsdam3": "potsdam"}


def dataset_family(dataset: str) -> str:
    """The source dataset a name reads: coco27/15/3 share COCO-Stuff's files."""
    try:
        return _FAMILIES[dataset]
    except KeyError:
        raise ValueError(f"dataset {dataset!r}: expected one of {', '.join(_FAMILIES)}") from None


def protocol_description(cfg: Any) -> dict:
    """Everything a run's scores depend on besides the weights, for metrics.json: data, input
    bands, crops, the evaluation split and matching, the over-clustering rule, the model variant.
    (Assembled in san_fast.data.describe; kept importable from here for the trainer.)"""
    from san_fast.data.describe import run_description  # it reaches the model and metrics modules

    return run_description(cfg)

"""The embedded default dataset: seeded procedural scenes of textured regions.

Each image is a warped Voronoi partition into 2-5 regions; each region is painted with the
"material" of its class. A material is fixed per class index (it depends on the class id
only, not on the dataset seed or the class count), so class ``k`` looks the same in every
run and ``class_names`` can describe it. A material is a texture pattern (stripes, checker,
dots, ...) with its own period and orientation, modulating a mean colour along a colour
axis. Classes come in pairs sharing a mean colour, and every image gets its own lighting
(gain, offset, colour cast, gentle shading gradient), so the colour of one pixel says little
about its class: a baseline clustering pixel colours is confused, while a model that looks at
a few pixels of neighbourhood (texture, local contrast, colour axis) can separate the classes.

Items are rendered on the fly in ``__getitem__`` from a seed derived from
``(seed, split, index)``: no files, identical in every worker and on every machine.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from san_fast.data.transforms import train_crop_step

TEXTURES = ("stripes", "flat", "checker", "grain", "dots", "noise", "hatch", "waves")

# Material library. A fixed constant, not the dataset seed: class k is the same material in
# train and val and across seeds, which is what makes it a class.
_MATERIAL_SEED = 20230207
_SPLIT_IDS = {"train": 0, "val": 1}

# Difficulty knobs, in units of [0, 1] colour.
_PERIOD_RANGE = (3.5, 8.0)  # texture period in pixels: visible inside a 3x3-9x9 window
_AMPLITUDE_RANGE = (0.13, 0.22)  # half peak-to-peak modulation along the colour axis
# How far the two classes of a pair sit from their common base colour. Pairs within a few
# hundredths are indistinguishable to any colour-reconstruction objective (SAN's included), so
# the pairs differ by a shade, which strong lighting then makes ambiguous pixel by pixel.
_PAIR_COLOUR_DELTA = 0.25
_PIXEL_NOISE = 0.025
# Per-image multiplicative lighting: the main reason colour alone is not enough. Measured
# (3 seeds, cpu preset): SAN, which sees the whole image, adapts to it; k-means on pixels cannot.
_GAIN_RANGE = (0.5, 1.5)
_OFFSET_RANGE = (0.0, 0.0)  # per-image additive lighting
_CAST_STD = 0.0  # per-image, per-channel log-gain (colour cast)
_SHADING = 0.12  # amplitude of a per-image linear illumination gradient across the image
_WARP = 0.12  # boundary warp as a fraction of the image size


@dataclass(frozen=True)
class Material:
    texture: str
    period: float  # pixels
    angle: float  # radians
    mean: np.ndarray  # (3,) RGB in [0, 1]
    axis: np.ndarray  # (3,) unit colour direction the pattern modulates along
    amplitude: float
    name: str


def _hue_name(hue: float) -> str:
    names = ((0.04, "red"), (0.10, "orange"), (0.17, "yellow"), (0.24, "lime"), (0.40, "green"),
             (0.47, "teal"), (0.54, "cyan"), (0.64, "blue"), (0.74, "violet"), (0.83, "purple"),
             (0.94, "magenta"), (1.01, "red"))
    return next(name for bound, name in names if hue < bound)


@functools.lru_cache(maxsize=None)
def material(k: int) -> Material:
    """Class ``k``'s material. Classes 2g and 2g+1 share a base colour (up to a shade) and differ
    in texture."""
    if k < 0:
        raise ValueError(f"class id must be >= 0, got {k}")
    group = k // 2
    group_rng = np.random.default_rng([_MATERIAL_SEED, 1, group])
    # Golden-ratio hue steps keep successive groups far apart on the colour wheel.
    hue = (0.02 + group * 0.618034) % 1.0
    saturation = group_rng.uniform(0.35, 0.6)
    value = group_rng.uniform(0.45, 0.65)
    shared = np.array(colorsys.hsv_to_rgb(hue, saturation, value))

    rng = np.random.default_rng([_MATERIAL_SEED, 2, k])
    mean = np.clip(shared + rng.uniform(-_PAIR_COLOUR_DELTA, _PAIR_COLOUR_DELTA, 3), 0.15, 0.85)
    axis = rng.normal(size=3)
    if k % 2 == 0:
        # One member of each pair modulates mostly brightness, the other mostly chroma, so
        # their local colour statistics differ even where their textures look alike.
        axis = axis * 0.35 + np.ones(3)
    else:
        axis = axis - axis.mean()
    axis = axis / np.linalg.norm(axis)
    texture = TEXTURES[k % len(TEXTURES)]
    tone = "dark " if value < 0.5 else ("pale " if saturation < 0.42 else "")
    return Material(
        texture=texture,
        period=float(rng.uniform(*_PERIOD_RANGE)),
        angle=float(rng.uniform(0.0, math.pi)),
        mean=mean,
        axis=axis,
        amplitude=float(rng.uniform(*_AMPLITUDE_RANGE)),
        name=f"{tone}{_hue_name(hue)} {texture}",
    )


def class_names(num_classes: int) -> list[str]:
    """Readable, unique names of the first ``num_classes`` materials (e.g. 'teal checker')."""
    names: list[str] = []
    for k in range(num_classes):
        name = material(k).name
        if name in names:
            name = f"{name} {k}"
        names.append(name)
    return names


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) Gaussian resampling: M @ grid @ M.T turns white noise into smooth noise."""
    pos = (np.arange(n_out) + 0.5) * (n_in - 1) / n_out
    w = np.exp(-0.5 * ((pos[:, None] - np.arange(n_in)[None, :]) / 0.6) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise varying over about size / cells pixels."""
    m = _smoothing_matrix(size, cells + 2)
    field = m @ rng.standard_normal((cells + 2, cells + 2), dtype=np.float32) @ m.T
    return (field - field.mean()) / (field.std() + 1e-6)


def _pattern(mat: Material, rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The material's texture over the whole image, values in about [-1, 1]."""
    size = x.shape[0]
    freq = 2.0 * math.pi / mat.period
    c, s = math.cos(mat.angle), math.sin(mat.angle)
    u = (x * c + y * s) * freq + rng.uniform(0, 2 * math.pi)
    v = (y * c - x * s) * freq + rng.uniform(0, 2 * math.pi)
    t = mat.texture
    if t == "stripes":
        return np.sin(u)
    if t == "flat":
        return np.zeros_like(x)
    if t == "checker":
        return np.tanh(3.0 * np.sin(u) * np.sin(v))
    if t == "grain":
        return rng.uniform(-1.0, 1.0, x.shape).astype(np.float32)
    if t == "dots":
        return np.tanh(4.0 * (np.cos(u) + np.cos(v) - 0.8))
    if t == "noise":
        cells = max(2, int(round(2.0 * size / mat.period)))
        return np.clip(0.6 * _smooth_noise(rng, size, cells), -1.0, 1.0)
    if t == "hatch":
        return np.tanh(4.0 * (np.maximum(np.sin(u), np.sin(v)) - 0.55))
    if t == "waves":
        return np.sin(u + 1.6 * np.sin(0.5 * v))
    raise ValueError(f"unknown texture {t!r}: expected one of {TEXTURES}")


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _partition(rng: np.random.Generator, size: int, num_regions: int) -> np.ndarray:
    """Region id per pixel: a power-weighted Voronoi diagram with smoothly warped boundaries."""
    x, y = _grid(size)
    warp = _WARP * size
    wx = x + warp * _smooth_noise(rng, size, 3)
    wy = y + warp * _smooth_noise(rng, size, 3)
    sites = rng.uniform(0, size, (num_regions, 2)).astype(np.float32)
    weights = rng.uniform(0, 0.15 * size * size, num_regions).astype(np.float32)
    d = (wx[None] - sites[:, 0, None, None]) ** 2 + (wy[None] - sites[:, 1, None, None]) ** 2
    return np.argmin(d - weights[:, None, None], axis=0)


def render(num_classes: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (3, size, size) and labels int64 (size, size)."""
    num_regions = int(rng.integers(2, 6))
    distinct = min(num_regions, num_classes)
    classes = rng.choice(num_classes, size=distinct, replace=False)
    if num_regions > distinct:
        classes = np.concatenate([classes, rng.integers(0, num_classes, num_regions - distinct)])
    regions = _partition(rng, size, num_regions)

    # Per-image rotation and scale, so a texture is not pixel-aligned the same way in every image.
    x, y = _grid(size)
    angle = rng.uniform(-0.25, 0.25)
    scale = rng.uniform(0.9, 1.1)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    xr, yr = x * c - y * s, x * s + y * c

    image = np.empty((3, size, size), np.float32)
    for r, k in enumerate(classes):
        mask = regions == r
        if not mask.any():
            continue
        mat = material(int(k))
        p = _pattern(mat, rng, xr, yr)
        colour = mat.mean[:, None, None] + (mat.amplitude * mat.axis)[:, None, None] * p[None]
        np.copyto(image, colour, where=mask[None])
    labels = classes[regions].astype(np.int64)

    image += _PIXEL_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
    gain = rng.uniform(*_GAIN_RANGE) * np.exp(rng.normal(0.0, _CAST_STD, 3))
    gx, gy = rng.normal(size=2) * _SHADING / math.sqrt(2)
    shading = 1.0 + (gx * (x / size - 0.5) + gy * (y / size - 0.5))
    light = gain[:, None, None].astype(np.float32) * shading[None]
    image = image * light + rng.uniform(*_OFFSET_RANGE)
    image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, labels


class SyntheticScenes(Dataset):
    """``length`` seeded scenes of ``size`` x ``size`` pixels over ``num_classes`` materials.

    Item ``i`` depends only on ``(seed, split, i)``; ``split`` selects an independent random
    stream, so train and val never share a scene. ``transform`` (a training crop step of
    san_fast.data.transforms) is applied to each rendered scene, drawing from torch's default
    generator like the real datasets' steps. ``cache=True`` keeps rendered scenes in memory
    (off by default: rendering costs about a millisecond, and a cache would be copied into
    every DataLoader worker).
    """

    def __init__(self, num_classes: int, size: int, length: int, seed: int, split: str = "train",
                 cache: bool = False, transform: Optional[Callable] = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if split not in _SPLIT_IDS:
            raise ValueError(f"split={split!r}: expected one of {tuple(_SPLIT_IDS)}")
        self.num_classes = num_classes
        self.size = size
        self.length = length
        self.seed = seed
        self.split = split
        self.transform = transform
        self.class_names = class_names(num_classes)
        self._cache: Optional[dict[int, tuple[np.ndarray, np.ndarray]]] = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The rendered scene ``index``: image uint8 (3, size, size), labels int64 (size, size)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic scenes")
        index %= self.length
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        item = render(self.num_classes, self.size, rng)
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = self.scene(index)
        if self.transform is not None:
            # The steps work on HxWxC uint8 images and uint8 labels with 255 = ignored padding.
            hwc, small = self.transform(image.transpose(1, 2, 0), labels.astype(np.uint8))
            image = np.ascontiguousarray(hwc.transpose(2, 0, 1))
            labels = small.astype(np.int64)
        return torch.from_numpy(image), torch.from_numpy(labels)


def image_size(cfg) -> int:
    """Side of the generated scenes: ``cfg.synthetic_image_size`` when set (training then takes
    ``crop_size`` crops of them and evaluation sees whole scenes), else ``crop_size``."""
    size = getattr(cfg, "synthetic_image_size", None) or cfg.crop_size
    if size < cfg.crop_size:
        raise ValueError(f"synthetic_image_size={size} is smaller than crop_size={cfg.crop_size}: "
                         "training crops are cut from the scenes")
    if size % cfg.patch_size:
        raise ValueError(f"synthetic_image_size={size} must be a multiple of patch_size="
                         f"{cfg.patch_size}")
    return size


def build(cfg, part: str, training: bool) -> SyntheticScenes:
    """The synthetic scenes of a Config: training items are the configured training crop of each
    scene (the identity for the paper's crop while scenes are crop_size); evaluation items are
    whole scenes."""
    if part not in _SPLIT_IDS:
        raise ValueError(f"split={part!r}: expected one of {tuple(_SPLIT_IDS)}")
    length = cfg.synthetic_train_size if part == "train" else cfg.synthetic_val_size
    return SyntheticScenes(cfg.synthetic_classes, image_size(cfg), length, cfg.synthetic_seed, part,
                           transform=train_crop_step(cfg) if training else None)


def part_words(cfg, part: str, training: bool) -> str:
    length = cfg.synthetic_train_size if part == "train" else cfg.synthetic_val_size
    size = image_size(cfg)
    return f"{length} generated {part} scenes of {size}x{size}"


def input_words(cfg) -> str:
    return "RGB (generated)"

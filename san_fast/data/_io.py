"""Shared by the real-dataset loaders: reading images, labels and .mat tiles, atomic writes,
layout errors, and the Dataset that turns (image, label) files into training items.

Everything here runs inside DataLoader workers, so it decodes to numpy uint8 and leaves
conversion to float for the training device.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from san_fast.io_utils import atomic_write


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder, split list or file is missing: the message shows the expected tree."""


class DatasetFileError(ValueError):
    """A file is present but unusable: corrupt, wrong shape, or label values out of range."""


def layout_error(dataset: str, path: str, layout: str, hint: str = "") -> DatasetLayoutError:
    message = f"{dataset} not found at {path}; expected layout:\n{layout.rstrip()}"
    if hint:
        message += f"\n{hint}"
    return DatasetLayoutError(message)


def find_dataset_root(data_root: str, folder: str, markers: Sequence[str], dataset: str,
                      layout: str) -> str:
    """The dataset's own folder: ``<data_root>/<folder>`` or ``data_root`` itself when the user
    pointed straight at it (it then holds the marker folders)."""
    if not data_root:
        raise ValueError(f"{dataset} is read from disk: pass --data-root DIR (expected layout:\n"
                         f"{layout.rstrip()})")
    candidates = (os.path.join(data_root, folder), data_root)
    for candidate in candidates:
        if all(os.path.isdir(os.path.join(candidate, m)) for m in markers):
            return candidate
    missing = [m for m in markers if not os.path.isdir(os.path.join(candidates[0], m))]
    raise layout_error(
        dataset, candidates[0], layout,
        f"(missing: {', '.join(m + '/' for m in missing)}; --data-root may also point at the "
        f"{folder}/ folder itself)",
    )


def require_dir(path: str, dataset: str, layout: str) -> str:
    if not os.path.isdir(path):
        raise layout_error(dataset, path, layout)
    return path


def list_files(folder: str) -> set[str]:
    """File names in a folder: one listdir instead of a stat per file, which matters for the
    118k files of COCO on network storage."""
    with os.scandir(folder) as entries:
        return {e.name for e in entries}


def read_id_list(path: str) -> list[str]:
    """One id per line, as IIC's, PiCIE's and STEGO's split lists; blank lines are skipped and an
    image extension, if a list carries one, is dropped. An id is a bare file name: one holding a
    folder or '..' (which would read files outside the dataset) or listed twice is an error."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        i = os.path.splitext(line)[0] if line.endswith((".jpg", ".png", ".mat")) else line
        if "/" in i or "\\" in i or os.sep in i or ".." in i:
            raise DatasetFileError(f"split list {path}, line {number}: id {line!r} holds a path separator or "
                                   "'..': expected a bare file name")
        if i in first_line:
            raise DatasetFileError(f"split list {path}: id {i!r} is listed twice (lines {first_line[i]} "
                                   f"and {number})")
        first_line[i] = number
        ids.append(i)
    return ids


def ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def missing_files_error(dataset: str, headline: str, missing: Sequence[str], layout: str,
                        hint: str = "") -> DatasetLayoutError:
    shown = "\n  ".join(missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    message = (f"{dataset}: {headline} ({len(missing)}):\n  {shown}{more}\n"
               f"expected layout:\n{layout.rstrip()}")
    if hint:
        message += f"\n{hint}"
    return DatasetLayoutError(message)


# --- reading ---------------------------------------------------------------------------------


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8. Grayscale, palette, CMYK and RGBA files are converted to RGB (COCO has a
    few grayscale JPEGs); an unreadable file raises DatasetFileError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, ... on bad bytes
        raise DatasetFileError(f"cannot decode image {path}: {err}") from err


def read_label_png(path: str) -> np.ndarray:
    """(H, W) uint8 raw label values from a single-channel PNG (mode L, P, or 16-bit I)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            label = np.asarray(im)
    except FileNotFoundError:
        raise
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, ... on bad bytes
        raise DatasetFileError(f"cannot decode label {path}: {err}") from err
    if label.ndim != 2:
        raise DatasetFileError(
            f"label {path} has mode {mode} with {label.shape[-1]} channels: expected a "
            "single-channel PNG of label ids (mode L or P)"
        )
    return to_uint8_label(label, path)


def to_uint8_label(label: np.ndarray, path: str) -> np.ndarray:
    if label.dtype == np.uint8:
        return label
    if label.size and (label.min() < 0 or label.max() > 255):
        raise DatasetFileError(
            f"label {path}: values {int(label.min())}..{int(label.max())} out of range 0..255"
        )
    return label.astype(np.uint8)


def read_mat(path: str, key: str) -> np.ndarray:
    """One array from a MATLAB .mat file (IIC's Potsdam tiles)."""
    from scipy.io import loadmat  # scipy's import is slow; only Potsdam needs it

    try:
        content = loadmat(path, variable_names=[key])
    except FileNotFoundError:
        raise
    except Exception as err:  # scipy raises MatReadError, struct.error, zlib.error, ... on bad bytes
        raise DatasetFileError(f"cannot read .mat file {path}: {err}") from err
    if key not in content:
        raise DatasetFileError(f"{path}: no variable {key!r} in this .mat file")
    return content[key]


def check_label_values(label: np.ndarray, valid: np.ndarray, path: str, expected: str) -> None:
    """Raise when a raw label holds a value outside the dataset's label set."""
    if not valid[label].all():
        bad = np.unique(label[~valid[label]])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
        raise DatasetFileError(f"label {path}: values {shown} out of range (expected {expected})")


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: str, label_path: str) -> None:
    if image.shape[:2] != label.shape:
        raise DatasetFileError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
            f"{label_path} is {label.shape[1]}x{label.shape[0]}"
        )


# --- writing ---------------------------------------------------------------------------------


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless: labels, and evaluation images so cached evaluation equals uncached) or
    JPEG at quality 95 (training images, where decode speed matters more)."""
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def save_array_image(path: str, array: np.ndarray, fmt: str) -> None:
    data = encode_image(array, fmt)
    atomic_write(path, lambda f: f.write(data))


# --- the prepare cache -----------------------------------------------------------------------

CACHE_FORMAT = 1
CACHE_FOLDER = "san_fast_cache"
# Cached training images are JPEG (fast to decode); cached evaluation images PNG, so cached
# and uncached evaluation give identical pixels.
CACHE_IMAGE_EXT = {"train": ".jpg", "val": ".png"}


def cache_root(data_root: str, override: Optional[str] = None) -> str:
    """``--out`` of prepare (cfg.data_cache for the loaders) or ``<data_root>/san_fast_cache``."""
    return override or os.path.join(data_root, CACHE_FOLDER)


def cache_root_of(cfg: Any) -> str:
    return cache_root(cfg.data_root, getattr(cfg, "data_cache", None))


def manifest_path(folder: str, list_name: str) -> str:
    return os.path.join(folder, f"manifest-{list_name}.json")


def make_manifest(ids: Sequence[str], protocol_key: str, label_space: str, split: str) -> dict:
    return {"format": CACHE_FORMAT, "protocol": protocol_key, "label_space": label_space,
            "split": split, "count": len(ids), "ids_sha1": ids_digest(ids)}


def cache_matches(path: str, expected: dict, warn: bool = True) -> bool:
    """True when prepare completed a cache for exactly these ids and settings. A manifest that
    exists but differs (list edited, protocol changed) is reported and the originals are read."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = None
    if found == expected:
        return True
    if warn:
        warnings.warn(f"ignoring stale cache {os.path.dirname(path)} (its manifest does not "
                      "match the current list or protocol); reading the original files. "
                      "Re-run `python -m san_fast.data.prepare` to refresh it.", stacklevel=3)
    return False


# --- the Dataset -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FilePair:
    image: str
    label: Optional[str]  # None: no annotation (every pixel ignored)


def read_pair(pair: FilePair) -> tuple[np.ndarray, np.ndarray]:
    """Image file + single-channel label PNG of the same size."""
    image = read_rgb(pair.image)
    if pair.label is None:
        return image, np.full(image.shape[:2], 255, dtype=np.uint8)
    label = read_label_png(pair.label)
    check_same_size(image, label, pair.image, pair.label)
    return image, label


PairReader = Callable[[Any], tuple[np.ndarray, np.ndarray]]
PairStep = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class LabelSpace:
    """How raw label values of one file format become training ids."""

    lut: np.ndarray  # uint8[256], raw -> training id, 255 ignored
    valid: np.ndarray  # bool[256], raw values allowed in a file
    expected: str  # the valid values in words, for error messages


class SegmentationFiles(Dataset):
    """Items ``(image uint8 (3, H, W), label int64 (H, W))`` from a list of samples.

    ``reader(sample)`` decodes one sample to ``(image HxWx3 uint8, raw label HxW uint8)``; raw
    values are checked against ``labels.valid`` and mapped through ``labels.lut`` at full size,
    then ``steps`` (resize, crop, flip) run in order. Randomness comes from torch's default
    generator, which the DataLoader seeds per worker from the main process's seed, so an epoch
    is reproducible given ``torch.manual_seed`` and the number of workers.
    """

    def __init__(self, name: str, samples: Sequence[Any], reader: PairReader, labels: LabelSpace,
                 steps: Sequence[PairStep], source: str):
        self.name = name
        self.samples = list(samples)
        self.reader = reader
        self.labels = labels
        self.steps = list(steps)
        self.source = source  # the dataset folder or the cache folder read, for logs

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, generator: Optional[torch.Generator] = None
             ) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image, raw = self.reader(sample)
        check_label_values(raw, self.labels.valid, _label_path(sample), self.labels.expected)
        label = self.labels.lut[raw]
        for step in self.steps:
            image, label = step(image, label, generator)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(label.astype(np.int64)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} items, from {self.source})"


def _label_path(sample: Any) -> str:
    return str(getattr(sample, "label", None) or getattr(sample, "image", sample))


def sample_files(sample: Any) -> list[str]:
    """The files a sample reads: its image, then its label when it has one (FilePair, Potsdam's
    Tile and any sample with ``image`` / ``label`` paths); a plain path is its own file."""
    if isinstance(sample, (str, os.PathLike)):
        return [str(sample)]
    files = [str(sample.image)]
    if getattr(sample, "label", None) is not None:
        files.append(str(sample.label))
    return files

"""Image files for prediction: finding them, and decoding any of them to 8-bit pixels.

Pillow decodes many layouts; what it leaves to the caller is mapping them onto the 8-bit RGB
(or RGB + IR) pixels the model was trained on: 16-bit and 32-bit gray, float TIFFs, palettes,
alpha, EXIF rotation, and images too large to hold at full size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_EXIF_ORIENTATION = 0x0112
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageFile:
    path: Path
    name: str  # how the file is named in messages and outputs: relative to its input folder


@dataclass
class Decoded:
    pixels: np.ndarray  # (h, w, C) uint8 at the size the model sees
    size: tuple[int, int]  # (W, H) of the image as displayed (EXIF rotation applied)


def find_images(inputs: Sequence[str]) -> tuple[list[ImageFile], list[str]]:
    """Files named directly are taken whatever their suffix (a non-image fails when read);
    folders are searched recursively for IMAGE_SUFFIXES. Returns the files and the inputs that
    do not exist."""
    files: list[ImageFile] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            candidates = [ImageFile(p, str(p.relative_to(path))) for p in found]
        elif path.is_file():
            candidates = [ImageFile(path, path.name)]
        else:
            missing.append(entry)
            continue
        for item in candidates:
            if item.path.resolve() not in seen:
                seen.add(item.path.resolve())
                files.append(item)
    return files, missing


def output_stems(files: Sequence[ImageFile]) -> list[str]:
    """Output names without suffix: the relative name's stem, or, where two inputs share a stem
    (x.png and x.jpg, or the same name in two input folders), stem + suffix, then a counter."""
    stems = [str(Path(f.name).with_suffix("")) for f in files]
    counts = {s: stems.count(s) for s in stems}
    used: set[str] = set()
    out = []
    for f, stem in zip(files, stems):
        if counts[stem] > 1:
            stem = f"{stem}_{Path(f.name).suffix.lstrip('.').lower()}"
        candidate, k = stem, 1
        while candidate in used:
            candidate, k = f"{stem}_{k}", k + 1
        used.add(candidate)
        out.append(candidate)
    return out


def _scaled(size: tuple[int, int], max_side: Optional[int]) -> tuple[int, int]:
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_uint8(image: Image.Image, channels: int) -> np.ndarray:
    """(H, W, channels) uint8 from any Pillow mode."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                raise ValueError("float image with values outside [0, 1]")
            values = values * 255.0
        else:  # 16-bit (and 32-bit integer) gray: the 16-bit range maps onto 0-255
            values = np.clip(values, 0, 65535) / 257.0
        gray = np.round(values).astype(np.uint8)[..., None]
        if channels != 3:
            raise ValueError(f"gray image, but the model takes {channels} channels (RGB + IR)")
        return np.repeat(gray, 3, axis=-1)
    if channels == 4:
        if len(image.getbands()) != 4 or mode == "CMYK":
            raise ValueError(f"the model takes 4-channel images (RGB + IR); this one is {mode}")
        return np.asarray(image.convert("RGBA") if mode != "RGBA" else image)
    return np.asarray(image.convert("RGB"))


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Band by band: Pillow would treat a 4th band as alpha and premultiply the infrared by it.
    bands = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(size, Image.BILINEAR))
             for c in range(pixels.shape[-1])]
    return np.stack(bands, axis=-1)


def read_image(path: Path, channels: int = 3, max_side: Optional[int] = None) -> Decoded:
    """Decode ``path`` to uint8 pixels with ``channels`` bands, at most ``max_side`` pixels on
    its longer side (JPEGs are decoded at reduced scale right away). Raises ValueError or
    OSError with the reason when the file cannot be used."""
    with Image.open(path) as image:
        stored = image.size
        rotated = image.getexif().get(_EXIF_ORIENTATION, 1) in _ROTATED
        size = (stored[1], stored[0]) if rotated else stored
        target = _scaled(size, max_side)
        if target != size and image.format == "JPEG":
            draft = (target[1], target[0]) if rotated else target
            image.draft(image.mode, draft)  # DCT scaling: a 1/8-size decode of a huge photo
        image.load()
        image = ImageOps.exif_transpose(image)
        pixels = _to_uint8(image, channels)
    if (pixels.shape[1], pixels.shape[0]) != target:
        pixels = _resize(pixels, target)
    return Decoded(pixels=pixels, size=size)

"""Pictures of a run, drawn with PIL only: prediction grids and loss curves.

Both are written atomically, so a viewer refreshing the run folder never shows a torn PNG.
"""

from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from san_fast.io_utils import PathLike, atomic_save_image

ArrayLike = Union[torch.Tensor, np.ndarray]

# Hand-picked, mutually distinct colours (after Trubetskoy's list), none close to black, which
# marks ignored pixels, nor to white, the background of the pictures.
_BASE_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
    (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
    (70, 153, 144), (220, 190, 255), (154, 99, 36), (0, 90, 120), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 216, 177), (0, 0, 160), (169, 169, 169),
    (0, 128, 255), (255, 105, 180), (0, 100, 0), (255, 160, 0), (100, 60, 160),
    (0, 190, 160), (200, 80, 40), (120, 170, 255), (180, 0, 90), (110, 110, 110),
], dtype=np.uint8)
# Curves need dark, saturated colours to read on white (the label palette has pale ones).
_CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
                  (140, 86, 75), (227, 119, 194), (100, 100, 100), (23, 170, 190))
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_MIN_TILE = 128  # small crops are enlarged (nearest neighbour) to about this many pixels


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, distinct, none black (black is reserved for ignored pixels)."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    if n <= len(_BASE_PALETTE):
        return _BASE_PALETTE[:n].copy()
    extra = []
    for i in range(n - len(_BASE_PALETTE)):
        # golden-ratio hue steps, cycling saturation and brightness to keep neighbours apart
        hue = (0.13 + i * 0.618034) % 1.0
        sat = (0.55, 0.9, 0.35)[i % 3]
        val = (0.95, 0.7, 0.55)[(i // 3) % 3]
        extra.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.concatenate([_BASE_PALETTE, np.array(extra, dtype=np.uint8)])


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(labels: ArrayLike, num_colors: Optional[int] = None,
             ignore_index: int = 255) -> np.ndarray:
    """(H, W) integer labels -> (H, W, 3) uint8 colours; ``ignore_index`` is black."""
    labels = _numpy(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"expected (H, W) integer labels, got shape {labels.shape}, dtype {labels.dtype}"
        )
    labels = labels.astype(np.int64)
    ignored = labels == ignore_index
    valid = labels[~ignored]
    if valid.size and valid.min() < 0:
        raise ValueError(f"labels must be >= 0 or ignore_index={ignore_index}, found {valid.min()}")
    n = max(num_colors or 0, int(valid.max()) + 1 if valid.size else 0)
    out = label_palette(max(n, 1))[np.where(ignored, 0, labels)]
    out[ignored] = 0
    return out


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _legend(names: Sequence[str], colours: np.ndarray, width: int, font) -> Image.Image:
    """Swatch + name entries, wrapped into rows that fit ``width``."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, gap, line_h = 12, 14, 18
    rows, row, x = [], [], 0
    for i, name in enumerate(names):
        w = swatch + 4 + _text_size(probe, name, font)[0]
        if row and x + w > width:
            rows.append(row)
            row, x = [], 0
        row.append((i, name, x))
        x += w + gap
    if row:
        rows.append(row)
    legend = Image.new("RGB", (width, 6 + line_h * len(rows)), _BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for r, entries in enumerate(rows):
        y = 4 + r * line_h
        for i, name, x in entries:
            fill = tuple(int(c) for c in colours[i])
            draw.rectangle([x, y + 1, x + swatch, y + 1 + swatch], fill=fill, outline=_INK)
            draw.text((x + swatch + 4, y), name, fill=_INK, font=font)
    return legend


def save_prediction_grid(path: PathLike, images: ArrayLike, targets: ArrayLike, preds: ArrayLike,
                         class_names: Optional[Sequence[str]] = None,
                         assignment: Optional[Sequence[int]] = None,
                         ignore_index: int = 255) -> Image.Image:
    """One row per image: the image, its ground truth, the prediction.

    ``images``: uint8 (B, 3, H, W); ``targets``: (B, H, W) class ids (``ignore_index`` black);
    ``preds``: (B, H, W) cluster ids, mapped through ``assignment`` (cluster -> class, from
    ``UnsupervisedMetrics.compute()``) so matched clusters take their class's colour. Without an
    assignment the raw cluster ids are coloured. Returns the picture it wrote.
    """
    images, targets, preds = _numpy(images), _numpy(targets), _numpy(preds)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {images.shape}")
    b, _, h, w = images.shape
    if targets.shape != (b, h, w) or preds.shape != (b, h, w):
        raise ValueError(f"targets and preds must be (B, H, W) = {(b, h, w)}, got "
                         f"{targets.shape} and {preds.shape}")
    preds = preds.astype(np.int64)
    if assignment is not None:
        lut = np.asarray(assignment, dtype=np.int64)
        if preds.size and (preds.min() < 0 or preds.max() >= len(lut)):
            raise ValueError(f"pred cluster ids must lie in [0, {len(lut)}) to use the assignment")
        preds = lut[preds]
    valid_targets = targets[targets != ignore_index]
    n = max(len(class_names or ()), int(preds.max(initial=-1)) + 1,
            int(valid_targets.max(initial=-1)) + 1, 1)

    scale = max(1, math.ceil(_MIN_TILE / max(h, w)))
    tw, th, pad = w * scale, h * scale, 6
    font = _font()
    titles = ["image", "ground truth", "prediction" if assignment is not None else "clusters"]
    header_h = 22
    width = pad + 3 * (tw + pad)
    legend = _legend(class_names, label_palette(n), width - 2 * pad, font) if class_names else None
    height = header_h + b * (th + pad) + (legend.height + pad if legend else 0)

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        tx = pad + c * (tw + pad) + (tw - _text_size(draw, title, font)[0]) // 2
        draw.text((tx, 5), title, fill=_INK, font=font)
    for i in range(b):
        tiles = [images[i].transpose(1, 2, 0), colorize(targets[i], n, ignore_index),
                 colorize(preds[i], n, ignore_index)]
        y = header_h + i * (th + pad)
        for c, tile in enumerate(tiles):
            pic = Image.fromarray(np.ascontiguousarray(tile)).resize((tw, th), Image.NEAREST)
            canvas.paste(pic, (pad + c * (tw + pad), y))
    if legend:
        canvas.paste(legend, (pad, header_h + b * (th + pad)))
    atomic_save_image(path, canvas)
    return canvas


def _nice_step(span: float, ticks: int) -> float:
    """A 1, 2 or 5 times a power of ten step giving about ``ticks`` intervals over ``span``."""
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _format_tick(value: float, step: float) -> str:
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.2g}"
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f}"


def _bucket(values: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """x positions and values, averaged into at most ``limit`` buckets (NaN-aware)."""
    x = np.arange(len(values), dtype=np.float64)
    if len(values) <= limit:
        return x, values
    edges = np.linspace(0, len(values), limit + 1).astype(int)
    xs = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    with np.errstate(all="ignore"):
        vs = np.array([np.nanmean(values[a:b]) if np.isfinite(values[a:b]).any() else np.nan
                       for a, b in zip(edges[:-1], edges[1:])])
    return xs, vs


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], name: str,
           values: Sequence[float], colour: tuple[int, int, int], xlabel: str, font) -> None:
    left, top, right, bottom = box
    draw.text((left, top - 18), name, fill=_INK, font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_INK, width=1)
    values = np.asarray(values, dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        draw.text((left + 10, (top + bottom) // 2), "no finite values", fill=_INK, font=font)
        return
    xs, vs = _bucket(values, right - left)

    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - max(abs(lo), 1.0) * 0.05, hi + max(abs(hi), 1.0) * 0.05
    step = _nice_step(hi - lo, 4)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    x_max = max(len(values) - 1, 1)

    def px(x: float, v: float) -> tuple[float, float]:
        return (left + (right - left) * x / x_max, bottom - (bottom - top) * (v - lo) / (hi - lo))

    for k in range(int(round((hi - lo) / step)) + 1):
        v = lo + k * step
        _, y = px(0, v)
        draw.line([(left - 4, y), (left, y)], fill=_INK)
        draw.line([(left + 1, y), (right, y)], fill=(225, 225, 225))
        label = _format_tick(v, step)
        tw, th = _text_size(draw, label, font)
        draw.text((left - 7 - tw, y - th // 2 - 2), label, fill=_INK, font=font)
    x_step = max(1, int(_nice_step(x_max, 6)))
    for x in range(0, x_max + 1, x_step):
        gx, _ = px(x, lo)
        draw.line([(gx, bottom), (gx, bottom + 4)], fill=_INK)
        label = str(x)
        lx = gx - _text_size(draw, label, font)[0] / 2
        draw.text((lx, bottom + 6), label, fill=_INK, font=font)
    lx = right - _text_size(draw, xlabel, font)[0]
    draw.text((lx, bottom + 20), xlabel, fill=_INK, font=font)

    # Non-finite values break the line instead of being drawn as zeros.
    segment: list[tuple[float, float]] = []
    for x, v in list(zip(xs, vs)) + [(0.0, math.nan)]:
        if math.isfinite(v):
            segment.append(px(x, v))
            continue
        if len(segment) == 1:
            sx, sy = segment[0]
            draw.ellipse([sx - 2, sy - 2, sx + 2, sy + 2], fill=colour)
        elif segment:
            draw.line(segment, fill=colour, width=2)
        segment = []
    summary = f"last {finite[-1]:.4g}   min {finite.min():.4g}   max {finite.max():.4g}"
    draw.text((right - _text_size(draw, summary, font)[0], top - 18), summary, fill=(90, 90, 90),
              font=font)


def save_loss_curve(path: PathLike, history: dict[str, Sequence[float]], xlabel: str = "step",
                    title: Optional[str] = None) -> Image.Image:
    """One line chart per series of ``history`` (name -> values by step), stacked vertically,
    each with its own y axis, since losses of different terms live on different scales."""
    if not history:
        raise ValueError("history is empty: expected a dict of series name -> list of values")
    font = _font()
    plot_w, plot_h, margin_l, margin_r, gap = 520, 150, 70, 20, 64
    title_h = 26 if title else 0
    width = margin_l + plot_w + margin_r
    height = title_h + len(history) * (plot_h + gap) + 10
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text(((width - _text_size(draw, title, font)[0]) // 2, 6), title, fill=_INK, font=font)
    for i, (name, values) in enumerate(history.items()):
        top = title_h + 24 + i * (plot_h + gap)
        box = (margin_l, top, margin_l + plot_w, top + plot_h)
        _panel(draw, box, name, list(values), _CURVE_COLOURS[i % len(_CURVE_COLOURS)], xlabel, font)
    atomic_save_image(path, canvas)
    return canvas

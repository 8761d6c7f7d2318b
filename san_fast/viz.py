"""Pictures of a run and of predictions, drawn with matplotlib: prediction grids, loss curves,
confusion matrices and overlays, plus the label palette and indexed-PNG masks.

Figures are built on matplotlib's object API (``Figure`` + the Agg canvas), not pyplot, so no
global figure state or GUI backend is involved. Each is rendered once to pixels, and those
pixels are both returned (for TensorBoard) and written atomically (a viewer refreshing the run
folder never shows a torn PNG).
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from PIL import Image

from san_fast.io_utils import PathLike, atomic_save_image
from san_fast.metrics import UNASSIGNED

ArrayLike = Union[torch.Tensor, np.ndarray]

# Hand-picked, mutually distinct colours (after Trubetskoy's list), none close to black, which
# marks ignored pixels, nor to white. matplotlib's qualitative maps stop at 20 colours; the
# datasets here have up to 27 classes.
_BASE_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
    (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
    (70, 153, 144), (220, 190, 255), (154, 99, 36), (0, 90, 120), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 216, 177), (0, 0, 160), (169, 169, 169),
    (0, 128, 255), (255, 105, 180), (0, 100, 0), (255, 160, 0), (100, 60, 160),
    (0, 190, 160), (200, 80, 40), (120, 170, 255), (180, 0, 90), (110, 110, 110),
], dtype=np.uint8)
# A cluster that the strict over-clustering rule matched to no class (assignment -1) is shown
# white: the palette keeps clear of white, and black marks ignored pixels.
UNMATCHED_COLOUR = (255, 255, 255)
UNMATCHED_NAME = "no class (unmatched cluster)"
_DPI = 100
_TILE_INCHES = 1.9  # one panel of the prediction grid, whatever the crop size
_FONT = 9


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
             ignore_index: int = 255, palette: Optional[np.ndarray] = None) -> np.ndarray:
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
    if palette is None:
        palette = label_palette(max(n, 1))
    elif len(palette) < n:
        raise ValueError(f"palette has {len(palette)} colours, labels need {n}")
    out = np.asarray(palette, dtype=np.uint8)[np.where(ignored, 0, labels)]
    out[ignored] = 0
    return out


def rgb_view(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 with C in 1, 3, 4 -> (H, W, 3) for display: gray is repeated and the
    4th band (Potsdam's infrared) is left out, so pictures always show the RGB channels."""
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected a (C, H, W) image with C in 1, 3, 4, got {image.shape}")
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def _legend_handles(names: Sequence[str], colours: np.ndarray) -> list[Patch]:
    return [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="0.2", label=name)
            for name, c in zip(names, colours)]


def render(fig: Figure) -> np.ndarray:
    """The figure's pixels, (H, W, 3) uint8."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _save(path: PathLike, fig: Figure) -> np.ndarray:
    pixels = render(fig)
    atomic_save_image(path, Image.fromarray(pixels))
    return pixels


def save_prediction_grid(path: PathLike, images: ArrayLike, targets: ArrayLike, preds: ArrayLike,
                         class_names: Optional[Sequence[str]] = None,
                         assignment: Optional[Sequence[int]] = None,
                         ignore_index: int = 255) -> np.ndarray:
    """``prediction_grid_figure`` written to ``path``; returns its pixels."""
    return _save(path, prediction_grid_figure(images, targets, preds, class_names, assignment,
                                              ignore_index))


def _grid_legend(class_names: Sequence[str], targets: np.ndarray, preds: Optional[np.ndarray],
                 palette: np.ndarray, ignored: bool) -> list[Patch]:
    # Only the classes that appear: 27 entries for six small crops would hide the picture.
    # Unmatched predictions are cluster ids, not classes: then the legend names the targets.
    shown = np.unique(targets) if preds is None else np.union1d(np.unique(targets), np.unique(preds))
    shown = shown.astype(int)
    names = [class_names[i] if i < len(class_names) else f"class {i}" for i in shown]
    handles = _legend_handles(names, palette[shown])
    if ignored:
        handles.append(Patch(facecolor="black", edgecolor="0.2", label="ignored"))
    return handles


def prediction_grid_figure(images: ArrayLike, targets: ArrayLike, preds: ArrayLike,
                           class_names: Optional[Sequence[str]] = None,
                           assignment: Optional[Sequence[int]] = None,
                           ignore_index: int = 255) -> Figure:
    """One row per image: the image, its ground truth, the prediction.

    ``images``: uint8 (B, C, H, W), C in 1, 3, 4 (RGB is shown); ``targets``: (B, H, W) class
    ids (``ignore_index`` black); ``preds``: (B, H, W) cluster ids, mapped through
    ``assignment`` (cluster -> class, from ``UnsupervisedMetrics.compute()``) so matched
    clusters take their class's colour (a cluster assigned -1, matched to no class by the strict
    over-clustering rule, is white). Without an assignment the raw cluster ids are coloured.
    With ``class_names`` a legend names the classes shown.
    """
    images, targets, preds = _numpy(images), _numpy(targets), _numpy(preds)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, C, H, W) with C in 1, 3, 4, got "
                         f"{images.dtype} {images.shape}")
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
    palette = label_palette(n)
    unmatched = bool((preds == UNASSIGNED).any())
    if unmatched:  # clusters the strict rule matched to no class: one extra colour, after the classes
        preds = np.where(preds == UNASSIGNED, n, preds)
        palette = np.concatenate([palette, [UNMATCHED_COLOUR]]).astype(np.uint8)

    handles = (_grid_legend(class_names, valid_targets, preds[preds < n] if assignment is not None else None,
                            palette, bool((targets == ignore_index).any()))
               if class_names else [])
    if unmatched:
        handles.append(Patch(facecolor=np.asarray(UNMATCHED_COLOUR) / 255.0, edgecolor="0.2",
                             label=UNMATCHED_NAME))
    legend_rows = -(-len(handles) // 4)
    legend_in = 0.3 + 0.22 * legend_rows if legend_rows else 0.0
    fig = Figure(figsize=(3 * _TILE_INCHES, b * _TILE_INCHES + 0.35 + legend_in), dpi=_DPI,
                 layout="constrained")
    axes = fig.subplots(b, 3, squeeze=False)
    titles = ("image", "ground truth", "prediction" if assignment is not None else "clusters")
    for i in range(b):
        tiles = (rgb_view(images[i]), colorize(targets[i], n, ignore_index, palette),
                 colorize(preds[i], len(palette), ignore_index, palette))
        for c, tile in enumerate(tiles):
            ax = axes[i, c]
            ax.imshow(tile, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(titles[c], fontsize=_FONT + 1)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)),
                   fontsize=_FONT, frameon=False, handlelength=1.2, columnspacing=1.2)
    return fig


def save_loss_curve(path: PathLike, history: dict[str, Sequence[float]], xlabel: str = "step",
                    title: Optional[str] = None,
                    x: Optional[dict[str, Sequence[float]]] = None) -> np.ndarray:
    """``loss_curve_figure`` written to ``path``; returns its pixels."""
    return _save(path, loss_curve_figure(history, xlabel, title, x))


def loss_curve_figure(history: dict[str, Sequence[float]], xlabel: str = "step",
                      title: Optional[str] = None,
                      x: Optional[dict[str, Sequence[float]]] = None) -> Figure:
    """One line chart per series of ``history``, each with its own y axis (loss terms live on
    different scales). A series' i-th value is drawn at x = i + 1 (epoch 1 is the first epoch),
    or at ``x[name]`` when given (e.g. the epochs at which validation ran); every chart spans
    the same x range, so the charts line up. NaN breaks the line."""
    if not history:
        raise ValueError("history is empty: expected a dict of series name -> list of values")
    x = x or {}
    cols = 2 if len(history) > 3 else 1
    rows = -(-len(history) // cols)
    fig = Figure(figsize=(5.2 * cols, 2.3 * rows + (0.4 if title else 0)), dpi=_DPI,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    span = [np.inf, -np.inf]
    for i, (name, values) in enumerate(history.items()):
        ax = axes[i]
        values = np.asarray(list(values), dtype=np.float64)
        xs = np.asarray(x[name], dtype=np.float64) if name in x else np.arange(1, len(values) + 1)
        if len(xs) != len(values):
            raise ValueError(f"x[{name!r}] has {len(xs)} positions for {len(values)} values")
        if len(xs):
            span = [min(span[0], xs.min()), max(span[1], xs.max())]
        finite = np.isfinite(values)
        ax.set_title(name if not finite.any() else f"{name}   (last {values[finite][-1]:.4g})",
                     fontsize=_FONT + 1, loc="left")
        if not finite.any():
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        ax.plot(xs, values, color=f"C{i % 10}", linewidth=1.6,
                marker="o" if len(values) <= 40 else None, markersize=3.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, color="0.9")
        ax.tick_params(labelsize=_FONT)
        ax.set_xlabel(xlabel, fontsize=_FONT)
    if np.isfinite(span).all():
        pad = max(0.25, 0.03 * (span[1] - span[0]))
        for ax in axes[:len(history)]:
            ax.set_xlim(span[0] - pad, span[1] + pad)
    for ax in axes[len(history):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=_FONT + 2)
    return fig


def save_confusion_matrix(path: PathLike, confusion: ArrayLike, class_names: Sequence[str],
                          title: Optional[str] = None,
                          unmatched: Optional[Sequence[int]] = None) -> np.ndarray:
    """``confusion_figure`` written to ``path``; returns its pixels."""
    return _save(path, confusion_figure(confusion, class_names, title, unmatched))


def confusion_figure(confusion: ArrayLike, class_names: Sequence[str],
                     title: Optional[str] = None,
                     unmatched: Optional[Sequence[int]] = None) -> Figure:
    """The matched confusion matrix as ``UnsupervisedMetrics.compute()`` returns it (rows:
    predicted class, i.e. clusters mapped through the Hungarian assignment; columns: ground
    truth), drawn the usual way round: a row per ground-truth class, normalised to the
    fraction of that class's pixels given to each predicted class, so the diagonal is the
    per-class recall in the Hungarian order. Classes without pixels show an empty row.
    ``unmatched`` (the strict over-clustering rule's per-class pixels of clusters matched to no
    class) adds a last column, so each row still sums to the whole class."""
    counts = _numpy(confusion).astype(np.float64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion must be ({n}, {n}) for {n} class names, got {counts.shape}")
    predicted = list(class_names)
    if unmatched is not None and np.sum(unmatched) > 0:
        counts = np.concatenate([counts, np.asarray(unmatched, np.float64).reshape(1, n)])
        predicted.append(UNMATCHED_NAME)
    by_truth = counts.T
    totals = by_truth.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, 100 * by_truth / totals, np.nan)  # % of each class's pixels
    side = max(4.5, 0.27 * n + 2.6)
    fig = Figure(figsize=(side + 1.0, side), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    cmap = "Blues"
    shown = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=100.0)
    ax.set_facecolor("0.85")  # rows of classes absent from the ground truth
    fontsize = _FONT if n <= 15 else 7
    ax.set_xticks(range(len(predicted)), labels=predicted, rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=fontsize)
    rows = [name if total > 0 else f"{name} (no pixels)" for name, total in zip(class_names, totals[:, 0])]
    ax.set_yticks(range(n), labels=rows, fontsize=fontsize)
    ax.set_xlabel("predicted class (clusters after the cluster-to-class matching)", fontsize=_FONT)
    ax.set_ylabel("ground truth", fontsize=_FONT)
    if n <= 15:  # numbers stay legible; above that the colour carries the information
        for i, j in np.ndindex(share.shape):
            if np.isfinite(share[i, j]):
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center",
                        fontsize=fontsize - 1, color="white" if share[i, j] > 55 else "0.1")
    bar = fig.colorbar(shown, ax=ax, shrink=0.8)
    bar.set_label("% of the ground-truth class's pixels", fontsize=_FONT)
    bar.ax.tick_params(labelsize=_FONT)
    ax.set_title(title or "confusion matrix (row-normalised, % per row)", fontsize=_FONT + 1)
    return fig


def save_overlay(path: PathLike, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                 names: Sequence[str], alpha: float = 0.7, title: Optional[str] = None) -> np.ndarray:
    """``overlay_figure`` written to ``path``; returns its pixels."""
    return _save(path, overlay_figure(image, labels, palette, names, alpha, title))


def overlay_figure(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                   names: Sequence[str], alpha: float = 0.7, title: Optional[str] = None,
                   max_side: int = 768, min_side: int = 256) -> Figure:
    """An (H, W, 3) uint8 image beside the same image with its (H, W) labels blended in, and a
    legend naming each label present with its share of the pixels. ``palette[k]`` and
    ``names[k]`` describe label k. Each panel is drawn with its longer side between
    ``min_side`` and ``max_side`` pixels (nearest-neighbour enlargement keeps small images'
    boundaries sharp)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels must be (H, W) = {image.shape[:2]}, got {labels.shape}")
    colours = colorize(labels, palette=palette)
    blended = (image * (1 - alpha) + colours * alpha).round().astype(np.uint8)
    h, w = labels.shape
    scale = min(max(1.0, min_side / max(h, w)), max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale >= 1 else Image.BOX
    panels = [np.asarray(Image.fromarray(p).resize(size, resample)) for p in (image, blended)]

    present, counts = np.unique(labels, return_counts=True)
    shares = [100 * c / labels.size for c in counts]
    entries = [f"{names[k]}  {f'{p:.1f}%' if p >= 0.05 else '<0.1%'}" for k, p in zip(present, shares)]
    handles = _legend_handles(entries, np.asarray(palette)[present])
    legend_w = 0.4 + 0.075 * max((len(e) for e in entries), default=8)
    fig = Figure(figsize=(2 * size[0] / _DPI + legend_w + 0.3, max(size[1] / _DPI + 0.5, 1.6)),
                 dpi=_DPI, layout="constrained")
    for ax, pixels, panel_title in zip(fig.subplots(1, 2), panels, (title or "image", "segmentation")):
        ax.imshow(pixels, interpolation="none")
        ax.set_axis_off()
        ax.set_title(panel_title, fontsize=_FONT)
    fig.legend(handles=handles, loc="outside right upper", fontsize=_FONT, frameon=False,
               handlelength=1.2)
    return fig


def save_indexed_png(path: PathLike, labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """(H, W) ids in [0, 256) as a "P"-mode PNG: the pixel values are the ids themselves (what
    a program reads back) and ``palette`` colours them in any viewer."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected (H, W) integer ids, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"an indexed PNG holds ids 0..255, found {labels.min()}..{labels.max()}")
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) > 256:
        raise ValueError(f"palette must be (K <= 256, 3), got {palette.shape}")
    image = Image.frombytes("P", labels.shape[::-1], np.ascontiguousarray(labels, np.uint8).tobytes())
    image.putpalette(palette.ravel().tolist())
    atomic_save_image(path, image)
    return image

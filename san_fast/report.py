"""What a training run and an evaluation show: class names, the figures (predictions.png,
confusion.png), the tables printed at the end, and the one-line error of the commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from san_fast.config import Config
from san_fast.data.labels import class_names
from san_fast.data.synthetic import class_names as synthetic_class_names
from san_fast.distributed import launch_env
from san_fast.viz import prediction_grid_figure, render, save_confusion_matrix, save_prediction_grid

PREDICTIONS = "predictions.png"
CONFUSION = "confusion.png"
# Errors a user can cause and fix (flags, data files, folders, a checkpoint, divergence, the file
# system): the commands print one line and exit with code 2. Anything else is a bug and keeps its
# traceback.
EXPECTED = (ValueError, OSError, FloatingPointError)


def print_error(prog: str, exc: BaseException) -> int:
    """`prog: error: ...` on stderr (naming the rank under torchrun); returns the exit code 2.
    A dataset folder that does not match the expected layout prints the tree after the line."""
    rank, _, world = launch_env()
    where = f" (rank {rank})" if world > 1 else ""
    print(f"{prog}: error{where}: {exc}", file=sys.stderr)
    return 2


def class_names_of(cfg: Config) -> list[str]:
    """The dataset's class names in class-id order (the synthetic materials are named too)."""
    names = class_names(cfg.dataset)
    return list(names) if names is not None else synthetic_class_names(cfg.num_classes())


def prediction_panels(names: Sequence[str]) -> Callable[[dict, dict], np.ndarray]:
    """(scores, shown) -> the pixels of the prediction grid, clusters coloured through the
    scores' assignment (what the logger shows at each evaluation)."""
    def panels(scores: dict, shown: dict) -> np.ndarray:
        return render(prediction_grid_figure(shown["images"], shown["targets"], shown["preds"],
                                             class_names=names, assignment=scores["assignment"]))

    return panels


def write_figures(folder: Path, scores: dict, shown: dict, names: Sequence[str],
                  title: Optional[str] = None) -> list[Path]:
    """predictions.png (when images were kept) and confusion.png (row-normalised, in the order
    of the cluster-to-class matching) into `folder`; the paths written."""
    written = []
    if shown:
        save_prediction_grid(folder / PREDICTIONS, shown["images"], shown["targets"], shown["preds"],
                             class_names=names, assignment=scores["assignment"])
        written.append(folder / PREDICTIONS)
    save_confusion_matrix(folder / CONFUSION, scores["confusion"], names, title=title,
                          unmatched=scores.get("unmatched"))
    written.append(folder / CONFUSION)
    return written


def summary_table(result: dict[str, Any]) -> str:
    rows = [("SAN", result["san"])]
    if "baseline" in result:
        rows.append(("k-means on pixels", result["baseline"]))
    lines = [f"{'method':<20} {'pixel acc':>9} {'mIoU':>7} {'clusters used':>14}"]
    for name, s in rows:
        lines.append(f"{name:<20} {s['acc']:>9.4f} {s['miou']:>7.4f} {s['clusters_used']:>14}")
    return "\n".join(lines)


def iou_table(scores: dict[str, Any], names: Sequence[str]) -> str:
    """Per-class IoU (after matching), then mIoU and pixel accuracy; '-' for a class absent from
    the ground truth and never predicted (left out of the mIoU)."""
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}} {'IoU':>7}"]
    for name, iou in zip(names, scores["iou"]):
        lines.append(f"{name:<{width}} {'-' if iou is None else f'{iou:.4f}':>7}")
    lines.append(f"{'mIoU':<{width}} {scores['miou']:>7.4f}")
    lines.append(f"{'pixel acc':<{width}} {scores['acc']:>7.4f}")
    return "\n".join(lines)

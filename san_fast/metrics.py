"""Unsupervised segmentation metrics: one confusion matrix, Hungarian matching, acc and mIoU.

Conventions (as STEGO / PiCIE / IIC evaluate):

* One confusion matrix (cluster x class) is accumulated over the whole evaluation set, on the
  tensors' device; pixels whose target is ``ignore_index`` are skipped.
* Clusters are matched to classes once, on that matrix, with the Hungarian algorithm
  (``scipy.optimize.linear_sum_assignment``) maximising the number of matched pixels.
* With more clusters than classes (over-clustering) the rectangular problem leaves some
  clusters unmatched; each of those is mapped to its majority class (PiCIE's over-clustering
  evaluation; STEGO instead counts their pixels as errors). A cluster that received no pixel
  keeps the class of its (empty) row's argmax, 0, which changes no count. With fewer clusters
  than classes, some classes receive no prediction at all.
* ``iou[c] = tp / (tp + fp + fn)`` on the matched matrix; a class with an empty union (absent
  from the ground truth and never predicted) has IoU ``None`` and is left out of ``miou``,
  which is the mean over classes with a nonzero union (STEGO's ``nanmean``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _check_range(name: str, values: torch.Tensor, upper: int) -> None:
    bad = values[(values < 0) | (values >= upper)]
    if bad.numel():
        raise ValueError(
            f"{name} values must lie in [0, {upper}); found {bad.unique()[:10].tolist()}"
        )


def cluster_usage(pred: torch.Tensor, num_clusters: int) -> int:
    """How many distinct clusters ``pred`` uses: 1 means the model collapsed to one cluster."""
    pred = pred.reshape(-1).long()
    _check_range("pred", pred, num_clusters)
    return int((torch.bincount(pred, minlength=num_clusters) > 0).sum().item())


def hungarian_assignment(confusion: np.ndarray) -> np.ndarray:
    """cluster -> class for a (clusters x classes) count matrix, maximising matched pixels."""
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    assignment = confusion.argmax(axis=1)  # majority class: what unmatched clusters keep
    assignment[rows] = cols
    return assignment


class UnsupervisedMetrics:
    """Accumulates predictions against labels; ``compute()`` matches and scores them."""

    def __init__(self, num_clusters: int, num_classes: int, ignore_index: int = 255):
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(
                f"need num_clusters >= 1 and num_classes >= 1, got {num_clusters}, {num_classes}"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class id in [0, {num_classes})"
            )
        self.num_clusters = num_clusters
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.confusion = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. ``pred``: cluster ids; ``target``: class ids or ignore_index; same shape."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"pred and target must be integer tensors (ids), got {pred.dtype} and "
                f"{target.dtype}"
            )
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long().to(pred.device)
        valid = target != self.ignore_index
        pred_bad = (pred < 0) | (pred >= self.num_clusters)
        target_bad = valid & ((target < 0) | (target >= self.num_classes))
        # One device sync for both checks; the detailed messages are only built on failure.
        if bool((pred_bad.any() | target_bad.any()).item()):
            _check_range("pred (cluster ids)", pred, self.num_clusters)
            _check_range(
                f"target (class ids other than ignore_index={self.ignore_index})",
                target[valid], self.num_classes,
            )
        index = pred[valid] * self.num_classes + target[valid]
        counts = torch.bincount(index, minlength=self.num_clusters * self.num_classes)
        counts = counts.view(self.num_clusters, self.num_classes)
        if self.confusion is None:
            self.confusion = counts
        elif self.confusion.device != counts.device:
            self.confusion = self.confusion + counts.to(self.confusion.device)
        else:
            self.confusion += counts

    def compute(self) -> dict[str, Any]:
        """Scores after Hungarian matching; every value is JSON-serialisable.

        ``confusion`` is the matched (classes x classes) matrix: rows are predicted classes
        (clusters mapped through ``assignment``), columns ground-truth classes.
        """
        if self.confusion is None or int(self.confusion.sum()) == 0:
            raise ValueError("no labelled pixel was accumulated: call update() with some "
                             "target pixels other than ignore_index before compute()")
        raw = self.confusion.cpu().numpy().astype(np.int64)
        assignment = hungarian_assignment(raw)
        matched = np.zeros((self.num_classes, self.num_classes), np.int64)
        np.add.at(matched, assignment, raw)

        tp = np.diag(matched).astype(np.float64)
        union = matched.sum(0) + matched.sum(1) - tp
        iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
        present = [v for v in iou if v is not None]
        total = int(raw.sum())
        return {
            "acc": float(tp.sum() / total),
            "miou": float(np.mean(present)),
            "iou": iou,
            "assignment": [int(a) for a in assignment],
            "confusion": matched.tolist(),
            "num_pixels": total,
            "clusters_used": int((raw.sum(1) > 0).sum()),
        }

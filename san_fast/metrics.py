"""Unsupervised segmentation metrics: one confusion matrix, a cluster-to-class matching, acc and mIoU.

Conventions (as STEGO / PiCIE / IIC evaluate):

* One confusion matrix (cluster x class) is accumulated over the whole evaluation set, on the
  tensors' device; pixels whose target is ``ignore_index`` are skipped.
* Clusters are matched to classes once, on that matrix. With as many clusters as classes every
  mode below is the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) maximising
  the matched pixels, as PiCIE, STEGO and IIC do. With more clusters than classes
  (over-clustering) the peers differ, and ``overcluster`` picks one:

  - ``hungarian-majority`` (this project's convention, no peer's): Hungarian matching, then each
    cluster left unmatched goes to its majority class.
  - ``majority`` (IIC's ``_original_match``, code/utils/cluster/eval_metrics.py, used for its
    over-clustered "IID+" runs): every cluster goes to its majority class (many to one, ties to
    the lowest class id), with no one-to-one step at all.
  - ``strict`` (STEGO's ``UnsupervisedMetrics``, src/utils.py): pixels predicted as a cluster id
    >= the class count are left out of the matrix altogether (STEGO's update mask); the
    Hungarian matching then picks one cluster per class, and the pixels of any remaining cluster
    count as errors, gathered in one extra "unmatched" row whose IoU (0) joins the mIoU mean
    when it holds pixels (STEGO's extra histogram row and column).

  PiCIE's evaluation is square only (as many clusters as classes).
* A matching may be fitted on one set and applied to another (IIC's held-out "IID+" partitions):
  ``fit_assignment()`` on the fitting set's metrics, then ``compute(assignment=...)`` on the
  scored set's.
* ``iou[c] = tp / (tp + fp + fn)`` on the matched matrix; a class with an empty union (absent
  from the ground truth and never predicted) has IoU ``None`` and is left out of ``miou``,
  which is the mean over classes with a nonzero union (STEGO's ``nanmean``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

OVERCLUSTER_MODES = ("hungarian-majority", "majority", "strict")
UNASSIGNED = -1  # assignment of a cluster whose pixels map to no class (strict mode)

OVERCLUSTER_WORDS = {
    "hungarian-majority": ("Hungarian matching; clusters left unmatched go to their majority "
                           "class (this project's convention; no peer uses it)"),
    "majority": ("every cluster goes to its majority class, many to one (IIC's _original_match, "
                 "used for its over-clustered IID+ runs)"),
    "strict": ("STEGO's rule: pixels predicted as a cluster id >= the class count are left out; "
               "Hungarian matching of the rest; pixels of clusters left unmatched count as "
               "errors, and their row adds an IoU of 0 to the mIoU mean"),
}


def describe_overcluster(mode: str) -> str:
    """One line for metrics.json: how clusters beyond the class count are scored, and whose rule."""
    check_mode(mode)
    return OVERCLUSTER_WORDS[mode]


def check_mode(mode: str) -> None:
    if mode not in OVERCLUSTER_MODES:
        raise ValueError(f"overcluster={mode!r}: expected one of {', '.join(OVERCLUSTER_MODES)}")


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
    """cluster -> class for a (clusters x classes) count matrix, maximising matched pixels;
    clusters left unmatched (more clusters than classes) keep their majority class."""
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    assignment = majority_assignment(confusion)
    assignment[rows] = cols
    return assignment


def majority_assignment(confusion: np.ndarray) -> np.ndarray:
    """IIC's many-to-one mapping: each cluster to the class it overlaps most. np.argmax takes the
    first maximum, as IIC's strict ``>`` does; an empty cluster gets class 0, which changes no
    count."""
    return confusion.argmax(axis=1).astype(np.int64)


def _strict_rows(confusion: np.ndarray) -> np.ndarray:
    """STEGO's update mask: rows of cluster ids >= the class count hold no pixel."""
    kept = confusion.copy()
    kept[confusion.shape[1]:] = 0
    return kept


def strict_assignment(confusion: np.ndarray) -> np.ndarray:
    """STEGO's one-to-one matching: UNASSIGNED for every cluster the Hungarian step leaves out.
    (STEGO matches the matrix and its transpose separately, which can disagree on ties; one
    matching is used here for both the histogram and the unmatched row.)"""
    rows, cols = linear_sum_assignment(_strict_rows(confusion), maximize=True)
    assignment = np.full(confusion.shape[0], UNASSIGNED, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def fit_assignment(confusion: np.ndarray, mode: str = "hungarian-majority") -> np.ndarray:
    """cluster -> class (or UNASSIGNED) fitted on a (clusters x classes) count matrix."""
    check_mode(mode)
    if mode == "majority":
        return majority_assignment(confusion)
    if mode == "strict":
        return strict_assignment(confusion)
    return hungarian_assignment(confusion)


def score(confusion: np.ndarray, assignment: np.ndarray, mode: str = "hungarian-majority"
          ) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU of a (clusters x classes) count matrix scored
    through ``assignment``; every value is JSON-serialisable.

    ``confusion`` in the result is the matched (classes x classes) matrix: rows are predicted
    classes (clusters mapped through ``assignment``), columns ground-truth classes. In strict
    mode ``unmatched`` holds, per ground-truth class, the pixels of clusters mapped to no class
    (errors) and ``left_out`` the pixels of cluster ids >= the class count (not scored).
    """
    check_mode(mode)
    num_clusters, num_classes = confusion.shape
    clusters_used = int((confusion.sum(1) > 0).sum())
    left_out = 0
    if mode == "strict":
        left_out = int(confusion[num_classes:].sum())
        confusion = _strict_rows(confusion)
    assigned = assignment >= 0
    matched = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matched, assignment[assigned], confusion[assigned])
    unmatched = confusion[~assigned].sum(axis=0)
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("no labelled pixel left to score: every pixel was ignored"
                         + (" or predicted as a cluster id >= the class count (strict mode)"
                            if left_out else ""))

    tp = np.diag(matched).astype(np.float64)
    union = matched.sum(0) + matched.sum(1) + unmatched - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    if unmatched.sum() > 0:
        present.append(0.0)  # STEGO's extra "unmatched" class: predicted, never correct
    out = {
        "acc": float(tp.sum() / total),
        "miou": float(np.mean(present)),
        "iou": iou,
        "assignment": [int(a) for a in assignment],
        "confusion": matched.tolist(),
        "num_pixels": total,
        "clusters_used": clusters_used,
        "overcluster": mode,
    }
    if mode == "strict":
        out["unmatched"] = [int(v) for v in unmatched]
        out["left_out"] = left_out
    return out


class UnsupervisedMetrics:
    """Accumulates predictions against labels; ``compute()`` matches and scores them.

    ``assignment`` (cluster -> class, e.g. another set's ``fit_assignment()``) makes ``compute()``
    apply that matching instead of fitting one on this set: IIC's held-out IID+ scoring, usable
    by code that only calls ``update`` and ``compute()``.
    """

    def __init__(self, num_clusters: int, num_classes: int, ignore_index: int = 255,
                 overcluster: str = "hungarian-majority",
                 assignment: Optional[Sequence[int]] = None):
        if num_clusters < 1 or num_classes < 1:
            raise ValueError(
                f"need num_clusters >= 1 and num_classes >= 1, got {num_clusters}, {num_classes}"
            )
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} collides with a class id in [0, {num_classes})"
            )
        check_mode(overcluster)
        self.num_clusters = num_clusters
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.overcluster = overcluster
        self.assignment = None if assignment is None else self._checked(assignment)
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

    def _raw(self) -> np.ndarray:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            raise ValueError("no labelled pixel was accumulated: call update() with some "
                             "target pixels other than ignore_index before compute()")
        return self.confusion.cpu().numpy().astype(np.int64)

    def fit_assignment(self) -> list[int]:
        """The cluster -> class matching fitted on what was accumulated (UNASSIGNED = -1 for a
        cluster whose pixels are errors), to score another set with ``compute(assignment=)``."""
        return [int(a) for a in fit_assignment(self._raw(), self.overcluster)]

    def _checked(self, assignment: Sequence[int]) -> np.ndarray:
        fitted = np.asarray(assignment, dtype=np.int64)
        if fitted.shape != (self.num_clusters,):
            raise ValueError(f"assignment must list one class per cluster "
                             f"({self.num_clusters}), got shape {fitted.shape}")
        if ((fitted < UNASSIGNED) | (fitted >= self.num_classes)).any():
            raise ValueError(f"assignment values must be class ids in [0, "
                             f"{self.num_classes}) or {UNASSIGNED}, got {fitted.tolist()}")
        return fitted

    def compute(self, assignment: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Scores after matching (see ``score``). The matching is ``assignment`` (cluster ->
        class, fitted on another set) when given here or to the constructor, else fitted on
        this matrix."""
        raw = self._raw()
        if assignment is not None:
            fitted = self._checked(assignment)
        elif self.assignment is not None:
            fitted = self.assignment
        else:
            fitted = fit_assignment(raw, self.overcluster)
        return score(raw, fitted, self.overcluster)

"""Scoring a model on a loader: one confusion matrix over all images of all ranks, then matching.

The caller decides what is scored (the loader: a split, sharded over ranks with RankShard so
each image counts once) and how clusters are matched (the metrics object it passes, e.g.
UnsupervisedMetrics with its over-clustering mode). Under DDP the ranks' confusion matrices are
summed before the matching, so every rank computes the same scores.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from san_fast.distributed import DistEnv, all_reduce
from san_fast.model import SAN
from san_fast.runtime import Runtime


class DivergedError(FloatingPointError):
    """Training produced non-finite losses, weights or model outputs: no result is reported."""


@torch.no_grad()
def evaluate(model: SAN, loader: DataLoader, runtime: Runtime, metrics: Any, env: DistEnv,
             num_vis: int = 0, desc: str = "eval", progress: bool = True,
             compute: bool = True) -> tuple[Optional[dict], dict]:
    """Scores (``metrics.compute()``; None with ``compute=False``, leaving `metrics` holding the
    confusion matrix summed over ranks, for a matching fitted on other images) and up to
    `num_vis` (image, label, prediction) of this rank's first batches. `metrics` needs
    update(pred, target), compute(), and a ``confusion`` tensor (None until the first update),
    as san_fast.metrics.UnsupervisedMetrics has. Raises DivergedError when the model's outputs
    are not finite."""
    was_training = model.training
    model.eval()
    shown: dict[str, list[torch.Tensor]] = {"images": [], "targets": [], "preds": []}
    finite = torch.ones((), dtype=torch.bool, device=runtime.device)
    count = 0
    for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
                                disable=not (progress and env.is_main)):
        with runtime.autocast():
            pred, ok = model.predict(runtime.prepare(images), return_finite=True)
        finite &= ok
        metrics.update(pred, targets.to(runtime.device, non_blocking=True))
        if count < num_vis:
            take = min(num_vis - count, images.shape[0])
            shown["images"].append(images[:take].cpu())
            shown["targets"].append(targets[:take].cpu())
            shown["preds"].append(pred[:take].cpu())
            count += take
    model.train(was_training)
    _sum_over_ranks(metrics, finite, runtime.device, env)
    return metrics.compute() if compute else None, {k: torch.cat(v) for k, v in shown.items() if v}


def _sum_over_ranks(metrics: Any, finite: torch.Tensor, device: torch.device, env: DistEnv) -> None:
    if metrics.confusion is None:  # this rank had no image (fewer images than ranks)
        metrics.confusion = torch.zeros(metrics.num_clusters, metrics.num_classes, dtype=torch.long,
                                        device=device)
    confusion = metrics.confusion.to(device)
    bad = (~finite).to(confusion.dtype).view(1)
    # One collective for both: the matrix and the count of ranks that saw non-finite outputs.
    packed = all_reduce(torch.cat([confusion.view(-1), bad]), env)
    if packed[-1].item():
        raise DivergedError("the model's outputs are not finite (NaN or inf) on the validation images: "
                            "training diverged (try a lower --lr)")
    metrics.confusion = packed[:-1].view_as(confusion)

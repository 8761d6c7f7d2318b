"""Scoring a model on a loader: one confusion matrix over all images of all ranks, then matching.

The caller decides what is scored (the loader: a split, sharded over ranks with RankShard so
each image counts once) and how clusters are matched (the metrics object it passes, e.g.
UnsupervisedMetrics with its over-clustering mode). Under DDP the ranks' confusion matrices are
summed before the matching, so every rank computes the same scores.

``evaluate_plan`` scores a model under an evaluation plan (san_fast.data.splits): the matching
is fitted on the plan's fit images and applied to its scored images, which are the same images
except under IIC's held-out IID+ (``plan_scores``, shared with the k-means baseline).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from san_fast.data.splits import EvalPlan
from san_fast.distributed import DistEnv, all_reduce
from san_fast.metrics import UnsupervisedMetrics
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


def plan_scores(fit: UnsupervisedMetrics, scored: Optional[UnsupervisedMetrics]) -> dict:
    """Scores of a plan from its accumulated matrices: `fit`'s own matching when the plan scores
    the images it fits on (`scored` None), else the matching fitted on `fit` applied to `scored`
    (IIC's IID+: a cluster keeps the class it was given on the fit images)."""
    if scored is None:
        return fit.compute()
    return scored.compute(assignment=fit.fit_assignment())


def evaluate_plan(model: SAN, plan: EvalPlan, fit_loader: DataLoader, score_loader: DataLoader,
                  runtime: Runtime, new_metrics: Callable[[], UnsupervisedMetrics], env: DistEnv,
                  num_vis: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """(scores, shown) of `model` under `plan`: `fit_loader` holds the images the matching is
    fitted on, `score_loader` those scored (the same loader unless plan.held_out); `shown` comes
    from the scored images."""
    fit = new_metrics()
    _, shown = evaluate(model, fit_loader, runtime, fit, env, num_vis=0 if plan.held_out else num_vis,
                        desc=f"eval ({plan.name})" + (": matching" if plan.held_out else ""), progress=progress,
                        compute=False)
    scored = None
    if plan.held_out:
        scored = new_metrics()
        _, shown = evaluate(model, score_loader, runtime, scored, env, num_vis=num_vis,
                            desc=f"eval ({plan.name}): scoring", progress=progress, compute=False)
    return plan_scores(fit, scored), shown

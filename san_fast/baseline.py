"""The k-means-on-pixel-colours baseline: what clustering colour alone achieves.

Pixel values (all bands: RGB, or Potsdam's RGB + IR) are scaled to [0, 1] and standardised per
band with statistics of the sampled training pixels; the same transform is applied to evaluated
pixels. K-means (k-means++ seeding, Lloyd iterations, several seeded restarts, lowest inertia
kept) runs on a random sample of training pixels; every evaluated pixel then takes its nearest
centre, and the clusters are scored like the model: the same ``UnsupervisedMetrics``, the same
over-clustering rule, and the same evaluation plan (matching fitted on one set of images and,
under IIC's IID+, applied to another), so the two rows of a run's table stay comparable.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from san_fast.evaluation import plan_scores
from san_fast.loader import SeededItems
from san_fast.metrics import UnsupervisedMetrics
from san_fast.worker_threads import worker_options

KMEANS_STREAM = 3  # derive_seed purpose tag of the k-means fit's crops (training's are 1 and 2)


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W), C = 3 (RGB) or 4 (RGB + IR) -> float (H*W, C) in [0, 1]."""
    if image.ndim != 3 or image.shape[0] not in (3, 4):
        raise ValueError(f"expected an image tensor of shape (3, H, W) or (4, H, W) (RGB + IR), "
                         f"got {tuple(image.shape)}")
    return image.reshape(image.shape[0], -1).t().float() / 255.0


def _items(dataset: Dataset, indices: Optional[list[int]], num_workers: int):
    """Dataset items one by one (no batching: real validation images may differ in size)."""
    source = dataset if indices is None else Subset(dataset, indices)
    return DataLoader(source, batch_size=None, shuffle=False, **worker_options(num_workers))


def _seeded_items(dataset: Dataset, indices: list[int], seed: int, num_workers: int):
    """Items `indices`, each drawn under its own seed from (seed, index): random training crops
    are then the same whichever process or worker loads them (as in training, san_fast.loader)."""
    keys = [(i, (seed, KMEANS_STREAM, i)) for i in indices]
    return DataLoader(SeededItems(dataset), batch_size=None, sampler=keys, **worker_options(num_workers))


def sample_pixels(dataset: Dataset, max_pixels: int, max_images: int, generator: torch.Generator,
                  num_workers: int = 0, progress: bool = False, seed: int = 0) -> torch.Tensor:
    """Up to ``max_pixels`` pixel values (N, C) in [0, 1], spread evenly over up to ``max_images``;
    random items (training crops) drawn under ``seed``."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the training dataset is empty: k-means needs pixels to fit")
    chosen = torch.randperm(n, generator=generator)[:max_images].sort().values.tolist()
    per_image = math.ceil(max_pixels / len(chosen))
    samples = []
    for image, _ in tqdm(_seeded_items(dataset, chosen, seed, num_workers), total=len(chosen),
                         desc="k-means: sampling pixels", disable=not progress, leave=False):
        pixels = _pixels(image)
        if pixels.shape[0] > per_image:
            pixels = pixels[torch.randperm(pixels.shape[0], generator=generator)[:per_image]]
        samples.append(pixels)
    return torch.cat(samples)[:max_pixels]


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centres.t() + (centres * centres).sum(1)
    return d.clamp_min(0)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
    closest = _sq_distances(x, centres)[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct colours than k: any point is as good as another
            pick = torch.randint(x.shape[0], (1,), generator=generator)
        else:
            pick = torch.multinomial(closest / total, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        closest = torch.minimum(closest, _sq_distances(x, x[pick])[:, 0])
    return centres


def kmeans(x: torch.Tensor, k: int, iters: int = 50, restarts: int = 3, seed: int = 0,
           tol: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Centres (k, D) and inertia (mean squared distance) of the best of ``restarts`` runs."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = _kmeans_pp(x, k, generator)
        for _ in range(iters):
            assign = _sq_distances(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            # An emptied cluster keeps its old centre rather than collapsing to the origin.
            new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            shift = (new - centres).pow(2).sum(1).max().item()
            centres = new
            if shift < tol:
                break
        inertia = _sq_distances(x, centres).min(1).values.mean().item()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    return best, best_inertia


@torch.no_grad()
def kmeans_pixel_baseline(train_dataset: Dataset, val_dataset: Dataset, num_clusters: int,
                          num_classes: Optional[int] = None, max_pixels: int = 200_000,
                          max_images: int = 2000, iters: int = 50, restarts: int = 3,
                          seed: int = 0, ignore_index: int = 255, num_workers: int = 0,
                          progress: bool = False, overcluster: str = "hungarian-majority",
                          score_dataset: Optional[Dataset] = None) -> dict[str, Any]:
    """Fit k-means on training pixels, cluster every pixel of ``val_dataset``, score it.

    ``val_dataset`` is where the cluster-to-class matching is fitted (and what is scored);
    with ``score_dataset`` the matching fitted on ``val_dataset`` scores ``score_dataset``
    instead (IIC's IID+). ``num_classes`` defaults to ``num_clusters``; ``overcluster`` as in
    UnsupervisedMetrics. Returns its ``compute()`` plus ``method``, ``num_clusters``,
    ``train_pixels`` and ``inertia``.
    """
    num_classes = num_classes or num_clusters
    generator = torch.Generator().manual_seed(seed)
    # Training items may be random crops: each is drawn under a seed of its own (sample_pixels),
    # so the fit depends on the data and `seed` only, not on what the process drew before (a
    # training run, its length, its other switches) nor on --num-workers.
    train = sample_pixels(train_dataset, max_pixels, max_images, generator, num_workers, progress, seed)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    centres, inertia = kmeans((train - mean) / std, num_clusters, iters, restarts, seed)

    def clustered(dataset: Dataset, desc: str) -> UnsupervisedMetrics:
        metrics = UnsupervisedMetrics(num_clusters, num_classes, ignore_index, overcluster=overcluster)
        for image, label in tqdm(_items(dataset, None, num_workers), total=len(dataset), desc=desc,
                                 disable=not progress, leave=False):
            pred = _sq_distances((_pixels(image) - mean) / std, centres).argmin(1)
            metrics.update(pred.view(label.shape), label)
        return metrics

    fit = clustered(val_dataset, "k-means: evaluating" if score_dataset is None else "k-means: matching")
    scored = None if score_dataset is None else clustered(score_dataset, "k-means: scoring")
    result = plan_scores(fit, scored)
    result.update(method="kmeans-pixels", num_clusters=num_clusters,
                  train_pixels=int(train.shape[0]), inertia=inertia)
    return result

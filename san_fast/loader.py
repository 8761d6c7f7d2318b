"""DataLoaders whose every draw is a function of (seed, epoch, index): exact resume, DDP.

Training order: torch's DistributedSampler, seeded with the run's seed and set to the epoch
(the same permutation on every rank, each rank a strided share of it), cut into per-rank
batches, starting at any batch of the epoch. With world size W and per-rank batch b, global
batch s is positions [s*W*b, (s+1)*W*b) of the permutation on any W: the same images as one
process with batch W*b.

Augmentation: each item is drawn under torch's generator seeded with (seed, epoch, index),
whatever process or worker loads it, so ranks draw different (and reproducible) crops and flips,
and skipping the first batches of an epoch on resume changes nothing that follows.

Validation: rank r scores images r, r+W, ...: every image exactly once, no padding.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from san_fast.config import Config
from san_fast.distributed import DistEnv
from san_fast.runtime import Runtime, derive_seed
from san_fast.worker_threads import worker_options

AUGMENT_STREAM = 1  # derive_seed purpose tag for per-item augmentation


class SeededItems(Dataset):
    """Items keyed by (index, seed parts): each drawn under torch's CPU generator seeded with
    derive_seed(*parts). The seed is derived here, in the worker that loads the item, not in the
    sampler, which runs in the training process between steps. The caller's generator state is
    restored afterwards, so loading in the main process (no workers) does not disturb the
    training step's own random stream."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, tuple[int, ...]]):
        index, parts = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue a seeding of every
            # accelerator backend not yet initialised, capturing a stack trace for each, per item.
            torch.default_generator.manual_seed(derive_seed(*parts))
            return self.dataset[index]


class EpochBatches(Sampler):
    """This rank's batches of one epoch, as lists of (index, item seed parts), from a start batch."""

    def __init__(self, size: int, per_rank_batch: int, env: DistEnv, seed: int):
        self.sampler = DistributedSampler(range(size), num_replicas=env.world_size, rank=env.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.batch = per_rank_batch
        self.seed = seed
        self.set_epoch(0)
        # A ragged last batch would skew the batch-wise descriptor and the BatchNorm statistics.
        self.per_epoch = self.sampler.num_samples // per_rank_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch` from its batch `start`; the permutation is drawn here, not while steps run."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start
        self.indices = list(self.sampler)

    def __len__(self) -> int:
        return max(self.per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, self.per_epoch):
            chunk = self.indices[b * self.batch:(b + 1) * self.batch]
            yield [(i, (self.seed, AUGMENT_STREAM, self.epoch, i)) for i in chunk]


class RankShard(Sampler):
    """Indices rank, rank + W, ... of a dataset: each item on exactly one rank."""

    def __init__(self, size: int, env: DistEnv):
        self.indices = list(range(env.rank, size, env.world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def _common(cfg: Config, runtime: Runtime) -> dict:
    """What every DataLoader of a run shares: workers with one-thread native pools, pinned
    batches for a CUDA device, workers kept across epochs."""
    return dict(**worker_options(cfg.num_workers), pin_memory=runtime.device.type == "cuda",
                persistent_workers=cfg.num_workers > 0)


def train_loader(cfg: Config, dataset: Dataset, env: DistEnv, runtime: Runtime) -> DataLoader:
    batches = EpochBatches(len(dataset), cfg.batch_size // env.world_size, env, cfg.seed)
    # The loader's own generator only seeds worker processes; items are seeded by SeededItems,
    # so this draw never touches the global stream the training step uses.
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, AUGMENT_STREAM, env.rank))
    return DataLoader(SeededItems(dataset), batch_sampler=batches, generator=generator, **_common(cfg, runtime))


def val_loader(cfg: Config, dataset: Dataset, env: DistEnv, runtime: Runtime) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.batch_size // env.world_size, sampler=RankShard(len(dataset), env),
                      **_common(cfg, runtime))

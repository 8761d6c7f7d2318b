"""What the training loader's workers do per item, and what the training process leaves to them:
numpy's BLAS at one thread (inherited all-core pools in every worker oversubscribe the CPU, see
san_fast/worker_threads.py), item seeds derived in the worker, the CPU generator seeded alone."""

import sys

import pytest
import torch
from torch.utils.data import Dataset

threadpoolctl = pytest.importorskip("threadpoolctl")

from san_fast import worker_threads  # noqa: E402
from san_fast.config import resolve  # noqa: E402
from san_fast.distributed import DistEnv  # noqa: E402
from san_fast.loader import train_loader, val_loader  # noqa: E402
from san_fast.runtime import build_runtime  # noqa: E402


def blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


class ThreadCounts(Dataset):
    """Each item: the BLAS pools' thread counts in the process that loads it."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor(blas_threads() or [-1])


def cfg(workers: int):
    return resolve(dict(num_workers=workers, batch_size=2, device="cpu"), cuda_available=False)


def test_workers_run_blas_with_one_thread_and_the_main_process_keeps_its_pools():
    if not blas_threads():
        pytest.skip("numpy's BLAS is not one threadpoolctl can see")
    c = cfg(workers=1)
    # Two threads in the parent, so a worker that inherits its pools unchanged would show 2.
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        seen = torch.cat(list(val_loader(c, ThreadCounts(), DistEnv(), build_runtime(c))))
        assert blas_threads() == before
    assert seen.min().item() == 1 and seen.max().item() == 1, seen


def test_the_training_loader_limits_its_workers_too():
    c = cfg(workers=1)
    loader = train_loader(c, ThreadCounts(), DistEnv(), build_runtime(c))
    assert loader.worker_init_fn is worker_threads.limit_worker_threads
    assert val_loader(c, ThreadCounts(), DistEnv(), build_runtime(c)).worker_init_fn is worker_threads.limit_worker_threads
    assert train_loader(cfg(0), ThreadCounts(), DistEnv(), build_runtime(c)).worker_init_fn is None


def test_a_missing_threadpoolctl_is_said_once_and_workers_still_load(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import raises ImportError
    worker_threads.warn_unlimited_workers.cache_clear()
    try:
        worker_threads.limit_worker_threads(0)  # a no-op without it, not an error in the worker
        worker_threads.warn_unlimited_workers()
        worker_threads.warn_unlimited_workers()
    finally:
        worker_threads.warn_unlimited_workers.cache_clear()
    out = capsys.readouterr().out
    assert out.count("threadpoolctl is not installed") == 1, out


class Draws(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.randint(0, 1 << 30, (4,))


def test_items_draw_from_their_derived_seed_on_the_cpu_generator_alone(monkeypatch):
    """An item's draws are those of torch's CPU generator seeded with derive_seed(*parts), and
    the main stream is left where it was. torch.manual_seed is not called: it would also queue a
    seeding of every accelerator backend not yet started, with a stack trace each, per item."""
    from san_fast.loader import SeededItems
    from san_fast.runtime import derive_seed

    expected = torch.Generator().manual_seed(derive_seed(5, 1, 2, 3))
    want = torch.randint(0, 1 << 30, (4,), generator=expected)

    def refused(seed):
        raise AssertionError("torch.manual_seed called for an item")

    monkeypatch.setattr(torch, "manual_seed", refused)
    state = torch.get_rng_state()
    got = SeededItems(Draws())[(3, (5, 1, 2, 3))]
    assert torch.equal(got, want)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_sampler_leaves_seed_derivation_to_the_workers():
    from san_fast.loader import AUGMENT_STREAM, EpochBatches

    batches = EpochBatches(8, 4, DistEnv(), seed=7)
    batches.set_epoch(2)
    first = next(iter(batches))
    assert all(parts == (7, AUGMENT_STREAM, 2, i) for i, parts in first)

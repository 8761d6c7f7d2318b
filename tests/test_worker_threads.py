"""DataLoader workers run numpy's BLAS with one thread: inherited all-core pools in every worker
oversubscribe the CPU (see san_fast/worker_threads.py)."""

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

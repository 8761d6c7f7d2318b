"""One thread per native thread pool in each DataLoader worker (san_fast.loader, the k-means
baseline, the dataset checks)."""

from __future__ import annotations

import functools


def limit_worker_threads(worker_id: int) -> None:
    """DataLoader worker_init_fn: one thread for each native thread pool (numpy's BLAS, OpenMP)
    in a worker. A forked worker keeps its parent's pool sizes, all cores each, so W workers run
    W x cores threads, and OpenBLAS's threads busy-wait after each call. Measured on 2 cores
    (synthetic scenes, whose noise fields are small matrix products): 2 workers gave 227 img/s
    with the inherited pools, fewer than loading in the main process (336), and 611 with one
    thread each; the spinning threads also take the cores the training process needs to issue
    its kernels. torch's own pool the DataLoader already sets to one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a declared dependency; warned about once in the main process
        return
    threadpool_limits(limits=1)  # not a `with`: the limit lasts for the worker's life


@functools.lru_cache(maxsize=1)
def warn_unlimited_workers() -> None:
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        print("san_fast: threadpoolctl is not installed, so DataLoader workers keep numpy's BLAS "
              "threads (one per core each); pip install threadpoolctl")


def worker_options(num_workers: int) -> dict:
    """A DataLoader's worker arguments: `num_workers` workers, each with one-thread native pools
    (said once where that cannot be done)."""
    if num_workers <= 0:
        return {"num_workers": num_workers, "worker_init_fn": None}
    warn_unlimited_workers()
    return {"num_workers": num_workers, "worker_init_fn": limit_worker_threads}

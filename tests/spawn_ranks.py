"""Start training processes from tests: K ranks with gloo on the CPU (as torchrun would set them up),
a free port each time, a timeout, and every process reaped whatever happens.

`target(rank, *args)` must be a module-level function (spawn pickles it by name); its return value
comes back through a queue. A process that ends by SIGKILL (the resume tests kill themselves after
a checkpoint) returns None.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, target: Callable, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(threads)
    try:
        # Plain pickle: the queue's own pickler would share tensors through file descriptors,
        # which vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(target(rank, *args))))
    except BaseException:  # reported to the test, which fails with it
        results.put((rank, "error", traceback.format_exc()))
        raise


def run_ranks(target: Callable, world: int, *args: Any, timeout: float = 240.0,
              threads: Optional[int] = None) -> list[Any]:
    """Run `target` in `world` fresh processes; the list of their return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # One thread per process: two ranks on two cores would otherwise fight over them.
    threads = threads or (1 if world > 1 else max(1, os.cpu_count() or 1))
    procs = [ctx.Process(target=_entry, args=(r, world, port, threads, target, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # all ended; a rank killed on purpose sends nothing
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout:.0f} s") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=30)
        for r, p in enumerate(procs):
            if r not in out and p.exitcode != -signal.SIGKILL:
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} and no result")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out.get(r) for r in range(world)]

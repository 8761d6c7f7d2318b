"""torch.distributed set-up for torchrun: one process per GPU (or per CPU worker with gloo).

`torchrun --nproc_per_node K train.py ...` (and the multi-node form) sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `setup` reads them, so the same command trains on one
process or many. NCCL on CUDA, gloo on the CPU. `--batch-size` is the global batch: each rank
takes an equal share of it.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from san_fast.config import Config, ConfigError
from san_fast.runtime import resolve_device

# Generous: a collective may wait for rank 0 while it writes a checkpoint or checks files.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # None: a single process, no process group
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this run created the process group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self, batch_size: int) -> dict[str, Any]:
        """What config.json and metrics.json say about how the run was launched."""
        return {"world_size": self.world_size, "per_rank_batch": batch_size // self.world_size,
                "backend": self.backend or "none (single process)"}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None


def launch_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun set them; (0, 0, 1) outside torchrun."""
    return _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)


def setup(cfg: Config) -> DistEnv:
    """Check the batch split, pick the device and backend, and join the process group."""
    rank, local_rank, world = launch_env()
    device = resolve_device(cfg.device)
    if world <= 1:
        return DistEnv(device=device)
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                          f"{world} processes (WORLD_SIZE={world}): use a multiple of {world}")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    return DistEnv(rank, local_rank, world, backend, device, owns)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op=None) -> torch.Tensor:
    """In place over all ranks (sum unless `op`); a no-op for one process."""
    if env.enabled:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def differentiable_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks, with gradients summed over ranks in the backward pass (what global
    batch statistics need). Eager: torch.distributed.nn.functional.all_reduce (every supported
    torch); under torch.compile, which that function refuses from torch 2.13, the functional
    collective, which traces into the graph and is differentiable there."""
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(tensor, "sum", dist.group.WORLD)
    from torch.distributed.nn.functional import all_reduce as autograd_all_reduce

    with warnings.catch_warnings():
        # deprecated in torch 2.13 for the functional collectives, which are differentiable only
        # in recent releases
        warnings.simplefilter("ignore", FutureWarning)
        return autograd_all_reduce(tensor)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier(device_ids=[env.local_rank] if env.backend == "nccl" else None)


def on_main(fn: Callable[[], Any], env: DistEnv) -> Any:
    """`fn()` on rank 0 only. An expected error it raises (a bad value, an OS error, divergence) is
    raised on every rank, so no rank is left waiting in a collective for one that stopped."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except (ValueError, OSError, FloatingPointError) as exc:
            if not env.enabled:
                raise
            error = exc
    error = broadcast_object(error, env)
    if error is not None:
        raise error
    return result

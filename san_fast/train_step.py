"""One optimiser step with no host synchronisation, and the on-device sums it leaves behind.

Nothing here reads a tensor to the host (no .item(), float(), bool(tensor), .cpu()): loss terms
are summed on the device, a non-finite loss skips the optimiser step on the device (fused Adam
takes a ``found_inf`` tensor, as under a GradScaler), and the trainer reads everything in one
transfer every --log-every steps (san_fast/trainer.py).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from san_fast import ops
from san_fast.config import Config
from san_fast.distributed import DistEnv
from san_fast.model import SAN
from san_fast.runtime import Runtime
from san_fast.step_profile import phase


class Objective(nn.Module):
    """What DDP wraps: its forward is the training loss, so DDP's hooks see the step's forward
    (SAN.forward returns the model's outputs, not the loss)."""

    def __init__(self, model: SAN):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.losses(x)


def wrap_objective(model: SAN, cfg: Config, env: DistEnv, runtime: Runtime) -> nn.Module:
    objective: nn.Module = Objective(model)
    if env.enabled:
        # Buffers (BatchNorm statistics, the running descriptor) are computed from globally
        # all-reduced values, so they agree on every rank without DDP re-broadcasting them each
        # step (torch 2.13 renamed that switch).
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
        objective = DistributedDataParallel(
            objective, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=not cfg.reconstruction, **no_sync)
    mode = runtime.compile_mode
    if mode is None:
        return objective
    return torch.compile(objective, mode=None if mode == "default" else mode)


def cudagraph_skips(runtime: Runtime) -> Optional[int]:
    """How many compiled graphs inductor left without CUDA graphs under the reduce-overhead
    mode on a CUDA device (None elsewhere). It skips them quietly: the reasons go to torch's
    `cudagraphs` log artifact (TORCH_LOGS=cudagraphs), the count to a counter."""
    if not (runtime.compile_mode == "reduce-overhead" and runtime.device.type == "cuda"):
        return None
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def build_optimizer(model: nn.Module, cfg: Config, announce: bool = True) -> torch.optim.Adam:
    """Adam, fused (one kernel over all parameters: about 28 bytes of traffic per parameter and
    step against 72 for foreach) where this torch and device support it, else foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError as err:
        if announce:
            print(f"san_fast: fused Adam unavailable ({str(err).splitlines()[0]}); using foreach Adam, "
                  "which reads each step's loss to the host to skip non-finite steps")
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


@torch.no_grad()
def semantic_wins(q: torch.Tensor, gamma: torch.Tensor, num_semantics: int, impl: str) -> torch.Tensor:
    """(N,) pixels won by each semantic (argmax of the SEAT attention): the collapse indicator is
    how many are non-zero. scatter_add_ rather than bincount, which reads its maximum to the
    host on CUDA."""
    labels = ops.seat_labels(q, gamma, impl=impl).reshape(-1)
    wins = torch.zeros(num_semantics, dtype=torch.int64, device=labels.device)
    return wins.scatter_add_(0, labels, torch.ones_like(labels))


class LossSums:
    """The loss terms summed on the device over the current epoch, the number of non-finite
    steps and the first of them; all plain tensors, saved in a checkpoint as they are."""

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.sums: Optional[torch.Tensor] = None
        self.steps = 0  # counted on the host: known without reading the device
        self.bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)

    def add(self, terms: dict[str, torch.Tensor], bad: torch.Tensor, step: int) -> None:
        if not self.keys:
            self.keys = list(terms)
        values = torch.stack([terms[k].detach().float() for k in self.keys])
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)
        self.bad = self.bad + bad.to(torch.int64)

    def state_dict(self) -> dict:
        """On the CPU: gathered from every rank into rank 0's checkpoint (a checkpoint read)."""
        return {"keys": list(self.keys), "sums": None if self.sums is None else self.sums.cpu(),
                "steps": self.steps, "bad": self.bad.cpu(), "first_bad": self.first_bad.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.keys = list(state["keys"])
        self.sums = None if state["sums"] is None else state["sums"].to(self.device)
        self.steps = int(state["steps"])
        self.bad = state["bad"].to(self.device)
        self.first_bad = state["first_bad"].to(self.device)

    def load_ranks(self, states: list[dict], rank: int, world_size: int) -> None:
        """Restore this rank's sums from every rank's saved ones. With another world size than
        the one that saved them, rank 0 takes their total and the others start from zero: the
        all-reduced means stay right."""
        if len(states) == world_size:
            return self.load_state_dict(states[rank])
        self.reset()
        self.keys = list(states[0]["keys"])
        if rank == 0:
            sums = [s["sums"] for s in states if s["sums"] is not None]
            self.sums = torch.stack(sums).sum(0).to(self.device) if sums else None
            self.steps = sum(int(s["steps"]) for s in states)


class TrainStep:
    """Forward, backward and optimiser step of one batch."""

    def __init__(self, objective: nn.Module, model: SAN, optimizer: torch.optim.Adam, runtime: Runtime,
                 cfg: Config, env: DistEnv, sums: LossSums):
        self.objective, self.model, self.optimizer = objective, model, optimizer
        self.runtime, self.cfg, self.env, self.sums = runtime, cfg, env, sums
        self.fused = bool(optimizer.defaults.get("fused"))

    def __call__(self, images: torch.Tensor, step: int, monitor: bool) -> Optional[torch.Tensor]:
        """Train on one batch (`step` is its 1-based number); with `monitor`, also return the
        (N,) wins of each semantic on it (on the device)."""
        cfg = self.cfg
        if self.runtime.compile_mode == "reduce-overhead":
            # CUDA graphs reuse their output buffers: this step's outputs are new from here on.
            torch.compiler.cudagraph_mark_step_begin()
        with phase("prepare"):
            x = self.runtime.prepare(images, cfg.color_jitter, cfg.color_drop)
        with phase("forward"), self.runtime.autocast():
            terms, q, gamma = self.objective(x)
        with phase("monitor"):
            wins = semantic_wins(q, gamma, cfg.semantics(), self.model.seat_impl) if monitor else None
        del q, gamma  # as large as the op's input: free it before the backward pass
        loss = terms["loss"]
        bad = ~torch.isfinite(loss.detach())
        if self.env.enabled:  # every rank must skip the same steps, or their weights part ways
            bad = bad.to(torch.int32)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            bad = bad.bool()
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.runtime.scaler
        with phase("backward"):
            (scaler.scale(loss) if scaler is not None else loss).backward()
        with phase("optimizer"):
            self._optimizer_step(bad)
        with phase("sums"):
            self.sums.add(terms, bad, step)
        return wins

    def _optimizer_step(self, bad: torch.Tensor) -> None:
        scaler = self.runtime.scaler
        if scaler is not None:
            # A non-finite loss gives non-finite gradients: the scaler skips the step, as PyTorch
            # does under fp16 (without a host read when the optimizer is fused).
            scaler.step(self.optimizer)
            scaler.update()
        elif self.fused:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif not bad.item():  # foreach Adam has no device-side skip: one host read per step
            self.optimizer.step()

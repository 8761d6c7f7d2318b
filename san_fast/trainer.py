"""The training loop: epochs of steps, reads at log points, evaluations, checkpoints, resume.

The device is read only at log points (every --log-every steps and at each epoch's last step)
and at checkpoints: one transfer of the summed loss terms, the collapse indicator and the
divergence flags. What the logger (san_fast.logger: TensorBoard or nothing) gets comes from those
reads and from host-side values (learning rate, wall time): logging adds no device read. A
non-finite loss is detected on the device and its step skipped there; the run stops at the
next read with DivergedError, before any checkpoint or result is written, so the last good
checkpoint stays as it was.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from san_fast.checkpoint import CHECKPOINT_FORMAT, rank_rng, save_checkpoint
from san_fast.config import Config
from san_fast.distributed import DistEnv, all_gather_objects, all_reduce, on_main
from san_fast.evaluation import DivergedError
from san_fast.io_utils import atomic_write_text
from san_fast.logger import NullLogger
from san_fast.run_folder import CHECKPOINT, CONFIG, RunFolder
from san_fast.runtime import rng_state, set_rng_state
from san_fast.step_profile import StepProfiler, phase
from san_fast.train_step import TrainStep

WARMUP_STEPS = 5  # steps left out of images_per_second_after_warmup (compilation, allocator)
Evaluate = Callable[[int, str], tuple[dict, dict]]  # (num_vis, desc) -> (scores, shown)
Panels = Callable[[dict, dict], np.ndarray]  # (scores, shown) -> pixels of the prediction grid


@dataclass
class Progress:
    epoch: int = 1  # the epoch being trained, 1-based
    batch: int = 0  # batches of it done
    step: int = 0  # optimiser steps done in all
    history: dict[str, list] = field(default_factory=dict)

    def log(self, key: str, value: Any) -> None:
        self.history.setdefault(key, []).append(value)


class StepClock:
    """Training-loop wall time, time spent waiting for batches, and the rate after warm-up. The
    device is synchronised only where the loop stops anyway (epoch end) and once at warm-up."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total = self.waiting = 0.0
        self.started: Optional[float] = None
        self.warm: Optional[tuple[float, int]] = None  # loop time and images at the end of warm-up
        self.waiting_warm = 0.0  # time spent waiting for batches by then (worker start-up included)
        self.warm_unix = self.stopped_unix = 0.0  # wall clock, for tools sampling the GPU meanwhile
        self.gaps: list[float] = []  # ms between consecutive step ends after warm-up
        self._last_tick: Optional[float] = None  # host clock at the last step end (CPU)
        self._events: deque = deque()  # CUDA events at step ends, not yet turned into gaps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.total += time.perf_counter() - self.started
        self.started = None
        self.stopped_unix = time.time()

    def elapsed(self) -> float:
        return self.total + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def next_batch(self, iterator):
        tic = time.perf_counter()
        item = next(iterator)
        self.waiting += time.perf_counter() - tic
        return item

    def mark_warm(self, images: int) -> None:
        self._sync()
        self.warm = (self.elapsed(), images)
        self.waiting_warm = self.waiting
        self.warm_unix = time.time()
        self.gaps, self._events, self._last_tick = [], deque(), None
        self._mark()

    def tick(self) -> None:
        """A step's end after warm-up. Their intervals' median is untouched by one-off work (a
        recompilation, a checkpoint, a log read). On a GPU the intervals are the device's: CUDA
        events recorded at each step's end, read once complete. The host's own intervals measure
        only the host while it runs ahead of the GPU: on an H100 they gave a median of 8.7 ms for
        steps whose kernels took 12.5 ms (bench/results/nvidia-h100-2026-11-26-c)."""
        if self.warm is not None:
            self._mark()

    def _mark(self) -> None:
        if self.device.type != "cuda":
            now = time.perf_counter()
            if self._last_tick is not None:
                self.gaps.append(1e3 * (now - self._last_tick))
            self._last_tick = now
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._events.append(event)
        self._settle()

    def _settle(self) -> None:
        """Gaps between step-end events the GPU has passed (query() does not wait for it)."""
        while len(self._events) >= 2 and self._events[1].query():
            first = self._events.popleft()
            self.gaps.append(first.elapsed_time(self._events[0]))

    def summary(self, images: int) -> dict[str, Any]:
        after = wait_after = None
        if self.warm is not None and self.total > self.warm[0]:
            after = round((images - self.warm[1]) / (self.total - self.warm[0]), 2)
            wait_after = round((self.waiting - self.waiting_warm) / (self.total - self.warm[0]), 4)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        self._settle()  # the clock has stopped: the device has passed every event
        gaps = self.gaps
        return {"seconds": round(self.total, 2),
                "median_step_ms_after_warmup": round(statistics.median(gaps), 3) if gaps else None,
                "images_per_second": round(images / max(self.total, 1e-9), 2),
                "images_per_second_after_warmup": after, "peak_gpu_memory_bytes": peak,
                "data_wait_fraction": round(self.waiting / max(self.total, 1e-9), 4),
                # the same over the steps after warm-up: whether the loader kept up with them
                "data_wait_fraction_after_warmup": wait_after,
                # the steps after warm-up (evaluations and checkpoints fall inside it)
                "measured_window_unix_s": [self.warm_unix, self.stopped_unix] if after else None}


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, step: TrainStep, loader, folder: RunFolder,
                 evaluate: Evaluate, run_record: dict, logger: Optional[NullLogger] = None,
                 panels: Optional[Panels] = None):
        self.cfg, self.env, self.step_fn, self.loader = cfg, env, step, loader
        self.batches = loader.batch_sampler
        self.folder, self.evaluate, self.run_record = folder, evaluate, run_record
        self.logger = logger or NullLogger()
        self.panels = panels
        # At the last logged read: (summed step count, summed loss terms) of the epoch, and
        # (images, loop seconds); the logger gets each term's mean over the steps since then.
        self._logged_sums: Optional[tuple[float, list[float]]] = None
        self._logged_clock = (0, 0.0)
        self.model, self.optimizer, self.sums = step.model, step.optimizer, step.sums
        self.device = step.runtime.device
        self.progress = Progress()
        self.clock = StepClock(self.device)
        # Rank 0 only: one trace per run folder.
        self.profiler = StepProfiler((cfg.profile_steps or 0) if env.is_main else 0, self.device, folder.path)
        self.images = 0
        self.total_steps = cfg.epochs * self.batches.per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.epochs = -(-self.total_steps // self.batches.per_epoch)
        self.result: Optional[tuple[dict, dict, dict]] = None  # scores, shown, history
        self._means: dict[str, float] = {}  # loss means of the epoch, as of the last read
        self.saved_step: Optional[int] = None  # step of the last checkpoint this run wrote or resumed

    # --- the loop --------------------------------------------------------------------------

    def fit(self) -> tuple[dict, dict, dict]:
        """Train to the last step; (final scores, shown images, history)."""
        start_step = self.progress.step
        try:
            while self.progress.step < self.total_steps:
                self._train_epoch(start_step)
        finally:
            self.profiler.stop()
            gc.unfreeze()  # what warm-up froze may be collected again (a process may train twice)
        if self.result is None:  # resumed from the checkpoint of a finished run
            scores, shown = self.evaluate(self.cfg.num_vis, "final eval")
            self.result = scores, shown, self.progress.history
        return self.result

    def _train_epoch(self, start_step: int) -> None:
        p, per_epoch = self.progress, self.batches.per_epoch
        steps = min(per_epoch - p.batch, self.total_steps - p.step)
        self.batches.set_epoch(p.epoch, p.batch)
        iterator = iter(self.loader)  # the loader's seeding reads happen here, once per epoch
        with tqdm(total=per_epoch, initial=p.batch, desc=f"epoch {p.epoch}/{self.epochs}",
                  dynamic_ncols=True, disable=not self.env.is_main) as bar:
            self._run_steps(iterator, steps, start_step, bar)
        self._end_epoch(partial=p.batch < per_epoch)

    def _run_steps(self, iterator, steps: int, start_step: int, bar) -> None:
        """`steps` steps; the device is read only in _read (log points, checkpoints)."""
        p, per_epoch = self.progress, self.batches.per_epoch
        self.clock.start()
        for _ in range(steps):
            with phase("next_batch"):
                images, _ = self.clock.next_batch(iterator)
            last = p.batch + 1 == per_epoch or p.step + 1 == self.total_steps
            monitor = (p.step + 1) % self.cfg.log_every == 0 or last
            save = bool(self.cfg.save_every) and (p.step + 1) % self.cfg.save_every == 0 and not last
            # The run's first step also computes the collapse monitor (left unread), so that its
            # kernels compile and autotune in warm-up rather than inside the steps measured after
            # it (images_per_second_after_warmup).
            wins = self.step_fn(images, p.step + 1, monitor or p.step == start_step)
            p.step, p.batch = p.step + 1, p.batch + 1
            self.images += self.cfg.batch_size
            bar.update()
            warm_step = p.step - start_step == WARMUP_STEPS
            if warm_step:
                # The objects alive now (compiled graphs, model, optimizer: 400k+ of them with a
                # compiled model) leave the collector's view until fit() returns: a full
                # collection over them takes ~150 ms on a 2-core CPU, a pause in whichever step
                # it falls.
                gc.freeze()
                self.clock.mark_warm(self.images)
                self.profiler.start()
            else:
                self.clock.tick()
            if monitor or save:  # an epoch's last step is always a monitor step
                with phase("read"):
                    self._means = self._read(wins if monitor else None, bar if monitor else None)
            if not warm_step:
                self.profiler.step_done()
            if save:
                self.clock.stop()
                self.save()
                self.clock.start()
        self.clock.stop()
        self.profiler.stop()  # a window never spans an evaluation

    def _read(self, wins: Optional[torch.Tensor], bar) -> dict[str, float]:
        """The one host read: epoch means so far, the collapse indicator, the divergence flags."""
        s = self.sums
        count = torch.full((1,), float(s.steps), device=self.device)
        shared = torch.cat([count, s.sums, wins.float() if wins is not None else count.new_zeros(0)])
        all_reduce(shared, self.env)  # identical flags need no reduction: they were reduced per step
        weights_bad = torch.stack([~torch.isfinite(p).all() for p in self.model.parameters()]).any()
        local = torch.stack([s.bad.double(), s.first_bad.double(), weights_bad.double()])
        values = torch.cat([shared.double(), local]).tolist()
        bad, first_bad, weights_bad = values[-3:]
        if bad or weights_bad:
            where = f"at step {int(first_bad)}" if bad else f"by step {self.progress.step}"
            raise DivergedError(f"training diverged: {'the loss' if bad else 'the weights'} became "
                                f"non-finite {where} (lr {self.cfg.lr:g}); {self._last_good()}")
        k = len(s.keys)
        means = {key: values[1 + i] / values[0] for i, key in enumerate(s.keys)}
        if wins is not None:
            used = sum(v > 0 for v in values[1 + k:1 + k + self.cfg.semantics()])
            self.progress.log("clusters_used", used)
            bar.set_postfix(loss=f"{means['loss']:.4f}", used=f"{used}/{self.cfg.semantics()}")
            self._log_train(values[0], values[1:1 + k], used)
        return means

    def _log_train(self, count: float, sums: list[float], used: int) -> None:
        """The logger's training scalars at a log point: each loss term's mean over the steps
        since the previous log point, the learning rate, images/s over the loop time between
        them, and the collapse indicator."""
        if not self.logger.enabled:
            return
        base_count, base_sums = self._logged_sums or (0.0, [0.0] * len(sums))
        elapsed = self.clock.elapsed()
        images, since = self.images - self._logged_clock[0], elapsed - self._logged_clock[1]
        if count > base_count:
            terms = {key: (sums[i] - base_sums[i]) / (count - base_count) for i, key in enumerate(self.sums.keys)}
            self.logger.log_train(self.progress.step, terms, lr=self.optimizer.param_groups[0]["lr"],
                                  images_per_second=images / since if since > 0 else None, clusters_used=used)
        self._logged_sums, self._logged_clock = (count, list(sums)), (self.images, elapsed)

    def _last_good(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint, {self.folder.file(CHECKPOINT)} (step {self.saved_step}), is unchanged"

    def _end_epoch(self, partial: bool) -> None:
        """Epoch means and (when due) validation; then a checkpoint. A run that stops inside an
        epoch (--max-steps) reports that partial epoch but checkpoints its position in it."""
        p, means = self.progress, self._means
        last = p.step >= self.total_steps
        history = {k: list(v) for k, v in p.history.items()}
        for key, value in means.items():
            history.setdefault(key, []).append(value)
        scores, shown = None, {}
        if last or p.epoch % self.cfg.eval_every == 0:
            # Panels for the logger at every evaluation; predictions.png takes the last ones.
            num_vis = self.cfg.num_vis if last or self.logger.enabled else 0
            scores, shown = self.evaluate(num_vis, f"eval epoch {p.epoch}")
            history.setdefault("val_acc", []).append(scores["acc"])
            history.setdefault("val_miou", []).append(scores["miou"])
            history.setdefault("val_epoch", []).append(p.epoch)  # the x of val_* (--eval-every)
            self._log_eval(scores, shown)
        if self.env.is_main:
            tqdm.write(_log_line(p.epoch, means, scores))
        if not partial:
            p.history = history
            p.epoch, p.batch = p.epoch + 1, 0
            self.sums.reset()
            self._logged_sums = None
        self.save()
        if last:
            self.result = scores, shown, history

    def _log_eval(self, scores: dict, shown: dict) -> None:
        if self.logger.enabled:
            grid = self.panels(scores, shown) if shown and self.panels is not None else None
            self.logger.log_eval(self.progress.step, scores, grid)

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self, ranks: list[dict]) -> dict[str, Any]:
        """The checkpoint; `ranks` holds every rank's random state and loss sums."""
        p = self.progress
        scaler = self.step_fn.runtime.scaler
        return {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "config": self.cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "progress": {"epoch": p.epoch, "batch": p.batch, "step": p.step},
            "history": p.history, "running": [r["running"] for r in ranks],
            "rng": [r["rng"] for r in ranks], "distributed": self.run_record,
        }

    def save(self) -> None:
        """Checkpoint and config.json, by rank 0, atomically; every rank's random state in it."""
        mine = {"rng": rng_state(self.device), "running": self.sums.state_dict()}
        ranks = all_gather_objects(mine, self.env)

        def write() -> None:
            atomic_write_text(self.folder.file(CONFIG), config_json(self.cfg, self.run_record))
            save_checkpoint(self.state(ranks), str(self.folder.file(CHECKPOINT)))

        on_main(write, self.env)
        self.saved_step = self.progress.step

    def restore(self, state: dict[str, Any], path: str) -> None:
        """Continue exactly where `state` stopped (model weights are loaded by the caller)."""
        self.optimizer.load_state_dict(state["optimizer"])
        scaler = self.step_fn.runtime.scaler
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        saved = state["progress"]
        self.progress = Progress(int(saved["epoch"]), int(saved["batch"]), int(saved["step"]),
                                 {k: list(v) for k, v in state["history"].items()})
        self.sums.load_ranks(state["running"], self.env.rank, self.env.world_size)
        self.saved_step = self.progress.step
        rng = rank_rng(state, self.env.rank, self.env.world_size)
        if rng is not None:
            set_rng_state(rng, self.device)
        elif self.env.is_main:
            print(f"san_fast: {path} was written by {len(state.get('rng') or [])} processes, this run has "
                  f"{self.env.world_size}: random streams restart, so the continuation is not bit-exact")
        if self.env.is_main:
            print(f"resumed from {path}: epoch {self.progress.epoch}, batch {self.progress.batch}, "
                  f"step {self.progress.step}")


def config_json(cfg: Config, run_record: dict) -> str:
    return json.dumps({**cfg.to_dict(), "distributed": run_record}, indent=2, sort_keys=True)


def _log_line(epoch: int, means: dict[str, float], scores: Optional[dict]) -> str:
    parts = [f"epoch {epoch}"] + [f"{k} {v:.4f}" for k, v in means.items()]
    if scores is not None:
        parts += [f"val acc {scores['acc']:.4f}", f"mIoU {scores['miou']:.4f}",
                  f"clusters used {scores['clusters_used']}"]
    return " | ".join(parts)

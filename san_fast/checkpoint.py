"""Checkpoints: what they hold, safe loading, and the checks before one is trusted.

A checkpoint is a dict of tensors and plain types only, read back with
``torch.load(weights_only=True)``, so loading one never runs code a pickle carries:

    format      CHECKPOINT_FORMAT
    model       SAN.state_dict() (no DDP "module." prefix)
    config      Config.to_dict()
    optimizer   Adam's state_dict();  scaler: GradScaler.state_dict() or None
    progress    epoch (being trained, 1-based), batch (batches of it done), step (optimiser steps)
    history     per-epoch losses and validation scores, collapse indicator at log points
    running     one entry per rank: the current epoch's loss sums (a mid-epoch resume logs the
                same means)
    rng         one entry per rank: Python, NumPy, torch CPU (and CUDA) generator states
    distributed world size, per-rank batch, backend

The data order and each item's augmentation are functions of (seed, epoch, index), so the
position inside the epoch is all the loader needs (san_fast/loader.py).
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any, Optional

import torch

from san_fast.config import Config, ConfigError, config_from_dict
from san_fast.io_utils import atomic_torch_save
from san_fast.run_folder import differing_settings

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or does not belong to this run."""


def save_checkpoint(state: dict[str, Any], path: str) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at `path`, loaded with weights_only=True; one-line errors for a missing,
    empty, unreadable, unsafe or foreign file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder: expected a checkpoint file, "
                              f"e.g. {os.path.join(path, 'checkpoint.pt')}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            # (torch's warnings about a file it refuses are dropped: the error says it all)
            raise CheckpointError(f"refused to load {path}: it holds Python objects other than tensors and "
                                  f"plain types, whose unpickling could run code ({_reason(err)})") from None
        except Exception as err:  # torch.load raises many kinds (RuntimeError, EOFError, KeyError, ...) on junk
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: "
                                  f"{_reason(err)})") from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a san_fast checkpoint (it has no 'model' and 'config' entries)")
    return state


def _reason(err: BaseException) -> str:
    """The informative line of a (long, multi-line) torch.load error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            rest = rest or (lines[i + 1] if i + 1 < len(lines) else line)
            return rest.split(" was not an allowed global")[0]  # the rest is advice to allow it
    return lines[0] if lines else type(err).__name__


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    """The Config a checkpoint was trained with."""
    try:
        return config_from_dict(dict(state["config"]))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the checkpoint's config is not usable: {err}") from None


def check_compatible(cfg: Config, state: dict[str, Any], path: str) -> None:
    """One line naming every field where `cfg` and the checkpoint's config differ, unless the
    field only controls the run (run_folder.RUN_CONTROL_FIELDS)."""
    saved = config_from_checkpoint(state).to_dict()
    mine = cfg.to_dict()
    differ = differing_settings(mine, saved)
    if differ:
        fields = ", ".join(f"{k} {saved.get(k)!r} (this run: {mine[k]!r})" for k in differ)
        raise CheckpointError(f"--resume {path} was trained with other settings: {fields}")


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: str) -> None:
    """Strict load with a one-line error (shapes or names that differ)."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{path} does not fit this model: {detail[:300]}") from None


def rank_rng(state: dict[str, Any], rank: int, world_size: int) -> Optional[dict]:
    """This rank's saved random state, or None when the world size changed (then the streams
    restart and the continuation is no longer bit-exact)."""
    states = state.get("rng") or []
    return states[rank] if len(states) == world_size else None

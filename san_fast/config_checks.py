"""Config.validate and Config.check_paths: every value checked before any work is done, each
failure a one-line ConfigError naming the flag and what it expects."""

from __future__ import annotations

import math
import os
from typing import Any

from san_fast.config import (AMP_MODES, ATTN_BACKENDS, COMPILE_MODES, DATASETS, ENCODERS, EVAL_PROTOCOLS,
                             EVAL_SPLITS, FOLD_BN, GENERATORS, LOGGERS, OVERCLUSTER, POTSDAM_BANDS, SEAT_IMPLS,
                             TRAIN_CROPS, VIT_NORMS, Config, ConfigError)

_CHOICES = {
    "dataset": DATASETS, "encoder": ENCODERS, "attn": ATTN_BACKENDS, "seat_impl": SEAT_IMPLS, "fold_bn": FOLD_BN,
    "amp": AMP_MODES, "eval_protocol": EVAL_PROTOCOLS, "consistency_target": ("image", "rec_q"),
    "train_crop": TRAIN_CROPS, "potsdam_bands": POTSDAM_BANDS, "eval_split": EVAL_SPLITS,
    "overcluster": OVERCLUSTER, "generator": GENERATORS, "vit_norm": VIT_NORMS, "logger": LOGGERS,
    "compile_mode": COMPILE_MODES,
}
# Integer fields and their lowest allowed value (embed_dim and N are checked against the SEAT op).
_INT_AT_LEAST = {
    "crop_size": 8, "embed_dim": 1, "vit_depth": 1, "patch_size": 1, "epochs": 1, "batch_size": 1,
    "num_workers": 0, "synthetic_classes": 2, "synthetic_train_size": 1, "synthetic_val_size": 1,
    "synthetic_seed": 0, "seed": 0, "eval_every": 1, "log_every": 1, "num_vis": 0,
    "save_every": 1, "max_steps": 1, "vit_dim": 1, "vit_heads": 1, "num_semantics": 1,
    "synthetic_image_size": 8, "profile_steps": 1,
}
_OPTIONAL = {"save_every", "max_steps", "vit_dim", "vit_heads", "num_semantics", "synthetic_image_size",
             "profile_steps"}
# Float fields: (low, high, high is excluded). A huge --lr is valid: it diverges, and the trainer
# reports that.
_FLOAT_RANGES = {
    "lr": (0.0, math.inf, True), "weight_decay": (0.0, math.inf, True),
    "uniformity_weight": (0.0, math.inf, True), "color_jitter": (0.0, 1.0, True),
    "color_drop": (0.0, 1.0, False),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_float(name: str, value: Any, low: float, high: float, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0.0 if name == "lr" else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        low_text = "> 0" if name == "lr" else f">= {low:g}"
        high_text = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        raise ConfigError(f"{_flag(name)} {value!r}: expected a finite number {low_text}{high_text}")


def validate(cfg: Config) -> None:
    for name, allowed in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"{_flag(name)} {value!r}: expected one of {', '.join(allowed)}")
    for name, lowest in _INT_AT_LEAST.items():
        value = getattr(cfg, name)
        if value is None and name in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ConfigError(f"{_flag(name)} {value!r}: expected an integer >= {lowest}")
    for name, (low, high, high_open) in _FLOAT_RANGES.items():
        _check_float(name, getattr(cfg, name), low, high, high_open)
    _validate_model(cfg)
    lo, hi = cfg.train_crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"train_crop_scale {cfg.train_crop_scale}: expected 0 < low <= high <= 1")
    if cfg.device != "auto":
        try:
            import torch

            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {cfg.device!r}: expected auto, cpu, cuda or cuda:N") from None
    if cfg.dataset != "synthetic" and cfg.data_root is None:
        raise ConfigError(
            f"--dataset {cfg.dataset} reads files from disk: pass --data-root DIR "
            "(README.md, section Datasets, shows the expected layout)"
        )
    if cfg.compile_mode not in ("auto", "default") and not cfg.compile:
        raise ConfigError(f"--compile-mode {cfg.compile_mode} needs --compile")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue a run or start afresh")


def _validate_model(cfg: Config) -> None:
    from san_fast.ops import MAX_N, MIN_N, MIN_P  # the SEAT op's limits (ops imports torch)

    if cfg.embed_dim < MIN_P:
        raise ConfigError(f"--embed-dim {cfg.embed_dim}: expected at least {MIN_P} (the SEAT op's tiles)")
    if not MIN_N <= cfg.semantics() <= MAX_N:
        raise ConfigError(f"--num-semantics {cfg.semantics()}: expected {MIN_N} to {MAX_N} "
                          "(the SEAT op's range of N)")
    if cfg.crop_size % cfg.patch_size:
        raise ConfigError(f"--crop-size {cfg.crop_size} must be a multiple of --patch-size {cfg.patch_size}")
    scene = cfg.synthetic_image_size
    if scene is not None and (scene < cfg.crop_size or scene % cfg.patch_size):
        raise ConfigError(f"--synthetic-image-size {scene}: expected at least --crop-size {cfg.crop_size} "
                          f"and a multiple of --patch-size {cfg.patch_size}")
    if cfg.fold_bn == "on" and cfg.seat_impl == "torch":
        raise ConfigError("--fold-bn on applies BatchNorm inside the Triton SEAT kernels: it needs --seat-impl "
                          "triton or auto, not torch (the unfused reference)")
    if cfg.fold_bn == "on" and not cfg.reconstruction:
        raise ConfigError("--fold-bn on folds BatchNorm into the reconstruction op, which --no-reconstruction drops")
    if cfg.encoder == "unet" and cfg.crop_size % 8:
        raise ConfigError(f"--crop-size {cfg.crop_size}: the unet encoder needs a multiple of 8")
    if cfg.vit_width() % cfg.vit_num_heads():
        raise ConfigError(
            f"--vit-dim {cfg.vit_width()} must be divisible by --vit-heads {cfg.vit_num_heads()}"
        )


def check_paths(cfg: Config) -> None:
    """The run folder and checkpoint flags, against the file system (read-only)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out {cfg.out} is an existing file: expected a folder for the run")
    if cfg.resume is not None:
        if not os.path.isfile(cfg.resume):
            raise ConfigError(f"--resume {cfg.resume}: no such file")
        if os.path.getsize(cfg.resume) == 0:
            raise ConfigError(f"--resume {cfg.resume} is empty (0 bytes): not a checkpoint")

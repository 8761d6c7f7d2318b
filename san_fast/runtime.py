"""Device, mixed precision and input preparation: what changes between CPU, V100 and A100/H100."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from san_fast.augment import color_augment
from san_fast.config import Config

# ImageNet statistics: the usual normalisation of the peers; the reconstruction target is the
# normalised image, so every channel weighs about the same in the MSE.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    scaler: Optional[torch.amp.GradScaler]

    def __post_init__(self) -> None:
        # Built once: prepare() runs every step and would otherwise copy them to the device each time.
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor, jitter: float = 0.0, drop: float = 0.0) -> torch.Tensor:
        """uint8 (B,3,H,W) on any device -> normalised float on the run's device and layout,
        with batched colour augmentation when `jitter` or `drop` is set (training only)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B,3,H,W), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if jitter or drop:
            x = color_augment(x, jitter, drop)
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        # V100 (sm70) has no bf16: fp16 with a GradScaler there, bf16 from Ampere on.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("--amp bf16: this GPU has no bf16 support (V100?); use --amp fp16")
        return torch.bfloat16
    return torch.float16


def build_runtime(cfg: Config) -> Runtime:
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return Runtime(device, amp_dtype, channels_last, scaler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

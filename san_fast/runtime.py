"""Device, mixed precision and input preparation: what changes between CPU, V100 and A100/H100."""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from san_fast.augment import color_augment
from san_fast.config import Config, ConfigError

# ImageNet statistics: the usual normalisation of the peers; the reconstruction target is the
# normalised image, so every channel weighs about the same in the MSE.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Potsdam's 4th band (IR) has no ImageNet statistics (IIC only divides it by 255): it gets the
# average of the RGB ones, which puts it on the scale of an average colour channel of natural
# images, so it weighs about as much as R, G or B in the reconstruction MSE.
IR_MEAN = sum(MEAN) / 3
IR_STD = sum(STD) / 3


@functools.lru_cache(maxsize=8)
def _ir_normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,4,1,1) mean and std for RGB + IR, built once per device (prepare runs every step)."""
    mean = torch.tensor((*MEAN, IR_MEAN), device=device).view(1, 4, 1, 1)
    std = torch.tensor((*STD, IR_STD), device=device).view(1, 4, 1, 1)
    return mean, std


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    scaler: Optional[torch.amp.GradScaler]
    compile_mode: Optional[str] = None  # torch.compile's mode for the training step; None: not compiled

    def __post_init__(self) -> None:
        # Built once: prepare() runs every step and would otherwise copy them to the device each time.
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, images: torch.Tensor, jitter: float = 0.0, drop: float = 0.0) -> torch.Tensor:
        """uint8 (B,3,H,W) RGB or (B,4,H,W) RGB + IR on any device -> normalised float on the
        run's device and layout, with batched colour augmentation of the RGB part when `jitter`
        or `drop` is set (training only)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (3, 4):
            raise ValueError(f"expected uint8 images (B,3,H,W) or (B,4,H,W) (RGB + IR), got "
                             f"{images.dtype} {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if jitter or drop:
            x = color_augment(x, jitter, drop)
        mean, std = (self._mean, self._std) if x.shape[1] == 3 else _ir_normalisation(self.device)
        x = (x - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
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
            raise ConfigError("--amp bf16: this GPU has no bf16 support (V100?); use --amp fp16")
        return torch.bfloat16
    return torch.float16


def resolve_compile_mode(cfg: Config, device: torch.device, distributed: bool) -> Optional[str]:
    """--compile-mode, with auto resolved: CUDA graphs (reduce-overhead) for a run on one CUDA
    device, where they replay the compiled step's ~430 kernel launches without the host issuing
    each one (an H100 at the paper preset: 13.0 ms a step against 25.0 with the default mode,
    bench/results/nvidia-h100-2026-11-26-c). Not under DDP, whose gradient all-reduces run
    inside the backward and have not been measured inside CUDA graphs here; not on the CPU,
    which has no graphs to replay."""
    if not cfg.compile:
        return None
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "reduce-overhead" if device.type == "cuda" and not distributed else "default"


def build_runtime(cfg: Config, device: Optional[torch.device] = None, distributed: bool = False) -> Runtime:
    """`device` overrides cfg.device (a distributed run puts each rank on its own GPU)."""
    device = device if device is not None else resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return Runtime(device, amp_dtype, channels_last, scaler, resolve_compile_mode(cfg, device, distributed))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (seed, purpose, epoch, index, ...): distinct
    tuples give unrelated streams, the same tuple the same stream on every machine."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_state(device: torch.device) -> dict:
    """Every random stream of this process as tensors and plain types, for a checkpoint that
    torch.load(weights_only=True) reads back (numpy's key array becomes a tensor)."""
    version, words, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(words), gauss],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)

"""A tiny SAN and its checkpoint, shared by the tests of the API, predict and evaluation."""

from pathlib import Path

import numpy as np
import torch

from san_fast.config import Config
from san_fast.data import input_channels
from san_fast.model import SAN


def tiny_config(**overrides) -> Config:
    base = dict(crop_size=32, embed_dim=16, vit_dim=16, vit_heads=2, vit_depth=1,
                synthetic_classes=5, seat_impl="torch", device="cpu")
    base.update(overrides)
    return Config(**base).validate()


def tiny_model(**overrides) -> SAN:
    """A few training steps on random images, so BatchNorm's and the batch descriptor's running
    statistics are set, then eval mode."""
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    model = SAN(cfg)
    model.train()
    for _ in range(2):
        model.losses(torch.randn(4, input_channels(cfg), 32, 32))
    return model.eval()


def save_checkpoint(path: Path, model: SAN) -> Path:
    torch.save({"model": model.state_dict(), "config": model.cfg.to_dict()}, path)
    return path


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 with a few large colour regions, so several clusters appear."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    centres = rng.uniform([0, 0], [h, w], size=(4, 2))
    region = np.argmin([(yy - cy) ** 2 + (xx - cx) ** 2 for cy, cx in centres], axis=0)
    colours = rng.integers(0, 256, size=(4, 3))
    noise = rng.integers(-12, 13, size=(h, w, 3))
    return np.clip(colours[region] + noise, 0, 255).astype(np.uint8)

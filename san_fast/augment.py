"""Photometric augmentation on whole batches on the training device (the paper's Potsdam
recipe after IIC: colour jitter and colour dropping; flips happen in the data pipeline).

Working on the batch where it already lives costs a few elementwise kernels per step, instead of
per-image PIL work in the DataLoader workers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# ITU-R BT.601 luma, and the YIQ transform in which a hue shift is a rotation of (I, Q).
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _uniform(n: int, spread: float, device, generator) -> torch.Tensor:
    return 1.0 + spread * (2.0 * torch.rand(n, device=device, generator=generator) - 1.0)


def color_augment(x: torch.Tensor, jitter: float, drop: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x: float images in [0, 1], (B,3,H,W). Per image: brightness, contrast, saturation
    factors in [1-jitter, 1+jitter], a hue rotation of up to jitter*pi, then grayscale with
    probability `drop`. Returns a new tensor in [0, 1] with x's memory format."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected float images (B,3,H,W) in [0,1], got {x.dtype} {tuple(x.shape)}")
    if not (0.0 <= jitter < 1.0 and 0.0 <= drop <= 1.0):
        raise ValueError(f"jitter must be in [0,1) and drop in [0,1], got {jitter}, {drop}")
    b, dev = x.shape[0], x.device
    luma = torch.tensor(_LUMA, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    view = (b, 1, 1, 1)
    if jitter > 0:
        x = x * _uniform(b, jitter, dev, generator).view(view)
        gray = (x * luma).sum(1, keepdim=True)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * _uniform(b, jitter, dev, generator).view(view) + mean
        gray = (x * luma).sum(1, keepdim=True)
        x = gray + (x - gray) * _uniform(b, jitter, dev, generator).view(view)
        x = _rotate_hue(x, math.pi * jitter * (2.0 * torch.rand(b, device=dev, generator=generator) - 1.0))
    if drop > 0:
        gray = (x * luma).sum(1, keepdim=True).expand_as(x)
        dropped = (torch.rand(b, device=dev, generator=generator) < drop).view(view)
        x = torch.where(dropped, gray, x)
    return x.clamp(0.0, 1.0)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=x.device, dtype=x.dtype)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    # RGB -> YIQ -> rotate (I, Q) -> RGB, one 3x3 matrix per image.
    mix = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("bij,bjhw->bihw", mix, x)

"""Photometric augmentation on whole batches on the training device (the paper's Potsdam recipe
after IIC: colour jitter and colour dropping; flips happen in the data pipeline).

Working on the batch where it already lives costs a few elementwise kernels per step, instead of
per-image PIL work in the DataLoader workers. The factors follow torchvision's ``ColorJitter``,
which IIC uses (code/datasets/segmentation/potsdam.py): brightness, contrast and saturation
factors in [1-s, 1+s], each result clamped to [0, 1]; the hue factor h in [-s, s] is a fraction
of a full turn of the HSV hue (IIC's 0.1 rotates by up to 0.1 turn = 0.2*pi). torchvision draws
the order of the four operations per image; here it is fixed (brightness, contrast, saturation,
hue).

A 4th channel (Potsdam's IR) is left as it is, as IIC does ("We don't want to jitter or
greyscale the IR part"): it is not a colour, and its relation to the RGB bands (vegetation is
bright in IR) is part of what the model may learn.
"""

from __future__ import annotations

from typing import Optional

import torch

# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
MAX_HUE = 0.5  # torchvision's bound: half a turn either way covers every hue


def _uniform(n: int, low: float, high: float, device, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def _gray(rgb: torch.Tensor) -> torch.Tensor:
    # Weights as Python scalars: a tensor built from them each step would be a host-to-device
    # copy from pageable memory, which synchronises the stream (the host stops running ahead).
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def color_augment(x: torch.Tensor, jitter: float, drop: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x: float images in [0, 1], (B,3,H,W) RGB or (B,4,H,W) RGB + IR. Per image: brightness,
    contrast, saturation factors in [1-jitter, 1+jitter], a hue shift of up to
    min(jitter, 0.5) of a turn, then grayscale with probability `drop`; the IR channel is kept.
    Returns a new tensor in [0, 1] with x's memory format."""
    if x.dim() != 4 or x.shape[1] not in (3, 4) or not x.is_floating_point():
        raise ValueError(f"expected float images (B,3,H,W) or (B,4,H,W) (RGB + IR) in [0,1], "
                         f"got {x.dtype} {tuple(x.shape)}")
    if not (0.0 <= jitter < 1.0 and 0.0 <= drop <= 1.0):
        raise ValueError(f"jitter must be in [0,1) and drop in [0,1], got {jitter}, {drop}")
    b, dev = x.shape[0], x.device
    rgb, extra = x[:, :3], x[:, 3:]
    view = (b, 1, 1, 1)
    if jitter > 0:
        lo, hi = 1.0 - jitter, 1.0 + jitter
        rgb = (rgb * _uniform(b, lo, hi, dev, generator).view(view)).clamp(0.0, 1.0)
        mean = _gray(rgb).mean(dim=(2, 3), keepdim=True)
        rgb = ((rgb - mean) * _uniform(b, lo, hi, dev, generator).view(view) + mean).clamp(0.0, 1.0)
        gray = _gray(rgb)
        rgb = (gray + (rgb - gray) * _uniform(b, lo, hi, dev, generator).view(view)).clamp(0.0, 1.0)
        hue = min(jitter, MAX_HUE)
        rgb = shift_hue(rgb, _uniform(b, -hue, hue, dev, generator))
    if drop > 0:
        dropped = (torch.rand(b, device=dev, generator=generator) < drop).view(view)
        rgb = torch.where(dropped, _gray(rgb).expand_as(rgb), rgb)
    out = torch.cat([rgb, extra], dim=1) if extra.shape[1] else rgb
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out.clamp(0.0, 1.0)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,3,H,W) HSV with hue in [0,1) (a fraction of a turn).
    Hand-written because torchvision is not installable beside every torch build this project
    supports, and the elementwise form keeps the whole batch on its device."""
    r, g, b = rgb.unbind(1)
    value, argmax = rgb.max(dim=1)
    chroma = value - rgb.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue sector by the largest channel (red 0, green 1/3, blue 2/3); where two channels tie for
    # the maximum, both sectors' formulas give the same hue.
    hue = torch.where(argmax == 0, (g - b) / safe,
                      torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(chroma > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``: channel n of (R, G, B) = (5, 3, 1) is
    v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6."""
    h, s, v = hsv.unbind(1)
    n = torch.arange(5.0, 0.0, -2.0, device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)  # made on the device
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * ramp


def shift_hue(rgb: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue per image: HSV hue + turns[b] (mod 1), saturation and value kept."""
    hsv = rgb_to_hsv(rgb)
    hue = torch.remainder(hsv[:, 0] + turns.to(rgb.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))

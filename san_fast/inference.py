"""Segmenting images of any size, layout and pixel type with a trained SAN (``SAN.segment``).

Input layouts follow each library's own convention, so nothing has to be guessed from shapes:
torch tensors are channels-first, (C, H, W) or (B, C, H, W); numpy arrays and PIL images are
channels-last, (H, W), (H, W, C) or (B, H, W, C). Pixel types: uint8 (0-255), uint16
(0-65535) or floating point in [0, 1]. One channel is gray (repeated to RGB); a 4th channel is
dropped for an RGB model (alpha) and required by a 4-channel model (Potsdam's RGB + IR).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from san_fast.data import input_channels as image_channels
from san_fast.runtime import Runtime, resolve_amp

ImageInput = Union[torch.Tensor, np.ndarray, Image.Image]
_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def input_channels(model: torch.nn.Module) -> int:
    """3 (RGB), or 4 for a model trained on Potsdam's RGB + IR."""
    return image_channels(model.cfg)


def size_multiple(model: torch.nn.Module) -> int:
    # The ViT needs whole patches; the UNet encoder and generator trunk pool three times
    # (multiples of 8). Padding to both costs at most 7 pixels of reflected border, cut off
    # again afterwards.
    patch = int(model.cfg.patch_size)
    return patch * 8 // math.gcd(patch, 8)


def _as_channels_first(image: ImageInput) -> tuple[torch.Tensor, bool, bool]:
    """-> (B, C, H, W) tensor, whether the input was one image, whether it was numpy/PIL."""
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3, 4):
            raise ValueError(f"expected a numpy image (H, W), (H, W, C) or (B, H, W, C), "
                             f"got shape {image.shape}")
        single = image.ndim < 4
        array = image[None] if single else image
        array = array[..., None] if image.ndim == 2 else array
        if array.dtype == np.uint16:  # torch has no uint16 arithmetic on every build
            array = array.astype(np.float32) / 65535.0
        elif not array.flags.writeable:  # PIL's arrays are read-only; torch wants to own them
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.permute(0, 3, 1, 2), single, True
    if isinstance(image, torch.Tensor):
        if image.dim() not in (3, 4):
            raise ValueError(f"expected a torch image (C, H, W) or (B, C, H, W), got shape "
                             f"{tuple(image.shape)} (numpy arrays are read as (H, W, C))")
        single = image.dim() == 3
        return (image[None] if single else image), single, False
    raise TypeError(f"expected a torch.Tensor, numpy array or PIL image, got {type(image).__name__}")


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in _SCALE:
        return x.float() / _SCALE[x.dtype]
    if not x.is_floating_point():
        raise ValueError(f"expected uint8, uint16 or float pixels, got {x.dtype}")
    x = x.float()
    if bool(x.isnan().any()):
        raise ValueError("float images must not contain NaN")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"float images must hold values in [0, 1], found {float(x.min()):.4g}.."
                         f"{float(x.max()):.4g} (pass 0-255 values as uint8)")
    return x


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 4 and channels == 3:
        return x[:, :3]
    raise ValueError(f"the model takes {channels}-channel images"
                     f"{' (RGB + infrared)' if channels == 4 else ''}, got {c} channels")


def _segment_batch(model: torch.nn.Module, runtime: Runtime, x: torch.Tensor,
                   max_side: Optional[int]) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] on the model's device -> (B, H, W) cluster ids."""
    h, w = x.shape[-2:]
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    m = size_multiple(model)
    sh, sw = x.shape[-2:]
    pad_h, pad_w = -sh % m, -sw % m
    if pad_h or pad_w:
        # Reflection needs the pad to be smaller than the side; tiny images replicate instead.
        mode = "reflect" if pad_h < sh and pad_w < sw else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    # The model was trained on 8-bit images: quantising to them lets Runtime.prepare stay the
    # one place that normalises input, for 3 and 4 channels alike.
    pixels = (x * 255.0).round_().to(torch.uint8)
    with runtime.autocast():
        labels = model.predict(runtime.prepare(pixels))[:, :sh, :sw]
    if (sh, sw) != (h, w):
        labels = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest-exact")[:, 0]
    return labels.long()


@torch.no_grad()
def segment(model: torch.nn.Module, images: Union[ImageInput, Sequence[ImageInput]],
            max_side: Optional[int] = None, batch_size: int = 8):
    """Cluster ids of ``images`` at their own size (see the module docstring for layouts).

    One image gives (H, W), a batch (B, H, W), a list a list; numpy or PIL input gives int64
    numpy arrays, tensors give int64 tensors on the input's device. Images whose longer side
    exceeds ``max_side`` are segmented at that size and the labels resized back (nearest).
    Runs in eval mode without gradients; the model's mode is restored afterwards.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, (list, tuple)):
        return [segment(model, image, max_side, batch_size) for image in images]
    batch, single, as_numpy = _as_channels_first(images)
    if batch.shape[0] == 0 or batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ValueError(f"empty image batch of shape {tuple(batch.shape)}")
    device = next(model.parameters()).device
    runtime = Runtime(device=device, amp_dtype=resolve_amp("auto", device),
                      channels_last=device.type == "cuda", scaler=None)
    channels = input_channels(model)
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for chunk in batch.split(batch_size):
            x = _match_channels(_to_unit_float(chunk.to(device)), channels)
            outputs.append(_segment_batch(model, runtime, x, max_side))
    finally:
        model.train(was_training)
    labels = torch.cat(outputs)
    labels = labels[0] if single else labels
    if as_numpy:
        return labels.cpu().numpy()
    return labels.to(images.device)

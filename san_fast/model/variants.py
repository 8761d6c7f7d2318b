"""The swappable backbone of the semantic-wise generator (Table 4's "Dec." row).

Every backbone maps an image (B,C,H,W) to tokens (B,K,D) on the patch grid, K = (H/c)(W/c) for
patch size c, and SAN takes the image descriptor g_b as their mean:
- ``vit``: the paper's ViT (san_fast.model.vit), ``vit_norm`` pre or post.
- ``resnet18``: the ResNet-18 trunk of the Table 4 encoder (output stride 8, random init).
- ``unet``: the UNet trunk of the Table 4 encoder (full resolution).
The CNN feature maps are average-pooled to the patch grid, projected to D by a linear layer and
layer-normalised, so the multi-head generator and token matcher see tokens of the same width and
scale whatever the backbone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from san_fast.config import GENERATORS
from san_fast.model.encoders import ResNet18Trunk, UNetTrunk
from san_fast.model.vit import ViT


class ConvTokens(nn.Module):
    """A CNN trunk as the generator's backbone: its feature map average-pooled to the patch
    grid, then linear to ``dim`` and LayerNorm per token."""

    def __init__(self, trunk: nn.Module, patch_size: int, dim: int):
        super().__init__()
        self.trunk = trunk
        self.patch_size = patch_size
        self.proj = nn.Linear(trunk.out_channels, dim)
        self.norm = nn.LayerNorm(dim)

    def set_attention_backend(self, backend: str) -> None:
        """Nothing to set: a CNN has no attention (kept so SAN treats every backbone alike)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {self.patch_size}")
        features = F.adaptive_avg_pool2d(self.trunk(x), (h // self.patch_size, w // self.patch_size))
        return self.norm(self.proj(features.flatten(2).transpose(1, 2)))


def build_generator_backbone(cfg: Any, in_channels: int) -> nn.Module:
    """The backbone of ``cfg.generator``: image (B,C,H,W) -> tokens (B,K,cfg.vit_width())."""
    width = cfg.vit_width()
    if cfg.generator == "vit":
        return ViT(cfg.crop_size, cfg.patch_size, width, cfg.vit_depth, cfg.vit_num_heads(),
                   in_channels=in_channels, norm=cfg.vit_norm)
    if cfg.generator == "resnet18":
        return ConvTokens(ResNet18Trunk(in_channels), cfg.patch_size, width)
    if cfg.generator == "unet":
        return ConvTokens(UNetTrunk(in_channels), cfg.patch_size, width)
    raise ValueError(f"generator={cfg.generator!r}: expected one of {', '.join(GENERATORS)}")

"""The semantic-wise generator's backbone: a plain ViT, random init, no class token.

``norm`` places the LayerNorms: ``post`` is the Transformer of Vaswani et al. (2017), which the
paper names ("the simplest transformer mentioned in (Vaswani et al. 2017)"): x = LN(x + f(x))
after attention and after the MLP, and no final LayerNorm (the last block's output is normalised
already). ``pre`` is the ViT/timm placement: x = x + f(LN(x)), with a final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from san_fast.model.attention import attention


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa"  # set by SAN once the device is known

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        q, k, v = self.qkv(x).view(b, m, 3, self.heads, d // self.heads).unbind(2)
        return self.proj(attention(q, k, v, self.backend).reshape(b, m, d))


NORMS = ("pre", "post")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "pre"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"vit_norm={norm!r}: expected one of {', '.join(NORMS)}")
        self.pre_norm = norm == "pre"
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ViT(nn.Module):
    """Patch embedding + learned positions + `depth` blocks -> tokens T (B, K, D)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 in_channels: int = 3, norm: str = "pre"):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, norm=norm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        self.apply(_init_weights)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        # Evaluation protocols use larger images than the training crops: resample the grid.
        pos = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} must be a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self._positions(h // self.patch_size, w // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

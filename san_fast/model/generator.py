"""From ViT tokens to semantic embeddings: the multi-head generator and the token matcher."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from san_fast.distributed import differentiable_all_reduce


def global_batch_mean(g: torch.Tensor) -> torch.Tensor:
    """Mean over the batch, and over all ranks under DDP: the paper's batch-wise descriptor.
    (differentiable_all_reduce also traces under torch.compile and stays quiet on every DDP step.)"""
    g = g.mean(dim=0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        g = differentiable_all_reduce(g) / dist.get_world_size()
    return g


class MultiHeadGenerator(nn.Module):
    """g (..., D) -> zeta (..., N, P): a shared MLP layer, then one linear head per semantic.

    Each embedding is layer-normalised: the paper credits the generator's normalisation with
    keeping the semantic embeddings near-orthogonal.
    """

    def __init__(self, dim: int, embed_dim: int, num_semantics: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.heads = nn.Parameter(torch.empty(num_semantics, dim, embed_dim))
        self.head_bias = nn.Parameter(torch.zeros(num_semantics, embed_dim))
        nn.init.normal_(self.heads, std=dim**-0.5)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        h = self.trunk(g)
        zeta = torch.einsum("...d,ndp->...np", h, self.heads.to(h.dtype)) + self.head_bias.to(h.dtype)
        return self.norm(zeta)


class TokenMatcher(nn.Module):
    """g_b (B, D) -> p (B, N) in (0, 1): which semantics an image is likely to contain."""

    def __init__(self, dim: int, num_semantics: int):
        super().__init__()
        hidden = max(dim // 4, num_semantics)
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_semantics))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(g))

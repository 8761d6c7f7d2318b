"""SEAT fused with the reconstruction 1x1 conv: the one entry point the model calls.

rec_q = q W^T + b and rec_t = softmax(tau q gamma^T) (gamma W^T) + b, tau = 1/sqrt(P)
(DESIGN.md section 2). Theta = A gamma is never formed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _as_rows(q: torch.Tensor) -> torch.Tensor:
    """(B,M,P) as is, or channels-last (B,P,H,W) viewed as (B,HW,P) without a copy."""
    if q.dim() == 3:
        return q
    if q.dim() == 4:
        b, p, h, w = q.shape
        return q.permute(0, 2, 3, 1).reshape(b, h * w, p)
    raise ValueError(f"q must be (B,M,P) or (B,P,H,W), got shape {tuple(q.shape)}")


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f"weight must be (C,P) or a 1x1 conv weight (C,P,1,1), got {tuple(weight.shape)}")


def seat_reconstruct_reference(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch SEAT + reconstruction; returns rec_q, rec_t of shape (B,M,C)."""
    rows = _as_rows(q)
    w = _as_matrix(weight).to(rows.dtype)
    g = gamma.to(rows.dtype)
    tau = 1.0 / math.sqrt(rows.shape[-1])
    attn = torch.softmax(torch.matmul(rows, g.transpose(1, 2)) * tau, dim=-1)
    values = torch.matmul(g, w.t())  # (B,N,C)
    b = None if bias is None else bias.to(rows.dtype)
    rec_q = torch.nn.functional.linear(rows, w, b)
    rec_t = torch.matmul(attn, values)
    if b is not None:
        rec_t = rec_t + b
    return rec_q, rec_t


def seat_reconstruct(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: expected 'auto', 'triton' or 'torch'")
    return seat_reconstruct_reference(q, gamma, weight, bias)

"""Plain-PyTorch references of the SEAT ops, next to the Triton kernels they check.

Every kernel in this folder is tested against these (tests/test_seat_*.py, in float64):
seat_reconstruct_reference for seat_forward_kernel and the gradient kernel's MODE_GRADS,
seat_reconstruct_loss_reference for its fused-loss modes, seat_labels_reference for the labels.
san_fast.ops re-exports them as the `impl="torch"` path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# The op's limits: N semantics, C output channels (the fused loss packs 2C <= 16 columns into
# one tl.dot), P at least one tl.dot tile.
MIN_N, MAX_N = 2, 256
MIN_C, MAX_C = 1, 8
MIN_P = 16


def as_rows(q: torch.Tensor) -> torch.Tensor:
    """(B,M,P) as is, or (B,P,H,W) viewed as (B,HW,P): a view for channels-last and NCHW alike."""
    if q.dim() == 3:
        return q
    if q.dim() == 4:
        return q.flatten(2).transpose(1, 2)
    raise ValueError(f"q must be (B,M,P) or (B,P,H,W), got shape {tuple(q.shape)}")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f"weight must be (C,P) or a 1x1 conv weight (C,P,1,1), got {tuple(weight.shape)}")


def image_rows(x: torch.Tensor) -> torch.Tensor:
    """Target image (B,M,C) as is, or (B,C,H,W) viewed as (B,HW,C)."""
    return x if x.dim() == 3 else x.flatten(2).transpose(1, 2)


def seat_reconstruct_reference(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch SEAT + reconstruction; returns rec_q, rec_t of shape (B,M,C)."""
    rows = as_rows(q)
    w = as_matrix(weight).to(rows.dtype)
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


def loss_dtype(q: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of losses and weight gradients: fp32, or fp64 for float64 checks."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def losses(rec_q, rec_t, x_rows, target_rec_q: bool, dtype: torch.dtype):
    rq, rt, xs = rec_q.to(dtype), rec_t.to(dtype), x_rows.to(dtype)
    return (rq - xs).pow(2).mean(), (rt - (rq if target_rec_q else xs)).pow(2).mean()


def seat_reconstruct_loss_reference(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
    consistency_target: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_rec = mean((rec_q - x)^2), L_con = mean((rec_t - target)^2), target x or rec_q."""
    rec_q, rec_t = seat_reconstruct_reference(q, gamma, weight, bias)
    return losses(rec_q, rec_t, image_rows(x), consistency_target != "image", loss_dtype(q))


def seat_labels_reference(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    rows = as_rows(q)
    dtype = loss_dtype(q)
    return torch.matmul(rows.to(dtype), gamma.to(dtype).transpose(1, 2)).argmax(-1)


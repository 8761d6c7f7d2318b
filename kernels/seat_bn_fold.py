"""BatchNorm folded into the SEAT op: the kernels read the conv output y, never Q = BN(y).

BN's per-channel affine in a batch (training: batch statistics; evaluation: running ones) is
q = y s + t, s = weight / sqrt(var + eps), t = bias - mean s. Substituted into the SEAT op
(seat_reference.py, tau = 1/sqrt(P)):

    logits = tau q Gamma^T        = tau (y (Gamma s)^T + lb),   lb_b = Gamma_b t        (B,N)
    rec_q  = q W^T + bias         = y (W s)^T + bias',          bias' = bias + r, r = W t (C,)
    rec_t  = softmax(logits) V + bias  with V = Gamma W^T
           = softmax(logits) V' + bias',                        V' = V - 1 r^T           (B,N,C)

The last line holds because every attention row sums to one (A 1 r^T = 1 r^T). So the kernels
run unchanged on (y, Gamma s, W s, V', bias') with the logit bias lb, which the "folded" kernels
take, and return the gradients of all six (seat_autograd.SeatFoldedFunction): dq of the
kernels with the scaled operands is already dy (dy = dq s), and dGamma', dW', dV', dlb (the
column sums of the logits' gradient, from the gradient kernel's range-0 CTAs) reach Gamma, W,
bias, s and t through the small differentiable torch ops below, whose backward autograd writes.
s and t come from BN's statistics (san_fast.model.sync_batchnorm.batch_affine), so BN's backward
becomes the elementwise pass of the mean/variance's own backward: Q is never written, and no
Q-sized tensor is read for BN's two reductions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def folded_operands(
    scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Gamma s, W s, V' = Gamma W^T - 1 (W t)^T, bias + W t, lb = Gamma t) in `dtype` (the
    accumulation dtype), differentiable in every input. gamma (B,N,P), weight (C,P), bias (C,)
    or None, scale and shift (P,). Small (B,N,P) ops: none touches a Q-sized tensor."""
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        s, t = scale.to(dtype), shift.to(dtype)
        g, w = gamma.to(dtype), weight.to(dtype)
        r = w @ t
        values = torch.matmul(g, w.t()) - r
        bias_folded = r if bias is None else bias.to(dtype) + r
        return g * s, w * s, values, bias_folded, g @ t


def bn_affine(mean: torch.Tensor, var: torch.Tensor, eps: float, weight: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's per-channel (scale, shift) from its statistics and (None: no affine)
    parameters, in the statistics' dtype: BN(y) = y * scale + shift."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(var.dtype)
    return scale, (-mean * scale if bias is None else bias.to(var.dtype) - mean * scale)


def moments_grad(x: torch.Tensor, mean: torch.Tensor, grad_mean: torch.Tensor, grad_var: torch.Tensor, count,
                 channel_dim: int) -> torch.Tensor:
    """The gradient reaching x (channels along `channel_dim`) through its batch's per-channel mean
    and biased variance over `count` elements: one elementwise pass, in x's dtype."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    slope = grad_var * (2.0 / count)
    # (x - mean) slope + grad_mean / count with the per-channel terms combined first: one
    # elementwise op in mean's dtype (addcmul promotes x) and the cast, where the plain form ran
    # four ops and a cast over x-sized tensors in eager (42 bytes per bf16 element, now 12).
    grad = torch.addcmul((grad_mean / count - mean * slope).view(shape), x, slope.view(shape))
    return grad.to(x.dtype)


def affine_rows_reference(rows: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The unfused path: Q = y s + t materialised in y's dtype (as BatchNorm writes it),
    computed in fp32 (fp64 for float64 checks)."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return torch.addcmul(shift.to(acc), rows.to(acc), scale.to(acc)).to(rows.dtype)


def labels_operands(scale: torch.Tensor, shift: torch.Tensor, gamma: torch.Tensor, dtype: torch.dtype):
    """(Gamma s, lb = Gamma t): all the labels kernel needs (argmax of the logits)."""
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        g = gamma.to(dtype)
        return g * scale.to(dtype), g @ shift.to(dtype)


class BatchStats(NamedTuple):
    """A training BatchNorm's batch statistics of y (detached, (P,) each, in the accumulation
    dtype) and its affine parameters: what the split backward needs in place of (scale, shift).
    `count`: the elements they were taken over (None: y's own); `across_ranks`: taken over every
    DDP rank's batch (then the backward sums the statistics' gradients over ranks, as
    SyncBatchNorm does, and `count` is the global one)."""
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    count: Optional[torch.Tensor] = None
    across_ranks: bool = False

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of BN in this batch, constants (no gradient reaches y through them)."""
        return bn_affine(self.mean, self.var, self.eps, self.weight, self.bias)


def element_count(rows: torch.Tensor, count: Optional[torch.Tensor]):
    """The statistics' element count: `count` when given (global), else rows' (B,M)."""
    return rows.shape[0] * rows.shape[1] if count is None else count


class _KnownMoments(torch.autograd.Function):
    """(rows, mean, var, count, across_ranks) -> (mean, var): the batch moments of rows (B,M,P)
    over (B,M) (and over every rank's rows when `across_ranks`, `count` elements in all),
    computed beforehand, given back attached to rows: no pass over rows in the forward; the
    backward is the moments' own, one elementwise pass (their gradients summed over ranks
    first when global)."""

    @staticmethod
    def forward(ctx, rows, mean, var, count, across_ranks):
        ctx.save_for_backward(rows, mean, *([count] if count is not None else []))
        ctx.across_ranks = across_ranks
        return mean.clone(), var.clone()

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        rows, mean, *count = ctx.saved_tensors
        if ctx.across_ranks:
            from san_fast.distributed import differentiable_all_reduce as sum_over_ranks

            grad_mean, grad_var = sum_over_ranks(torch.stack([grad_mean, grad_var])).unbind(0)
        count = element_count(rows, count[0] if count else None)
        return moments_grad(rows, mean, grad_mean, grad_var, count, -1), None, None, None, None


def attach_moments(rows: torch.Tensor, stats: BatchStats) -> tuple[torch.Tensor, torch.Tensor]:
    """`stats`' mean and var (detached batch moments of rows (B,M,P), or of every rank's rows)
    as differentiable functions of rows, without reading rows again: for the fold's (scale,
    shift) path when the split backward does not run."""
    return _KnownMoments.apply(rows, stats.mean.detach(), stats.var.detach(), stats.count, stats.across_ranks)

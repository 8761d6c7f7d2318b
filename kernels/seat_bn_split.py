"""BatchNorm folded into SEAT, its statistics' backward folded into the SEAT backward's dq pass.

With the fold alone (seat_bn_fold.py) the gradient of y has two parts that meet in an
elementwise pass over Q-sized tensors: dq from the SEAT backward (dq_direct, written), and
the backward of BN's batch mean and variance, alpha + beta y per channel (read dq_direct and
y, write dy). alpha and beta depend on sums over the whole batch (dGamma, dW, ... of the SEAT
backward), so the kernel that writes dq cannot know them. Split in two launches of the gradient
kernel (seat_backward.py), the backward reads y twice and writes dy once:

1. PASS_SUMS: dGamma', dW', dV', dlb, no dq written.
2. the small chain rule below, in torch: BN's parameters' gradients and per channel
   beta = 2 g_var / count, alpha = g_mean / count - beta mean.
3. PASS_DQ_AFFINE: dy = dq_direct + alpha + beta y, written once; no sums.

against one read of y, a write of dq_direct, then a read of both and a write of dy: 2 of Q's
bytes fewer, and no dq_direct alive next to dy. The statistics come in detached
(BatchStats, computed once by the model) and this Function accounts for their dependence on
y itself, so it needs them to be the batch statistics of the very tensor it reads (or, under
DDP, of every rank's: BatchStats.across_ranks, then their gradients are summed over ranks
before alpha and beta, as SyncBatchNorm sums its two reductions).

The small chain rule: the fold's operands (seat_bn_fold.folded_operands) are
Gs = Gamma s, Ws = W s, V' = Gamma W^T - r, bias' = bias + r, lb = Gamma t with r = W t,
s = weight rstd, t = bias_bn - mean s, rstd = (var + eps)^-1/2; its backward, written out
(a handful of (B,N,P)-sized ops), is `_operand_grads`.
"""

from __future__ import annotations

from typing import Optional

import torch
from san_fast.kernels.seat_autograd import _no_zero_grads, _rows_grad_sum, _zeros_if_none
from san_fast.kernels.seat_backward import MODE_GRADS, launch_grad
from san_fast.kernels.seat_bn_fold import BatchStats, bn_affine, element_count, folded_operands
from san_fast.kernels.seat_reference import loss_dtype


@torch.library.custom_op("san_fast::seat_backward_folded_sums", mutates_args=())
def seat_backward_folded_sums_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, logit_bias: torch.Tensor,
    attn: torch.Tensor, grad_rec_q: torch.Tensor, grad_rec_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, d_gamma, d_weight, _, s, _, _, d_lb = launch_grad(
        MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=grad_rec_q, grad_rec_t=grad_rec_t,
        values=values, logit_bias=logit_bias, with_dq=False,
    )
    # Views of one workspace: custom-op outputs may not alias each other.
    return d_gamma.clone(), d_weight, s.clone(), d_lb.clone()


@seat_backward_folded_sums_op.register_fake
def _(q, gamma, weight, values, logit_bias, attn, grad_rec_q, grad_rec_t):
    acc = loss_dtype(q)
    return (gamma.new_empty(gamma.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc),
            values.new_empty(values.shape, dtype=acc), logit_bias.new_empty(logit_bias.shape, dtype=acc))


@torch.library.custom_op("san_fast::seat_backward_folded_dq_affine", mutates_args=())
def seat_backward_folded_dq_affine_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, logit_bias: torch.Tensor,
    attn: torch.Tensor, grad_rec_q: torch.Tensor, grad_rec_t: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
) -> torch.Tensor:
    return launch_grad(
        MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=grad_rec_q, grad_rec_t=grad_rec_t,
        values=values, logit_bias=logit_bias, dq_affine=(alpha, beta),
    )[0]


@seat_backward_folded_dq_affine_op.register_fake
def _(q, gamma, weight, values, logit_bias, attn, grad_rec_q, grad_rec_t, alpha, beta):
    return torch.empty_like(q)


def _operand_grads(small, eps, count, across_ranks, d_gs, d_ws, d_values, d_lb, d_bias_f):
    """Gradients of gamma, W, bias, BN's weight and bias, and (alpha, beta) of y's statistics
    over `count` elements, from those of the fold's operands (module docstring). With statistics
    `across_ranks`, their own gradients are this rank's share summed over ranks; BN's weight and
    bias get this rank's share (DDP reduces parameter gradients itself)."""
    gamma, weight, mean, var, bn_weight, scale, shift = small
    acc = d_gs.dtype
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        rstd = torch.rsqrt(var + eps)
        g, w = gamma.to(acc), weight.to(acc)
        d_r = d_bias_f - d_values.sum((0, 1))
        d_gamma = d_gs * scale + torch.matmul(d_values, w) + d_lb.unsqueeze(-1) * shift
        d_weight = d_ws * scale + torch.einsum("bnc,bnp->cp", d_values, g) + d_r.unsqueeze(-1) * shift
        g_scale = (d_gs * g).sum((0, 1)) + (d_ws * w).sum(0)
        g_shift = (d_lb.unsqueeze(-1) * g).sum((0, 1)) + w.t() @ d_r
        g_scale = g_scale - mean * g_shift  # shift = bias_bn - mean * scale
        g_bn_w, g_bn_b = g_scale * rstd, g_shift
        if across_ranks:
            from san_fast.distributed import differentiable_all_reduce as sum_over_ranks

            g_scale, g_shift = sum_over_ranks(torch.stack([g_scale, g_shift])).unbind(0)
        g_mean = -scale * g_shift
        g_var = g_scale * bn_weight.to(acc) * (-0.5) * rstd.pow(3)
        beta = g_var * (2.0 / count)
        alpha = g_mean / count - beta * mean
    return d_gamma, d_weight, d_bias_f, g_bn_w, g_bn_b, alpha, beta


class SeatBatchNormFunction(torch.autograd.Function):
    """(y rows (B,M,P), BatchStats of y as mean, var, BN weight, BN bias, eps; gamma, W, bias)
    -> (rec_q, rec_t) of the SEAT op on Q = BN(y) in training mode; differentiable in y (through
    the statistics too), BN's weight and bias, gamma, W and bias."""

    @staticmethod
    def forward(rows, mean, var, bn_weight, bn_bias, eps, gamma, weight, bias, count, across_ranks):
        acc = loss_dtype(rows)
        scale, shift = bn_affine(mean.to(acc), var.to(acc), eps, bn_weight, bn_bias)
        operands = folded_operands(scale, shift, gamma, weight, bias, acc)
        rec_q, rec_t, attn = torch.ops.san_fast.seat_forward_folded(rows, *operands, True)
        return rec_q, rec_t, attn, scale, shift, *operands

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, mean, var, bn_weight, _, eps, gamma, weight, bias, count, across_ranks = inputs
        _, _, attn, scale, shift, g_s, w_s, values, _, lb = output
        acc = loss_dtype(rows)
        ctx.save_for_backward(rows, attn, g_s, w_s, values, lb, gamma, weight, mean.to(acc), var.to(acc), bn_weight,
                              scale, shift, *([count] if count is not None else []))
        ctx.eps, ctx.across_ranks = eps, across_ranks
        ctx.dtypes = (bn_weight.dtype, gamma.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*output[2:])
        _no_zero_grads(ctx)

    @staticmethod
    def backward(ctx, grad_rec_q, grad_rec_t, *_unused):
        rows, attn, g_s, w_s, values, lb, *small = ctx.saved_tensors
        small, given_count = small[:7], small[7:]  # the global count, saved when given
        count = element_count(rows, given_count[0] if given_count else None)
        shape = (rows.shape[0], rows.shape[1], values.shape[2])
        grad_rec_q = _zeros_if_none(grad_rec_q, shape, rows).to(rows.dtype)
        grad_rec_t = _zeros_if_none(grad_rec_t, shape, rows).to(rows.dtype)
        d_gs, d_ws, d_values, d_lb = torch.ops.san_fast.seat_backward_folded_sums(
            rows, g_s, w_s, values, lb, attn, grad_rec_q, grad_rec_t)
        d_bias_f = _rows_grad_sum(grad_rec_q, grad_rec_t, d_gs.dtype)
        d_gamma, d_weight, d_bias, d_bn_w, d_bn_b, alpha, beta = _operand_grads(
            small, ctx.eps, count, ctx.across_ranks, d_gs, d_ws, d_values, d_lb, d_bias_f)
        dy = torch.ops.san_fast.seat_backward_folded_dq_affine(rows, g_s, w_s, values, lb, attn, grad_rec_q,
                                                               grad_rec_t, alpha, beta)
        bn_dtype, gamma_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (dy, None, None, d_bn_w.to(bn_dtype), d_bn_b.to(bn_dtype), None, d_gamma.to(gamma_dtype),
                d_weight.to(weight_dtype), None if bias_dtype is None else d_bias.to(bias_dtype), None, None)


def seat_batchnorm(rows: torch.Tensor, stats: BatchStats, gamma: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """rec_q, rec_t of the SEAT op on BN(y) (training mode), `stats` y's batch statistics; see
    the module docstring."""
    out = SeatBatchNormFunction.apply(rows, stats.mean.detach(), stats.var.detach(), stats.weight, stats.bias,
                                      float(stats.eps), gamma, weight, bias, stats.count, stats.across_ranks)
    return out[0], out[1]

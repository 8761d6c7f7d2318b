"""SEAT + reconstruction losses with every gradient computed in the forward pass.

L_rec = mean((rec_q - x)^2), L_con = mean((rec_t - target)^2), target = x or rec_q (not
detached). Their gradients are known during the forward, so one launch of the gradient kernel
(seat_backward.py, fused modes) computes the losses' inputs rec_q/rec_t *and* dq, dGamma, dW:
Q is read once from HBM and dQ written once; the backward of the autograd graph then has
nothing left to do but scale (Liger-Kernel's fused linear + cross-entropy trick).

The upstream gradients (g_rec, g_con) are unknown in the forward, so the gradients are
precomputed for a hint (h_rec, h_con) (the weights the caller gives the two losses). The
small ones (dGamma, dW, dbias) are kept split so any (g_rec, g_con) is exact; dq is the one big
tensor: with a = g_con / h_con and b = g_rec - a h_rec,

    dq = a dq_pre + b (u W),   u = 2 (rec_q - x) / K.

`rescale_dq_` does this in place, deciding on the device: when (a, b) = (1, 0), the usual case
(upstream gradients equal to the hint), every program returns after reading two numbers. Only
the first backward through a graph can use dq_pre this way (it is then overwritten); a second
one (retain_graph) recomputes dq exactly instead (kernels/seat_autograd.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common
from san_fast.kernels import seat_plan
from san_fast.kernels.seat_backward import combine_through_values, launch_grad
from san_fast.kernels.seat_forward import mm, tile_offsets
from san_fast.kernels.seat_plan import MODE_LOSS_IMAGE, MODE_LOSS_REC_Q

RESCALE_BLOCKS = (32, 128, 4)  # BLOCK_M, BLOCK_P, warps on a GPU
INTERPRETER_RESCALE_BLOCKS = (64, 64, 4)


@triton.jit
def rescale_dq_kernel(
    dq_ptr, u_ptr, w_ptr, coef_ptr,
    M, P, C,
    stride_dqb, stride_dqm, stride_dqp,
    ACC: tl.constexpr, OFFS64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    a = tl.load(coef_ptr).to(ACC)
    b = tl.load(coef_ptr + 1).to(ACC)
    if (a != 1.0) | (b != 0.0):
        pid_m = tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        ms = tl.arange(0, BLOCK_M)
        rows_ok = (pid_m * BLOCK_M + ms) < M
        row0 = bi * M + pid_m * BLOCK_M
        cs = tl.arange(0, BLOCK_C)
        c_ok = cs < C
        ps = tl.arange(0, BLOCK_P)
        u = tl.load(u_ptr + row0 * C + ms[:, None] * C + cs[None, :], mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
        u = u.to(ACC) * b
        blk = dq_ptr + bi * stride_dqb + tl.cast(pid_m * BLOCK_M, tl.int64) * stride_dqm
        offs = tile_offsets(ms, ps, stride_dqm, stride_dqp, OFFS64)
        for p0 in range(0, P, BLOCK_P):
            p_ok = (p0 + ps) < P
            ok = rows_ok[:, None] & p_ok[None, :]
            ptrs = blk + tl.cast(p0, tl.int64) * stride_dqp + offs
            dq = tl.load(ptrs, mask=ok, other=0.0)
            w = tl.load(w_ptr + p0 + cs[:, None] * P + ps[None, :], mask=c_ok[:, None] & p_ok[None, :], other=0.0)
            out = mm(u, w.to(ACC), dq.to(ACC) * a, "ieee")
            tl.store(ptrs, out.to(dq_ptr.dtype.element_ty), mask=ok)


def seat_fused_loss(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
    target_rec_q: bool,
    h_rec: float,
    h_con: float,
    launch: Callable = common.identity_launch,
    plan: Optional[seat_plan.GradPlan] = None,
    config=None,
    dq: Optional[torch.Tensor] = None,
    workspace_fill: Optional[float] = None,
    values: Optional[torch.Tensor] = None,
    logit_bias: Optional[torch.Tensor] = None,
    relay: bool = False,
):
    """`relay`: the relay design (producer CTAs hand the forward to the gradient CTAs;
    seat_grad_kernel's PRODUCERS) rather than the fused one, when no `plan` is given.

    Returns rec_q, rec_t (B,M,C, accumulation dtype), dq_pre (q's dtype and strides),
    dGamma_pre (B,N,P) = h_con * dGamma, dW_pre (C,P) for the hint, dW_u (C,P) = sum u^T q,
    dValues_pre, d_logit_bias_pre.

    Without `values` (V = Gamma W^T) the gradient through V is added to dGamma and dW here and
    dValues_pre is None; given `values` (B,N,C) (the BatchNorm fold), dGamma_pre and dW_pre are
    the direct terms and dValues_pre (B,N,C) is returned instead. d_logit_bias_pre (B,N) only
    with `logit_bias`. All "_pre" gradients are for the hint, like dGamma_pre."""
    mode = MODE_LOSS_REC_Q if target_rec_q else MODE_LOSS_IMAGE
    dq, d_gamma, d_w, d_wu, s, rec_q, rec_t, d_lb = launch_grad(
        mode, q, gamma, weight, bias, x=x, h_rec=h_rec, h_con=h_con, launch=launch, plan=plan, config=config,
        dq=dq, workspace_fill=workspace_fill, values=values, logit_bias=logit_bias, relay=relay,
    )
    if values is None:
        d_gamma, d_w = combine_through_values(d_gamma, d_w, s, gamma, weight)
        s = None
    return rec_q, rec_t, dq, d_gamma, d_w, d_wu, s, d_lb


def rescale_dq_(
    dq: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    coef: torch.Tensor,
    launch: Callable = common.identity_launch,
) -> torch.Tensor:
    """In place: dq <- coef[0] dq + coef[1] (u @ W), skipped on the device when coef is (1, 0).
    Returns dq."""
    bsz, m, p = dq.shape
    c = weight.shape[0]
    common.check_rows("u", u, (bsz, m, c), dq.device)
    if weight.shape[1] != p or not u.is_contiguous() or coef.shape != (2,):
        raise ValueError(f"rescale_dq_: weight (C,{p}), contiguous u (B,M,C) and coef (2,) expected; got "
                         f"{tuple(weight.shape)}, {tuple(u.shape)}, {tuple(coef.shape)}")
    block_m, block_p, warps = INTERPRETER_RESCALE_BLOCKS if common.interpreting() else RESCALE_BLOCKS
    w = weight.contiguous()
    with common.device_guard(dq):
        launch(rescale_dq_kernel)[(triton.cdiv(m, block_m), bsz)](
            dq, u, w, coef,
            m, p, c,
            dq.stride(0), dq.stride(1), dq.stride(2),
            ACC=common.tl_acc_dtype(u.dtype), OFFS64=common.wide_offsets(dq), BLOCK_C=common.BLOCK_C,
            BLOCK_M=block_m, BLOCK_P=block_p, num_warps=warps,
        )
    return dq

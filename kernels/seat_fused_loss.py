"""SEAT + reconstruction losses with every gradient computed in the forward pass.

L_rec = mean((rec_q - x)^2), L_con = mean((rec_t - target)^2), target = x or rec_q (not
detached). Their gradients are known during the forward, so one pass of the backward kernel
(seat_backward.py, MODE_LOSS_*) computes the losses' inputs rec_q/rec_t *and* dq, dGamma, dW:
Q is read once for the logits, re-read per row block (mostly from L2) for the partial sums,
and dQ written once; the backward of the autograd graph then only rescales (Liger-Kernel's
fused linear + cross-entropy trick).

The upstream gradients (g_rec, g_con) are unknown in the forward, so the gradients are
precomputed for a hint (h_rec, h_con) (the weights the caller gives the two losses). The
small ones (dGamma, dW, dbias) are kept split so any (g_rec, g_con) is exact; dq is the one
big tensor: with a = g_con / h_con and b = g_rec - a h_rec,

    dq = a dq_pre + b (u W),   u = 2 (rec_q - x) / K,

which `rescale_dq` applies in one extra pass over dQ only when (a, b) != (1, 0).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common
from san_fast.kernels.seat_backward import (
    MODE_LOSS_IMAGE,
    MODE_LOSS_REC_Q,
    combine_through_values,
    launch_backward,
)
from san_fast.kernels.seat_forward import mm


@triton.jit
def rescale_dq_kernel(
    dq_ptr, u_ptr, w_ptr, coef_ptr, out_ptr,
    M, P, C,
    stride_dqb, stride_dqm, stride_dqp,
    stride_wc, stride_wp,
    stride_ob, stride_om, stride_op,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    rows64 = rows.to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    ps = tl.arange(0, BLOCK_P)
    a = tl.load(coef_ptr)
    scale_u = tl.load(coef_ptr + 1)
    u = tl.load(u_ptr + b * M * C + rows64[:, None] * C + cs[None, :], mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
    u = u * scale_u
    for p0 in range(0, P, BLOCK_P):
        p = p0 + ps
        ok = rows_ok[:, None] & (p < P)[None, :]
        dq = tl.load(dq_ptr + b * stride_dqb + rows64[:, None] * stride_dqm + p[None, :] * stride_dqp, mask=ok, other=0.0)
        w = tl.load(w_ptr + cs[:, None] * stride_wc + p[None, :] * stride_wp, mask=c_ok[:, None] & (p < P)[None, :], other=0.0)
        out = mm(u, w.to(ACC), dq.to(ACC) * a, "ieee")
        tl.store(
            out_ptr + b * stride_ob + rows64[:, None] * stride_om + p[None, :] * stride_op,
            out.to(out_ptr.dtype.element_ty),
            mask=ok,
        )


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
    programs: Optional[int] = None,
    dq: Optional[torch.Tensor] = None,
    workspace_fill: Optional[float] = None,
):
    """Returns rec_q, rec_t (B,M,C, accumulation dtype), dq_pre (q's dtype and strides),
    dGamma_pre (B,N,P) = h_con * dGamma, dW_pre (C,P) for the hint, dW_u (C,P) = sum u^T q."""
    mode = MODE_LOSS_REC_Q if target_rec_q else MODE_LOSS_IMAGE
    dq, d_gamma, d_w, d_wu, s, rec_q, rec_t = launch_backward(
        mode, q, gamma, weight, bias, x=x, h_rec=h_rec, h_con=h_con, launch=launch, programs=programs, dq=dq,
        workspace_fill=workspace_fill,
    )
    d_gamma, d_w = combine_through_values(d_gamma, d_w, s, gamma, weight)
    return rec_q, rec_t, dq, d_gamma, d_w, d_wu


def rescale_dq(
    dq_pre: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    coef: torch.Tensor,
    launch: Callable = common.identity_launch,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out = coef[0] * dq_pre + coef[1] * (u @ W), written to a new tensor shaped like dq_pre.

    Out of place so that a second backward through the same graph (retain_graph) sees the
    unchanged dq_pre."""
    bsz, m, p = dq_pre.shape
    c = weight.shape[0]
    if out is None:
        out = torch.empty_like(dq_pre)
    block_m, block_p, warps = (64, 64, 4) if common.interpreting() else (32, 128, 4)
    launch(rescale_dq_kernel)[(triton.cdiv(m, block_m), bsz)](
        dq_pre, u, weight, coef, out,
        m, p, c,
        dq_pre.stride(0), dq_pre.stride(1), dq_pre.stride(2),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        ACC=common.tl_acc_dtype(u.dtype), BLOCK_C=common.BLOCK_C, BLOCK_M=block_m, BLOCK_P=block_p,
        num_warps=warps,
    )
    return out

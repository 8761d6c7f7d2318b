"""SEAT backward (and the fused-loss pass, which shares it): dq, dGamma, dW partial sums.

Persistent grid (G, B): program g of image b walks row blocks g, g+G, g+2G, ... For each
block it makes two passes over P:

1. recompute the logits from Q (softmax from the saved logsumexp, or the full forward with the
   losses in the fused mode) and form per row da = V gt, dl = a * (da - <a, da>);
2. re-read the Q tile (the block was just read, so mostly from L2) to write
   dq = tau dl Gamma + gq W and to accumulate tau dl^T q (dGamma) and gq^T q (dW).

Partial sums go to fp32 workspaces indexed by (b, g): no atomics, a fixed summation order,
so results are deterministic. A program writes its slice on its first row block and adds to
it afterwards (read-modify-write by that program alone). The host sums over g, and adds the
parts that go through V = Gamma W^T: dGamma += S W, dW += sum_b S_b^T Gamma_b with
S_b = sum_i a_i^T gt_i (N x C, a partial sum like the others).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common
from san_fast.kernels.seat_forward import logits_and_rec_q, mm, values_matrix

MODE_GRADS = 0  # gradients of rec_q / rec_t given (plain backward)
MODE_LOSS_IMAGE = 1  # fused loss, L_con = mean((rec_t - x)^2)
MODE_LOSS_REC_Q = 2  # fused loss, L_con = mean((rec_t - rec_q)^2), rec_q not detached


@triton.jit
def accumulate_partial(ptrs, mask, value, rb, first_rb):
    """Program-private partial sum: store on the program's first row block, add afterwards."""
    # The flag is broadcast to the tile explicitly: the interpreter rejects a scalar-and-tile mask.
    not_first = (tl.zeros(value.shape, tl.int32) + rb) != first_rb
    previous = tl.load(ptrs, mask=mask & not_first, other=0.0)
    tl.store(ptrs, previous + value, mask=mask)


@triton.jit
def seat_backward_kernel(
    q_ptr, gamma_ptr, w_ptr, v_ptr, bias_ptr, lse_ptr,
    grq_ptr, grt_ptr, x_ptr,
    dq_ptr, rq_ptr, rt_ptr,
    ws_gamma_ptr, ws_w_ptr, ws_wu_ptr, ws_s_ptr,
    M, N, P, C, G, tau, grad_scale, h_rec, h_con,
    stride_qb, stride_qm, stride_qp,
    stride_gb, stride_gn, stride_gp,
    stride_wc, stride_wp,
    stride_grq_b, stride_grq_m, stride_grq_c,
    stride_grt_b, stride_grt_m, stride_grt_c,
    stride_xb, stride_xm, stride_xc,
    stride_dqb, stride_dqm, stride_dqp,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = b * G + pid_g
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    ps = tl.arange(0, BLOCK_P)
    nc_ok = n_ok[:, None] & c_ok[None, :]
    # V, bias and the S partial are small but, held across the persistent loop, they would
    # cost up to ~100 registers per thread at N = 256: they are re-read (from L1/L2) per block.
    nc_offs = ns[:, None] * C + cs[None, :]
    g_blk = gamma_ptr + b * stride_gb
    HALF: tl.constexpr = BLOCK_C // 2
    low = cs < HALF
    if MODE == 0:
        chan = cs
    else:
        # C <= 8 = HALF: the fused modes carry the C channels twice, columns [0, HALF) for gq
        # and [HALF, BLOCK_C) for u = rec_q - x, so one (BLOCK_M x 16) tile and one tl.dot
        # give both dW partial sums (the whole dW and its rec-loss part) in pass 2.
        chan = tl.where(low, cs, cs - HALF)
    chan_ok = chan < C
    # Loop-invariant int32 tile offsets for pass 2 (see logits_and_rec_q).
    ms = tl.arange(0, BLOCK_M)
    q_offs = ms[:, None] * stride_qm + ps[None, :] * stride_qp
    dq_offs = ms[:, None] * stride_dqm + ps[None, :] * stride_dqp
    g_offs = ns[:, None] * stride_gn + ps[None, :] * stride_gp
    w_offs = cs[:, None] * stride_wc + ps[None, :] * stride_wp
    np_offs = ns[:, None] * P + ps[None, :]

    n_blocks = tl.cdiv(M, BLOCK_M)
    for rb in range(pid_g, n_blocks, G):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_ok = rows < M
        rows64 = rows.to(tl.int64)
        mc_ok = rows_ok[:, None] & c_ok[None, :]
        q_blk = q_ptr + b * stride_qb + tl.cast(rb * BLOCK_M, tl.int64) * stride_qm

        logits, rec_q = logits_and_rec_q(
            q_blk, g_blk, w_ptr, rows_ok, ns, n_ok, chan, chan_ok, P, tau,
            stride_qm, stride_qp, stride_gn, stride_gp, stride_wc, stride_wp,
            MODE != 0, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
        )
        if MODE == 0:
            lse = tl.load(lse_ptr + b * M + rows, mask=rows_ok, other=0.0)
            attn = tl.exp(logits - lse[:, None])
            gu = tl.load(
                grq_ptr + b * stride_grq_b + rows64[:, None] * stride_grq_m + cs[None, :] * stride_grq_c,
                mask=mc_ok, other=0.0,
            ).to(ACC)
            gt = tl.load(
                grt_ptr + b * stride_grt_b + rows64[:, None] * stride_grt_m + cs[None, :] * stride_grt_c,
                mask=mc_ok, other=0.0,
            ).to(ACC)
        else:
            row_max = tl.max(logits, axis=1)
            e = tl.exp(logits - row_max[:, None])
            attn = e / tl.sum(e, axis=1)[:, None]
            v = tl.load(
                v_ptr + b * N * C + ns[:, None] * C + chan[None, :], mask=n_ok[:, None] & chan_ok[None, :], other=0.0
            )
            rec_t = mm(attn, v, tl.zeros((BLOCK_M, BLOCK_C), ACC), "ieee")
            if HAS_BIAS:
                bias = tl.load(bias_ptr + chan, mask=chan_ok, other=0.0).to(ACC)
                rec_q += bias[None, :]
                rec_t += bias[None, :]
            out_offs = b * M * C + rows64[:, None] * C + cs[None, :]
            tl.store(rq_ptr + out_offs, rec_q, mask=mc_ok)
            tl.store(rt_ptr + out_offs, rec_t, mask=mc_ok)
            both_ok = rows_ok[:, None] & chan_ok[None, :]
            x = tl.load(
                x_ptr + b * stride_xb + rows64[:, None] * stride_xm + chan[None, :] * stride_xc,
                mask=both_ok, other=0.0,
            ).to(ACC)
            # Residuals without the 2/K of the mean: O(1) values survive the cast to fp16/bf16
            # for tl.dot, and grad_scale = 2/K is applied to the fp32 accumulators instead.
            u = tl.where(both_ok, rec_q - x, 0.0)
            if MODE == 1:
                w_res = tl.where(both_ok, rec_t - x, 0.0)
                gq = h_rec * u
            else:
                w_res = tl.where(both_ok, rec_t - rec_q, 0.0)
                gq = h_rec * u - h_con * w_res
            gt = tl.where(low[None, :], h_con * w_res, 0.0)
            gu = tl.where(low[None, :], gq, u)

        v_t = tl.load(v_ptr + b * N * C + cs[:, None] + ns[None, :] * C, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        da = mm(gt, v_t, tl.zeros((BLOCK_M, BLOCK_N), ACC), "ieee")
        dl = attn * (da - tl.sum(attn * da, axis=1)[:, None])
        dl = tl.where(rows_ok[:, None] & n_ok[None, :], dl * tau, 0.0)
        s_part = mm(tl.trans(attn), gt, tl.zeros((BLOCK_N, BLOCK_C), ACC), "ieee")
        accumulate_partial(ws_s_ptr + slot * N * C + nc_offs, nc_ok, s_part * grad_scale, rb, pid_g)

        q_dtype = q_ptr.dtype.element_ty
        dl_lp = dl.to(q_dtype)
        gu_lp = gu.to(q_dtype)
        # Rows [0, HALF) of trans(gu) @ q go to ws_w, rows [HALF, 16) (fused modes) to ws_wu.
        ws_w_rows = tl.where(low, ws_w_ptr + chan * P, ws_wu_ptr + chan * P) + slot * C * P
        dq_blk = dq_ptr + b * stride_dqb + tl.cast(rb * BLOCK_M, tl.int64) * stride_dqm
        ws_gamma_blk = ws_gamma_ptr + slot * N * P
        for p0 in range(0, P, BLOCK_P):
            p_ok = (p0 + ps) < P
            mp_ok = rows_ok[:, None] & p_ok[None, :]
            q = tl.load(q_blk + p0 * stride_qp + q_offs, mask=mp_ok, other=0.0)
            g = tl.load(g_blk + p0 * stride_gp + g_offs, mask=n_ok[:, None] & p_ok[None, :], other=0.0).to(q_dtype)
            # W in rows [0, C) only: gu @ w is gq W, the u half meets zeros.
            w = tl.load(w_ptr + p0 * stride_wp + w_offs, mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(q_dtype)

            dq = mm(dl_lp, g, tl.zeros((BLOCK_M, BLOCK_P), ACC), PRECISION)
            dq = mm(gu_lp, w, dq, PRECISION)
            tl.store(dq_blk + p0 * stride_dqp + dq_offs, (dq * grad_scale).to(dq_ptr.dtype.element_ty), mask=mp_ok)

            d_gamma = mm(tl.trans(dl_lp), q, tl.zeros((BLOCK_N, BLOCK_P), ACC), PRECISION)
            accumulate_partial(
                ws_gamma_blk + p0 + np_offs, n_ok[:, None] & p_ok[None, :], d_gamma * grad_scale, rb, pid_g
            )
            d_w = mm(tl.trans(gu_lp), q, tl.zeros((BLOCK_C, BLOCK_P), ACC), PRECISION)
            accumulate_partial(
                ws_w_rows[:, None] + (p0 + ps)[None, :], chan_ok[:, None] & p_ok[None, :], d_w * grad_scale,
                rb, pid_g,
            )


def launch_backward(
    mode: int,
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    lse: Optional[torch.Tensor] = None,
    grad_rec_q: Optional[torch.Tensor] = None,
    grad_rec_t: Optional[torch.Tensor] = None,
    x: Optional[torch.Tensor] = None,
    h_rec: float = 1.0,
    h_con: float = 1.0,
    launch: Callable = common.identity_launch,
    programs: Optional[int] = None,
    dq: Optional[torch.Tensor] = None,
    workspace_fill: Optional[float] = None,
):
    """Run the persistent kernel; returns dq, the reduced (dGamma_direct, dW_direct, dW_u, S)
    and, in the fused modes, rec_q and rec_t in the accumulation dtype.

    dGamma_direct = sum_i tau dl_i^T q_i (B,N,P), dW_direct = sum gq^T q (C,P),
    dW_u = sum u^T q (C,P; fused modes only, zeros otherwise), S = sum_i a_i^T gt_i (B,N,C).
    `programs` forces G; `dq` and `workspace_fill` (e.g. NaN) let tests check that the kernel
    writes every element of its outputs and workspaces.
    """
    bsz, m, p = q.shape
    n, c = gamma.shape[1], weight.shape[0]
    acc = common.acc_dtype(q.dtype)
    bn = common.block_n(n)
    fused = mode != MODE_GRADS
    kind = "loss" if fused else "backward"
    g = common.programs_per_image(q, n, c, bn, kind, programs)
    values = values_matrix(gamma, weight, acc)
    if dq is None:
        dq = torch.empty_like(q)

    def buffer(*shape):
        if workspace_fill is None:
            return torch.empty(shape, device=q.device, dtype=acc)
        return torch.full(shape, workspace_fill, device=q.device, dtype=acc)

    ws_gamma = buffer(bsz, g, n, p)
    ws_w = buffer(bsz, g, c, p)
    ws_wu = buffer(bsz, g, c, p) if fused else ws_w
    ws_s = buffer(bsz, g, n, c)
    if fused:
        rec_q = buffer(bsz, m, c)
        rec_t = buffer(bsz, m, c)
        grad_scale = 2.0 / (bsz * m * c)
        grq = grt = xs = x
        lse_arg = rec_q
    else:
        rec_q = rec_t = None
        grad_scale = 1.0
        grq, grt, xs = grad_rec_q, grad_rec_t, grad_rec_q
        lse_arg = lse
    kernel = common.autotuned(seat_backward_kernel, kind, bn)
    launch(kernel)[(g, bsz)](
        q, gamma, weight, values, bias if bias is not None else values, lse_arg,
        grq, grt, xs,
        dq, rec_q if fused else dq, rec_t if fused else dq,
        ws_gamma, ws_w, ws_wu, ws_s,
        m, n, p, c, g, 1.0 / p ** 0.5, grad_scale, h_rec, h_con,
        q.stride(0), q.stride(1), q.stride(2),
        gamma.stride(0), gamma.stride(1), gamma.stride(2),
        weight.stride(0), weight.stride(1),
        grq.stride(0), grq.stride(1), grq.stride(2),
        grt.stride(0), grt.stride(1), grt.stride(2),
        xs.stride(0), xs.stride(1), xs.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        MODE=mode, HAS_BIAS=bias is not None, PRECISION=common.dot_precision(q),
        ACC=common.tl_acc_dtype(q.dtype), BLOCK_N=bn, BLOCK_C=common.BLOCK_C,
    )
    d_gamma = ws_gamma.sum(1)
    d_w = ws_w.sum((0, 1))
    d_wu = ws_wu.sum((0, 1)) if fused else torch.zeros_like(d_w)
    s = ws_s.sum(1)
    return dq, d_gamma, d_w, d_wu, s, rec_q, rec_t


def combine_through_values(
    d_gamma: torch.Tensor, d_w: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the gradient that flows through V = Gamma W^T: dGamma += S W, dW += sum_b S_b^T Gamma_b."""
    acc = d_gamma.dtype
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        g = gamma.to(acc)
        w = weight.to(acc)
        d_gamma = d_gamma + torch.matmul(s, w)
        d_w = d_w + torch.matmul(s.transpose(1, 2), g).sum(0)
    return d_gamma, d_w

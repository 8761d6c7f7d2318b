"""SEAT forward: rec_q, rec_t (and the per-row logsumexp the backward needs), or argmax labels.

One program per BLOCK_M rows of one image, grid (cdiv(M, BLOCK_M), B). Each Q tile is loaded
once and feeds both tl.dot's: the logits q Gamma^T (N padded to BLOCK_N >= 16) and
rec_q = q W^T (C padded to BLOCK_C = 16). rec_t = softmax(logits) V + bias with V = Gamma W^T
(N x C, precomputed per image), so Theta and the logits never reach memory.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common


@triton.jit
def mm(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b; `PRECISION` ("ieee"/"tf32") only means something for fp32 operands."""
    # out_dtype spelled out: triton 3.6 rejects a float64 acc under the default fp32 out_dtype.
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    else:
        out = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return out


@triton.jit
def logits_and_rec_q(
    q_blk, g_blk, w_ptr, rows_ok, ns, n_ok, cs, c_ok, P, tau,
    stride_qm, stride_qp, stride_gn, stride_gp, stride_wc, stride_wp,
    WITH_REC_Q: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One pass over P: tau q Gamma^T (padded columns at -inf) and q W^T, both in ACC.

    q_blk points at the block's first row, g_blk at the image's Gamma. Column j of rec_q is
    channel cs[j] (masked by c_ok): the fused loss repeats the C channels in both halves of
    the BLOCK_C = 16 padding."""
    ps = tl.arange(0, BLOCK_P)
    # Scalar 64-bit bases plus loop-invariant int32 tile offsets: 64-bit pointer tiles would
    # take twice the registers.
    q_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qm + ps[None, :] * stride_qp
    g_offs = ps[:, None] * stride_gp + ns[None, :] * stride_gn
    w_offs = ps[:, None] * stride_wp + cs[None, :] * stride_wc
    logits = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    rec_q = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    for p0 in range(0, P, BLOCK_P):
        p_ok = (p0 + ps) < P
        q = tl.load(q_blk + p0 * stride_qp + q_offs, mask=rows_ok[:, None] & p_ok[None, :], other=0.0)
        g = tl.load(g_blk + p0 * stride_gp + g_offs, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        logits = mm(q, g.to(q.dtype), logits, PRECISION)
        if WITH_REC_Q:
            w = tl.load(w_ptr + p0 * stride_wp + w_offs, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            rec_q = mm(q, w.to(q.dtype), rec_q, PRECISION)
    logits = tl.where(n_ok[None, :], logits * tau, float("-inf"))
    return logits, rec_q


@triton.jit
def seat_forward_kernel(
    q_ptr, gamma_ptr, w_ptr, v_ptr, bias_ptr,
    rq_ptr, rt_ptr, lse_ptr, labels_ptr,
    M, N, P, C, tau,
    stride_qb, stride_qm, stride_qp,
    stride_gb, stride_gn, stride_gp,
    stride_wc, stride_wp,
    HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C

    q_blk = q_ptr + b * stride_qb + tl.cast(pid_m * BLOCK_M, tl.int64) * stride_qm
    logits, rec_q = logits_and_rec_q(
        q_blk, gamma_ptr + b * stride_gb, w_ptr, rows_ok, ns, n_ok, cs, c_ok, P, tau,
        stride_qm, stride_qp, stride_gn, stride_gp, stride_wc, stride_wp,
        not LABELS, PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
    )

    if LABELS:
        # argmax of the logits is argmax of the softmax: no exp needed.
        labels = tl.argmax(logits, axis=1)
        tl.store(labels_ptr + b * M + rows, labels.to(tl.int64), mask=rows_ok)
    else:
        row_max = tl.max(logits, axis=1)
        e = tl.exp(logits - row_max[:, None])
        denom = tl.sum(e, axis=1)
        attn = e / denom[:, None]
        v = tl.load(
            v_ptr + b * N * C + ns[:, None] * C + cs[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0
        )
        # Tiny (BLOCK_M x BLOCK_N x BLOCK_C): keep it exact whatever the big dots use.
        rec_t = mm(attn, v, tl.zeros((BLOCK_M, BLOCK_C), ACC), "ieee")
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(ACC)
            rec_q += bias[None, :]
            rec_t += bias[None, :]
        out_offs = b * M * C + rows.to(tl.int64)[:, None] * C + cs[None, :]
        out_ok = rows_ok[:, None] & c_ok[None, :]
        tl.store(rq_ptr + out_offs, rec_q.to(rq_ptr.dtype.element_ty), mask=out_ok)
        tl.store(rt_ptr + out_offs, rec_t.to(rt_ptr.dtype.element_ty), mask=out_ok)
        tl.store(lse_ptr + b * M + rows, row_max + tl.log(denom), mask=rows_ok)


def values_matrix(gamma: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """V_b = Gamma_b W^T, (B,N,C), in the accumulation dtype whatever autocast says."""
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        return torch.matmul(gamma.to(dtype), weight.to(dtype).t()).contiguous()


def seat_forward(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    launch: Callable = common.identity_launch,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B,M,P) any strides, gamma (B,N,P), weight (C,P), bias (C,) or None.

    Returns rec_q, rec_t (B,M,C) in q's dtype and the logsumexp (B,M) in the accumulation dtype.
    `launch` wraps the kernel (torch.library.wrap_triton inside a triton_op); `out` lets tests
    pass poisoned buffers to check that every element is written.
    """
    bsz, m, p = q.shape
    n, c = gamma.shape[1], weight.shape[0]
    acc = common.acc_dtype(q.dtype)
    values = values_matrix(gamma, weight, acc)
    if out is None:
        rec_q = torch.empty((bsz, m, c), device=q.device, dtype=q.dtype)
        rec_t = torch.empty((bsz, m, c), device=q.device, dtype=q.dtype)
        lse = torch.empty((bsz, m), device=q.device, dtype=acc)
    else:
        rec_q, rec_t, lse = out
    bn = common.block_n(n)
    kernel = common.autotuned(seat_forward_kernel, "forward", bn)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), bsz)

    launch(kernel)[grid](
        q, gamma, weight, values, bias if bias is not None else values,
        rec_q, rec_t, lse, lse,
        m, n, p, c, 1.0 / p ** 0.5,
        q.stride(0), q.stride(1), q.stride(2),
        gamma.stride(0), gamma.stride(1), gamma.stride(2),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, LABELS=False, PRECISION=common.dot_precision(q),
        ACC=common.tl_acc_dtype(q.dtype), BLOCK_N=bn, BLOCK_C=common.BLOCK_C,
    )
    return rec_q, rec_t, lse


def seat_labels(
    q: torch.Tensor, gamma: torch.Tensor, launch: Callable = common.identity_launch, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Argmax over N of the SEAT logits, (B,M) int64; the softmax is never formed."""
    bsz, m, p = q.shape
    n = gamma.shape[1]
    labels = torch.empty((bsz, m), device=q.device, dtype=torch.int64) if out is None else out
    bn = common.block_n(n)
    kernel = common.autotuned(seat_forward_kernel, "forward", bn)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), bsz)

    launch(kernel)[grid](
        q, gamma, q, q, q,
        labels, labels, labels, labels,
        m, n, p, 1, 1.0 / p ** 0.5,
        q.stride(0), q.stride(1), q.stride(2),
        gamma.stride(0), gamma.stride(1), gamma.stride(2),
        0, 0,
        HAS_BIAS=False, LABELS=True, PRECISION=common.dot_precision(q),
        ACC=common.tl_acc_dtype(q.dtype), BLOCK_N=bn, BLOCK_C=common.BLOCK_C,
    )
    return labels

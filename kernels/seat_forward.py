"""SEAT forward: rec_q, rec_t (and, for a backward, the attention), or argmax labels.

One program per BLOCK_M rows of one image, grid (cdiv(M, BLOCK_M), B). Each Q tile is loaded
once and feeds both tl.dot's: the logits q Gamma^T (N padded to BLOCK_N >= 16) and
rec_q = q W^T (C padded to BLOCK_C = 16). rec_t = softmax(logits) V + bias with V = Gamma W^T
(N x C, precomputed per image), so Theta and the logits never reach memory. With LOGIT_BIAS the
logits are tau (q Gamma^T + lb) with a per-(image, semantic) bias lb (B,N): what a BatchNorm
folded into the op adds (kernels/seat_bn_fold.py). With SAVE_ATTN the
softmax (B,M,N) is written in q's dtype for the backward (N/P of Q's bytes), which then needs
no second pass over Q for the logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common
from san_fast.kernels import seat_plan


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
def tile_offsets(rows, cols, stride_r, stride_c, OFFS64: tl.constexpr):
    """rows[:, None] * stride_r + cols[None, :] * stride_c, in 64 bits only when the launcher
    says 32 could overflow (64-bit pointer tiles take twice the registers)."""
    if OFFS64:
        out = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    else:
        out = rows[:, None] * stride_r + cols[None, :] * stride_c
    return out


@triton.jit
def logits_and_rec_q(
    q_img, rows, gamma_ptr, g_rows, w_ptr, lb_ptr, rows_ok, n_ok, cs, c_ok, P, tau, stride_qm, stride_qp,
    LOGIT_BIAS: tl.constexpr, WITH_REC_Q: tl.constexpr, EVICT: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One pass over P: tau (q Gamma^T + lb) (padded columns at -inf; lb, fp32 (B*N,) rows
    `g_rows`, only with LOGIT_BIAS) and q W^T, both in ACC.

    q_img points at the image's Q (rows `rows`), gamma_ptr at Gamma (rows `g_rows` of (B*N, P))
    and w_ptr at W (C,P), both contiguous in q's dtype. Column j of rec_q is channel cs[j]
    (masked by c_ok): the fused loss repeats the C channels in both halves of BLOCK_C = 16.
    Offsets come from the row indices, so that inside a persistent loop they are rebuilt per
    row block instead of being held live across it."""
    ps = tl.arange(0, BLOCK_P)
    q_offs = tile_offsets(rows, ps, stride_qm, stride_qp, OFFS64)
    g_offs = tile_offsets(ps, g_rows, 1, P, OFFS64)
    w_offs = ps[:, None] + cs[None, :] * P
    logits = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    rec_q = tl.zeros((BLOCK_M, BLOCK_C), ACC)
    for p0 in range(0, P, BLOCK_P):
        p_ok = (p0 + ps) < P
        q = tl.load(q_img + tl.cast(p0, tl.int64) * stride_qp + q_offs, mask=rows_ok[:, None] & p_ok[None, :],
                    other=0.0, eviction_policy=EVICT)
        g = tl.load(gamma_ptr + p0 + g_offs, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        logits = mm(q, g, logits, PRECISION)
        if WITH_REC_Q:
            w = tl.load(w_ptr + p0 + w_offs, mask=p_ok[:, None] & c_ok[None, :], other=0.0)
            rec_q = mm(q, w, rec_q, PRECISION)
    if LOGIT_BIAS:
        logits += tl.load(lb_ptr + g_rows, mask=n_ok, other=0.0).to(ACC)[None, :]
    logits = tl.where(n_ok[None, :], logits * tau, float("-inf"))
    return logits, rec_q


@triton.jit
def seat_forward_kernel(
    q_ptr, gamma_ptr, w_ptr, v_ptr, bias_ptr, lb_ptr,
    rq_ptr, rt_ptr, attn_ptr, labels_ptr,
    M, N, P, C, tau,
    stride_qb, stride_qm, stride_qp,
    HAS_BIAS: tl.constexpr, LOGIT_BIAS: tl.constexpr, LABELS: tl.constexpr, SAVE_ATTN: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, OFFS64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    row0 = b * M + pid_m * BLOCK_M  # first row of the block in (B*M) order, 64-bit
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C

    # Q is read once here: evict_first keeps it from pushing reusable lines out of L2.
    logits, rec_q = logits_and_rec_q(
        q_ptr + b * stride_qb, rows, gamma_ptr, b * N + ns, w_ptr, lb_ptr, rows_ok, n_ok, cs, c_ok, P, tau,
        stride_qm, stride_qp, LOGIT_BIAS, not LABELS, "evict_first", PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C,
        BLOCK_P,
    )
    ms = tl.arange(0, BLOCK_M)
    if LABELS:
        # argmax of the logits is argmax of the softmax: no exp needed.
        labels = tl.argmax(logits, axis=1)
        tl.store(labels_ptr + row0 + ms, labels.to(tl.int64), mask=rows_ok)
    else:
        row_max = tl.max(logits, axis=1)
        e = tl.exp(logits - row_max[:, None])
        attn = e / tl.sum(e, axis=1)[:, None]
        v = tl.load(v_ptr + b * N * C + ns[:, None] * C + cs[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        # Tiny (BLOCK_M x BLOCK_N x BLOCK_C): keep it exact whatever the big dots use.
        rec_t = mm(attn, v, tl.zeros((BLOCK_M, BLOCK_C), ACC), "ieee")
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(ACC)
            rec_q += bias[None, :]
            rec_t += bias[None, :]
        out_offs = row0 * C + ms[:, None] * C + cs[None, :]
        out_ok = rows_ok[:, None] & c_ok[None, :]
        tl.store(rq_ptr + out_offs, rec_q.to(rq_ptr.dtype.element_ty), mask=out_ok)
        tl.store(rt_ptr + out_offs, rec_t.to(rt_ptr.dtype.element_ty), mask=out_ok)
        if SAVE_ATTN:
            tl.store(attn_ptr + row0 * N + ms[:, None] * N + ns[None, :], attn.to(attn_ptr.dtype.element_ty),
                     mask=rows_ok[:, None] & n_ok[None, :])


def values_matrix(gamma: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """V_b = Gamma_b W^T, (B,N,C), in the accumulation dtype whatever autocast says."""
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        return torch.matmul(gamma.to(dtype), weight.to(dtype).t()).contiguous()


def _launch(q, gamma, weight, values, bias, logit_bias, outputs, labels: bool, save_attn: bool, launch, config):
    """One launch of seat_forward_kernel; `outputs` = (rec_q, rec_t, attn, labels) buffers."""
    bsz, m, p = q.shape
    n = gamma.shape[1]
    bn = common.block_n(n)
    kernel = common.autotuned(seat_forward_kernel, "forward", seat_plan.bucket(bn), seat_plan.forward_configs(bn),
                              ["N", "P", "C", "LABELS", "SAVE_ATTN", "LOGIT_BIAS"])
    kernel, meta = common.with_config(kernel, config)
    gamma_op = common.as_operand(gamma, q.dtype)
    weight_op = q if weight is None else common.as_operand(weight, q.dtype)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]), bsz)

    with common.device_guard(q):
        launch(kernel)[grid](
            q, gamma_op, weight_op, values, bias if bias is not None else values,
            logit_bias if logit_bias is not None else values, *outputs,
            m, n, p, 1 if weight is None else weight.shape[0], 1.0 / p ** 0.5,
            q.stride(0), q.stride(1), q.stride(2),
            HAS_BIAS=bias is not None, LOGIT_BIAS=logit_bias is not None, LABELS=labels, SAVE_ATTN=save_attn,
            PRECISION=common.dot_precision(q),
            ACC=common.tl_acc_dtype(q.dtype), OFFS64=common.wide_offsets(q, gamma_op), BLOCK_N=bn,
            BLOCK_C=common.BLOCK_C, **meta,
        )


def seat_forward(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    save_attn: bool = False,
    launch: Callable = common.identity_launch,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    config=None,
    values: Optional[torch.Tensor] = None,
    logit_bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B,M,P) any strides, gamma (B,N,P), weight (C,P), bias (C,) or None; `values` (B,N,C)
    replaces V = Gamma W^T and `logit_bias` (B,N) is added to q Gamma^T (both optional, fp32;
    the BatchNorm fold passes them).

    Returns rec_q, rec_t (B,M,C) in q's dtype and, with `save_attn`, the attention (B,M,N) in
    q's dtype (else an empty tensor). `launch` wraps the kernel (compile_report.py records the
    call); `out` lets tests pass poisoned buffers; `config` (a triton.Config) runs that config
    instead of the autotuner's pick.
    """
    bsz, m, p, n, c = common.check_launch(q, gamma, weight)
    acc = common.acc_dtype(q.dtype)
    if values is None:
        values = values_matrix(gamma, weight, acc)
    values = common.check_small("values", values, (bsz, n, c), q, acc)
    logit_bias = common.check_small("logit_bias", logit_bias, (bsz, n), q, acc)
    if out is None:
        rec_q = torch.empty((bsz, m, c), device=q.device, dtype=q.dtype)
        rec_t = torch.empty((bsz, m, c), device=q.device, dtype=q.dtype)
        attn = torch.empty((bsz, m, n) if save_attn else (0,), device=q.device, dtype=q.dtype)
    else:
        rec_q, rec_t, attn = out
    _launch(q, gamma, weight, values, bias, logit_bias, (rec_q, rec_t, attn, attn), False, save_attn, launch, config)
    return rec_q, rec_t, attn


def seat_labels(
    q: torch.Tensor, gamma: torch.Tensor, launch: Callable = common.identity_launch,
    out: Optional[torch.Tensor] = None, config=None, logit_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Argmax over N of the SEAT logits (plus `logit_bias` (B,N), optional), (B,M) int64; the
    softmax is never formed."""
    bsz, m, _, n, _ = common.check_launch(q, gamma)
    logit_bias = common.check_small("logit_bias", logit_bias, (bsz, n), q, common.acc_dtype(q.dtype))
    labels = torch.empty((bsz, m), device=q.device, dtype=torch.int64) if out is None else out
    _launch(q, gamma, None, q, None, logit_bias, (labels,) * 4, True, False, launch, config)
    return labels

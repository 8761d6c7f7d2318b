"""SEAT gradients: dq, dGamma, dW (and the fused loss's forward), in one persistent kernel.

Grid (K, T) as planned in seat_plan.py: CTA (j, c) owns P range j and the run c of row blocks
(b, rb). Per row block:

1. the per-row softmax gradient: MODE_GRADS reads the attention the forward saved (B,M,N) and
   the gradients of rec_q, rec_t; the fused-loss modes compute the forward instead (a pass over
   the whole Q row block: logits, softmax, rec_q, rec_t, the residuals of the two losses, which
   are the gradients). Then da = V gt, dl = tau a (da - <a, da>).
2. range j only: load the Q tile (BLOCK_M x range) once; dGamma += dl^T q, dW += gu^T q into
   register accumulators held across the whole run; dq = dl Gamma + gq W written in BLOCK_PD-wide
   sub-tiles.

PASS (MODE_GRADS only) runs half of it: the sums alone, or dq alone, for the split BatchNorm
backward (seat_bn_split.py, its dq with a per-channel affine) and for the split backward where
the whole kernel would spill (GradPlan.split: Q is still read once, in the sums pass, and dQ
written once, in the dq pass, which reads no Q). PRODUCERS (the fused modes' relay design)
adds CTAs that run step 1's forward once per row block and hand it to the K CTAs of the run
(seat_grad_kernel's docstring). The per-row-block device functions are in
seat_grad_rows.py.

At the last row block of an image (or of its run) a CTA writes its accumulators to workspace
slot c + b and zeroes them. Partial sums meet only in reduce_slots_kernel, a later launch, so
they need no barrier; the one hand-off inside a launch is the relay design's (producer rows,
ordered by a flag per row block). The host adds what flows through V = Gamma W^T:
dGamma += S W, dW += sum_b S_b^T Gamma_b with S_b = sum_i a_i^T gt_i (an (N, C) partial sum).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common
from san_fast.kernels import seat_plan
from san_fast.kernels.seat_forward import values_matrix
from san_fast.kernels.seat_grad_rows import (dq_rows, fused_loss_rows, pack_values_grad, range_columns_ok,
                                             range_sums, relay_publish, relayed_rows, row_halves, saved_rows,
                                             store_partials, values_grad)
from san_fast.kernels.seat_plan import LOSS_MODES, MODE_GRADS, MODE_LOSS_IMAGE, MODE_LOSS_REC_Q  # noqa: F401

PASS_BOTH, PASS_SUMS, PASS_DQ_AFFINE, PASS_DQ = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
PASS_NAMES = {PASS_BOTH.value: "both", PASS_SUMS.value: "sums", PASS_DQ_AFFINE.value: "dq_affine", PASS_DQ.value: "dq"}


# Batch-dependent integers are not specialized on (divisibility by 16, == 1): nothing in the
# kernel vectorizes on them, and each value would otherwise compile its own variant.
@triton.jit(do_not_specialize=["B", "T_J", "SLOT_LEN"])
def seat_grad_kernel(
    q_ptr, gamma_ptr, w_ptr, v_ptr, bias_ptr, lb_ptr,
    attn_ptr, ga_ptr, gt_ptr,
    dq_ptr, rq_ptr, rt_ptr, ws_ptr, alpha_ptr, beta_ptr, flags_ptr,
    B, M, N, P, C: tl.constexpr, P_RANGE, T_J, SLOT_LEN, tau, grad_scale, h_rec, h_con,
    stride_qb, stride_qm, stride_qp,
    stride_dqb, stride_dqm, stride_dqp,
    stride_ab, stride_am, stride_ac,
    stride_tb, stride_tm, stride_tc,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, LOGIT_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, OFFS64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_PD: tl.constexpr, PASS: tl.constexpr = 0, PACK_W: tl.constexpr = False,
    W_ROWS: tl.constexpr = 1, EVEN_P: tl.constexpr = False, WIDE_RANGE: tl.constexpr = False,
    PRODUCERS: tl.constexpr = 0, SPIN_ASM: tl.constexpr = False,
):
    """ga_ptr: grad of rec_q (MODE_GRADS) or the target image x (fused modes), both (B,M,C);
    gt_ptr: grad of rec_t (MODE_GRADS only). With LOGIT_BIAS the logits carry lb (B,N) and the
    range-0 CTAs also sum dl over rows (its gradient) into column C of acc_s, free since C <= 8.

    PASS (MODE_GRADS): PASS_BOTH, the sums and dq; PASS_SUMS, the sums only (no dq written);
    PASS_DQ_AFFINE, dq only, written as dq + alpha + beta q per channel (alpha_ptr, beta_ptr: (P,)
    in ACC), no sums: the split BatchNorm backward (kernels/seat_bn_split.py). PASS_DQ, dq
    only: with PASS_SUMS the split backward (GradPlan.split), where PASS_BOTH spills.

    PACK_W (the launcher sets it when N + W_ROWS * C <= BLOCK_N <= 64): gu's columns ride in dl's
    padding columns N, N + 1, ..., so one dot gives dGamma and dW together (acc_g's columns
    [N, N + W_ROWS C) are the slot's dW rows, which follow dGamma's there) and one dot gives dq
    from Gamma with W's rows below it. It frees acc_w's registers (BLOCK_P2 x 16 fp32) and a
    dot per tile: at N = 27 that is what lets the 4-warp tile fit 255 registers.

    W_ROWS (GradPlan.w_rows): dW partial sums per slot. 2 in MODE_LOSS_REC_Q: the whole dW and
    its rec-loss part u^T q. 1 elsewhere; in MODE_LOSS_IMAGE (U_SUMS) gq = h_rec u, so the
    kernel sums u^T q alone, the host takes dW = h_rec u^T q, and dq's W term gets h_rec here:
    at N <= 32 - C the u columns then fit dl's padding (PACK_W).

    EVEN_P (GradPlan.even_p): every range is full and as wide as its tile, so no column mask.
    WIDE_RANGE (GradPlan.wide_range): step 2 loads its Q tile and runs its dots in two halves of
    the rows, and dq's sub-tiles run in a loop: what lets a 512-wide range's accumulators fit
    255 registers (seat_plan.WIDE_RANGE_P2).

    PRODUCERS (fused modes, GradPlan.producers): the relay design. Each run has PRODUCERS more
    CTAs that compute the forward of its row blocks (every PRODUCERS-th each) and hand it to
    the run's K gradient CTAs through attn_ptr (B,M,N), rq_ptr, rt_ptr and a flag per row block
    (flags_ptr: a ticket counter, then B * row blocks flags, all zero at launch); the gradient
    CTAs read only their range of each Q row block instead of all of it. Roles come from a
    ticket taken at start, in the order CTAs actually started: a gradient CTA waits only on
    producers that started before it and never wait themselves, so the waits end whatever the
    GPU runs at once (and under the interpreter, which runs programs one after another)."""
    if PRODUCERS > 0:
        ticket = tl.atomic_add(flags_ptr, 1)
        group = tl.cdiv(P, P_RANGE) + PRODUCERS
        c = ticket // group
        j = ticket % group - PRODUCERS  # < 0: a producer
    else:
        j = tl.program_id(0)
        c = tl.program_id(1)
    ns = tl.arange(0, BLOCK_N)
    n_ok = ns < N
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    HALF: tl.constexpr = BLOCK_C // 2
    low = cs < HALF
    if MODE == 0:
        chan = cs
    else:
        chan = tl.where(low, cs, cs - HALF)
    chan_ok = chan < C
    ms = tl.arange(0, BLOCK_M)
    p_lo = j * P_RANGE
    p2 = tl.arange(0, BLOCK_P2)
    p2_ok = range_columns_ok(p2, p_lo, P_RANGE, P, EVEN_P)
    pd = tl.arange(0, BLOCK_PD)
    q_dtype = q_ptr.dtype.element_ty
    U_SUMS: tl.constexpr = (MODE == 1) & (W_ROWS == 1)
    SUMS: tl.constexpr = (PASS == PASS_BOTH) | (PASS == PASS_SUMS)
    w_ok = chan_ok & (low | (W_ROWS == 2))
    # dW partial rows: [0, HALF) -> the whole dW, [HALF, BLOCK_C) -> its rec-loss part (fused).
    w_rows = tl.where(low, N * P + chan * P, N * P + C * P + chan * P)

    n_rb = tl.cdiv(M, BLOCK_M)
    items = tl.cast(B, tl.int64) * n_rb
    start = c * items // T_J
    run_end = (c + 1) * items // T_J
    end = run_end
    if PRODUCERS > 0:  # a producer runs no row block as a gradient CTA
        end = tl.where(j < 0, start, run_end)
    # Transposed (range x N): as the M dimension of the dots the range width (>= 64) lets
    # Hopper use wgmma with its operands in shared memory rather than registers.
    acc_g = tl.zeros((BLOCK_P2, BLOCK_N), ACC)
    acc_w = tl.zeros((BLOCK_P2, BLOCK_C), ACC)
    acc_s = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    for it in range(start, end):
        b = it // n_rb
        rb = (it - b * n_rb).to(tl.int32)
        # Tile offsets are built from this row block's rows (int32, within one image): built
        # per iteration they stay transient; built once outside the loop the compiler would
        # keep every tile of them live across the whole persistent loop.
        rows = rb * BLOCK_M + ms
        rows_ok = rows < M
        q_img = q_ptr + b * stride_qb
        v_blk = v_ptr + b * N * C
        if MODE == 0:
            attn, gt, gu = saved_rows(
                attn_ptr + b * M * N, ga_ptr + b * stride_ab, gt_ptr + b * stride_tb, rows, rows_ok, ns, n_ok, cs, c_ok,
                N, stride_am, stride_ac, stride_tm, stride_tc, ACC, OFFS64,
            )
        elif PRODUCERS > 0:
            attn, gt, gu = relayed_rows(
                attn_ptr + b * M * N, rq_ptr + b * M * C, rt_ptr + b * M * C, ga_ptr + b * stride_ab,
                flags_ptr + 1 + it, rows, rows_ok, ns, n_ok, chan, chan_ok, low, N, C, h_rec, h_con, stride_am,
                stride_ac, MODE, ACC, OFFS64, U_SUMS, SPIN_ASM,
            )
        else:
            attn, gt, gu = fused_loss_rows(
                q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, ga_ptr + b * stride_ab, rq_ptr, rt_ptr, b, rows,
                rows_ok,
                ns, n_ok, cs, chan, chan_ok, low, j == 0, M, N, P, C, tau, h_rec, h_con, stride_qm, stride_qp,
                stride_am, stride_ac, MODE, HAS_BIAS, LOGIT_BIAS, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C,
                BLOCK_P, U_SUMS,
            )
        if SUMS:
            da, acc_s = values_grad(gt, attn, v_blk, acc_s, ns, n_ok, cs, C, j == 0, ACC, BLOCK_M, BLOCK_N)
        else:  # no sums: S's range-0 CTAs sum nothing either
            da, acc_s = values_grad(gt, attn, v_blk, acc_s, ns, n_ok, cs, C, j < 0, ACC, BLOCK_M, BLOCK_N)
        dl = attn * (da - tl.sum(attn * da, axis=1)[:, None])
        dl = tl.where(rows_ok[:, None] & n_ok[None, :], dl * tau, 0.0)
        if LOGIT_BIAS and SUMS:
            acc_s += tl.where((cs[None, :] == C) & (j == 0), tl.sum(dl, axis=0)[:, None], 0.0)
        if PACK_W:
            dl = pack_values_grad(dl, gu, ns, cs, N, C, HALF, W_ROWS)
        dl_lp = dl.to(q_dtype)
        gu_lp = gu.to(q_dtype)
        if U_SUMS:  # the sums take u, dq takes gq = h_rec u (in dl's padding columns with PACK_W)
            if PACK_W:
                dl_dq = tl.where(ns[None, :] >= N, dl * h_rec, dl).to(q_dtype)
            else:
                dl_dq = dl_lp
            gu_dq = (gu * h_rec).to(q_dtype)
        else:
            dl_dq, gu_dq = dl_lp, gu_lp

        if SUMS:  # step 2, range j
            cols = p_lo + p2
            if WIDE_RANGE:
                HALF_M: tl.constexpr = BLOCK_M // 2
                dl_a, dl_b = row_halves(dl_lp, BLOCK_M, BLOCK_N)
                gu_a, gu_b = row_halves(gu_lp, BLOCK_M, BLOCK_C)
                rows_a = rb * BLOCK_M + tl.arange(0, HALF_M)
                rows_b = rows_a + HALF_M
                acc_g, acc_w = range_sums(q_img, rows_a, rows_a < M, cols, p2_ok, dl_a, gu_a, acc_g, acc_w,
                                          stride_qm, stride_qp, PACK_W, PRECISION, OFFS64)
                acc_g, acc_w = range_sums(q_img, rows_b, rows_b < M, cols, p2_ok, dl_b, gu_b, acc_g, acc_w,
                                          stride_qm, stride_qp, PACK_W, PRECISION, OFFS64)
            else:
                acc_g, acc_w = range_sums(q_img, rows, rows_ok, cols, p2_ok, dl_lp, gu_lp, acc_g, acc_w,
                                          stride_qm, stride_qp, PACK_W, PRECISION, OFFS64)
        if PASS != PASS_SUMS:
            dq_rows(q_img, dq_ptr + b * stride_dqb, gamma_ptr, w_ptr, alpha_ptr, beta_ptr, dl_dq, gu_dq, grad_scale,
                    b, rows, rows_ok, ns, n_ok, cs, c_ok, pd, p_lo, N, C, P, P_RANGE, stride_qm, stride_qp, stride_dqm,
                    stride_dqp, PASS == PASS_DQ_AFFINE, PACK_W, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_P2, BLOCK_PD,
                    EVEN_P, WIDE_RANGE)

        if SUMS:
            if (rb == n_rb - 1) | (it == end - 1):
                store_partials(ws_ptr + (c + b) * SLOT_LEN, acc_g, acc_w, acc_s, grad_scale, p_lo, p2, p2_ok, ns,
                               n_ok, cs, c_ok, w_rows, w_ok, j == 0, N, P, C, W_ROWS, LOGIT_BIAS, PACK_W)
                acc_g = tl.zeros((BLOCK_P2, BLOCK_N), ACC)
                acc_w = tl.zeros((BLOCK_P2, BLOCK_C), ACC)
                acc_s = tl.zeros((BLOCK_N, BLOCK_C), ACC)

    if PRODUCERS > 0:
        # After the gradient loop, so that nothing of it is live here: a CTA is one or the other.
        p_end = tl.where(j < 0, run_end, start)
        for it in range(start + j + PRODUCERS, p_end, PRODUCERS):
            b = it // n_rb
            rows = (it - b * n_rb).to(tl.int32) * BLOCK_M + ms
            relay_publish(
                q_ptr + b * stride_qb, gamma_ptr, w_ptr, v_ptr + b * N * C, bias_ptr, lb_ptr, attn_ptr + b * M * N,
                rq_ptr + b * M * C, rt_ptr + b * M * C, flags_ptr + 1 + it, b, rows, rows < M, ns, n_ok, cs, chan,
                chan_ok, low, N, P, C, tau, stride_qm, stride_qp, HAS_BIAS, LOGIT_BIAS, PRECISION, ACC, OFFS64,
                BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
            )


@triton.jit(do_not_specialize=["SLOT_LEN", "ROW_BLOCKS", "ITEMS", "T_J"])
def reduce_slots_kernel(ws_ptr, out_ptr, SLOT_LEN, ROW_BLOCKS, ITEMS, T_J, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = sum of the slots c + b of the runs c that cover image b, in order of c."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < SLOT_LEN
    b = tl.program_id(1).to(tl.int64)
    # Run c covers item i when c == ((i + 1) * T - 1) // ITEMS (seat_plan.GradPlan.run).
    c_lo = ((b * ROW_BLOCKS + 1) * T_J - 1) // ITEMS
    c_hi = ((b + 1) * ROW_BLOCKS * T_J - 1) // ITEMS
    total = tl.zeros((BLOCK,), ACC)
    for c in range(c_lo, c_hi + 1):
        total += tl.load(ws_ptr + (c + b) * SLOT_LEN + offs, mask=ok, other=0.0)
    tl.store(out_ptr + b * SLOT_LEN + offs, total, mask=ok)


def _grad_kernel(plan: seat_plan.GradPlan, grad_pass: int = PASS_BOTH.value):
    bn = common.block_n(plan.N)
    configs = seat_plan.grad_configs(plan.mode, bn, plan.block_p2, relay=plan.relay,
                                     sums_pass=grad_pass == PASS_SUMS.value)
    kind = seat_plan.grad_kind(plan.mode, plan.relay)
    return common.autotuned(seat_grad_kernel, kind, seat_plan.bucket(bn), configs,
                            ["N", "P", "C", "MODE", "BLOCK_M", "BLOCK_P2", "PASS", "PRODUCERS"],
                            reset_to_zero=["flags_ptr"] if plan.relay else None)


def _check_plan(plan: seat_plan.GradPlan, mode: int, shape: tuple) -> None:
    if (plan.mode, plan.B, plan.M, plan.P, plan.N, plan.C) != (mode, *shape):
        raise ValueError(f"plan is for mode {plan.mode} and (B,M,P,N,C)={(plan.B, plan.M, plan.P, plan.N, plan.C)}, "
                         f"the launch for mode {mode} and {shape}")
    if plan.p_range % 16 or plan.p_range > plan.block_p2 or plan.block_p2 & (plan.block_p2 - 1):
        raise ValueError(f"plan's P range {plan.p_range} must be a multiple of 16 within its power-of-2 tile "
                         f"{plan.block_p2}")


def launch_grad(
    mode: int,
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    attn: Optional[torch.Tensor] = None,
    grad_rec_q: Optional[torch.Tensor] = None,
    grad_rec_t: Optional[torch.Tensor] = None,
    x: Optional[torch.Tensor] = None,
    h_rec: float = 1.0,
    h_con: float = 1.0,
    launch: Callable = common.identity_launch,
    plan: Optional[seat_plan.GradPlan] = None,
    config=None,
    dq: Optional[torch.Tensor] = None,
    workspace_fill: Optional[float] = None,
    values: Optional[torch.Tensor] = None,
    logit_bias: Optional[torch.Tensor] = None,
    with_dq: bool = True,
    dq_affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    relay: bool = False,
):
    """Run the gradient kernel and the slot reduction; returns dq, dGamma_direct (B,N,P),
    dW_direct (C,P), dW_u (C,P; fused modes, else None), S (B,N,C), in the fused modes rec_q and
    rec_t (B,M,C) in the accumulation dtype (else None), and d_logit_bias (B,N) (None without
    `logit_bias`).

    dGamma_direct = sum_i tau dl_i^T q_i, dW_direct = sum gq^T q, dW_u = sum u^T q,
    S = sum_i a_i^T gt_i, d_logit_bias = sum_i tau dl_i. `values` (B,N,C) replaces V = Gamma W^T
    and `logit_bias` (B,N) enters the logits as tau (q Gamma^T + lb) (the BatchNorm fold). `plan` (seat_plan.grad_plan) fixes the grid and tiles, `config` one
    autotune candidate; `dq` and `workspace_fill` (e.g. NaN) let tests check that every element
    of the outputs and of the used workspace is written.

    `relay` (fused modes, without `plan`): plan the relay design (seat_grad_kernel's PRODUCERS).

    MODE_GRADS only: `with_dq=False` computes the sums alone (dq comes back None);
    `dq_affine=(alpha, beta)`, two (P,) tensors, computes dq alone, written as
    dq + alpha + beta * q per channel, and every other output comes back None. Otherwise a
    plan with `split` (seat_plan.splits_backward) runs the sums pass, then the dq pass.
    """
    shape = common.check_launch(q, gamma, weight)
    bsz, m, p, n, c = shape
    fused = mode in LOSS_MODES
    if fused:
        if x is None:
            raise ValueError("the fused-loss modes need the target image x (B,M,C)")
        common.check_rows("x", x, (bsz, m, c), q.device)
        row_a, row_t = x, x
    else:
        if attn is None or grad_rec_q is None or grad_rec_t is None:
            raise ValueError("MODE_GRADS needs the saved attention and the gradients of rec_q and rec_t")
        common.check_rows("attn", attn, (bsz, m, n), q.device)
        if not attn.is_contiguous():
            raise ValueError("the saved attention must be contiguous (B,M,N), as seat_forward writes it")
        common.check_rows("grad_rec_q", grad_rec_q, (bsz, m, c), q.device)
        common.check_rows("grad_rec_t", grad_rec_t, (bsz, m, c), q.device)
        row_a, row_t = grad_rec_q, grad_rec_t
    acc = common.acc_dtype(q.dtype)
    grad_pass = _grad_pass(mode, with_dq, dq_affine)
    if dq_affine is not None:
        alpha, beta = (common.check_small(name, t, (p,), q, acc) for name, t in zip(("alpha", "beta"), dq_affine))
    if plan is None:
        plan = seat_plan.grad_plan(mode, bsz, m, p, n, c, q.dtype, seat_plan.device_spec(q.device), relay=relay)
    _check_plan(plan, mode, shape)
    if values is None:
        values = values_matrix(gamma, weight, acc)
    values = common.check_small("values", values, (bsz, n, c), q, acc)
    logit_bias = common.check_small("logit_bias", logit_bias, (bsz, n), q, acc)
    if dq is None:
        dq = torch.empty_like(q) if with_dq else q  # PASS_SUMS writes no dq: q only fills the slot

    def buffer(*size):
        if workspace_fill is None:
            return torch.empty(size, device=q.device, dtype=acc)
        return torch.full(size, workspace_fill, device=q.device, dtype=acc)

    passes = (PASS_SUMS.value, PASS_DQ.value) if grad_pass == PASS_BOTH.value and plan.split else (grad_pass,)
    # A dq pass alone writes no partial sums: a one-element workspace fills the argument.
    ws = buffer(1) if passes == (PASS_DQ_AFFINE.value,) else buffer(plan.slots, plan.slot_len)
    rec_q = buffer(bsz, m, c) if fused else dq
    rec_t = buffer(bsz, m, c) if fused else dq
    flags = values
    if plan.producers:  # the relay design: the producers' hand-off (seat_grad_kernel's PRODUCERS)
        attn = torch.empty((bsz, m, n), device=q.device, dtype=q.dtype)
        flags = torch.zeros(1 + plan.items, device=q.device, dtype=torch.int32)
    gamma_op = common.as_operand(gamma, q.dtype)
    wide = common.wide_offsets(q, dq, gamma_op, row_a, row_t, *([attn] if attn is not None else []))
    if dq_affine is None:
        alpha = beta = values  # unread: PASS_DQ_AFFINE only
    with common.device_guard(q):
        for grad_pass in passes:
            kernel, meta = common.with_config(_grad_kernel(plan, grad_pass), config)
            launch(kernel)[plan.grid](
                q, gamma_op, common.as_operand(weight, q.dtype), values,
                bias if bias is not None else values, logit_bias if logit_bias is not None else values,
                attn if attn is not None else values, row_a, row_t,
                dq, rec_q, rec_t, ws, alpha, beta, flags,
                bsz, m, n, p, c, plan.p_range, plan.ctas_per_range, plan.slot_len, 1.0 / p ** 0.5,
                2.0 / (bsz * m * c) if fused else 1.0, h_rec, h_con,
                q.stride(0), q.stride(1), q.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                row_a.stride(0), row_a.stride(1), row_a.stride(2),
                row_t.stride(0), row_t.stride(1), row_t.stride(2),
                MODE=mode, HAS_BIAS=bias is not None, LOGIT_BIAS=logit_bias is not None,
                PRECISION=common.dot_precision(q), ACC=common.tl_acc_dtype(q.dtype), OFFS64=wide,
                BLOCK_N=common.block_n(n), BLOCK_C=common.BLOCK_C, BLOCK_M=plan.block_m, BLOCK_P2=plan.block_p2,
                PASS=grad_pass, PACK_W=plan.packs_w, W_ROWS=plan.w_rows, EVEN_P=plan.even_p, WIDE_RANGE=plan.wide_range,
                PRODUCERS=plan.producers, SPIN_ASM=plan.relay and not common.interpreting(), **meta,
            )
        if passes == (PASS_DQ_AFFINE.value,):
            return dq, None, None, None, None, None, None, None
        sums = reduce_slots(ws, plan, launch)
    n_p, c_p = n * p, c * p
    d_gamma = sums[:, :n_p].view(bsz, n, p)
    d_w = sums[:, n_p:n_p + c_p].view(bsz, c, p).sum(0)
    d_wu = None
    if mode == MODE_LOSS_REC_Q:
        d_wu = sums[:, n_p + c_p:n_p + 2 * c_p].view(bsz, c, p).sum(0)
    elif fused:  # U_SUMS: the kernel summed u^T q; the rec loss's dW for the hint is h_rec times it
        d_wu, d_w = d_w, d_w * h_rec
    s_at = (n + plan.w_rows * c) * p
    s = sums[:, s_at:s_at + n * c].view(bsz, n, c)
    d_lb = sums[:, s_at + n * c:].view(bsz, n) if logit_bias is not None else None
    return (dq if with_dq else None), d_gamma, d_w, d_wu, s, (rec_q if fused else None), (rec_t if fused else None), d_lb


def _grad_pass(mode: int, with_dq: bool, dq_affine) -> int:
    if with_dq and dq_affine is None:
        return PASS_BOTH.value
    if mode != MODE_GRADS:
        raise ValueError("with_dq=False and dq_affine serve the split BatchNorm backward: MODE_GRADS only")
    if dq_affine is not None and not with_dq:
        raise ValueError("dq_affine asks for dq: it cannot go with with_dq=False")
    return PASS_SUMS.value if not with_dq else PASS_DQ_AFFINE.value


def reduce_slots(ws: torch.Tensor, plan: seat_plan.GradPlan, launch: Callable = common.identity_launch) -> torch.Tensor:
    """(B, slot_len): each image's partial sums, added over its runs in a fixed order."""
    out = torch.empty((plan.B, plan.slot_len), device=ws.device, dtype=ws.dtype)
    grid = (triton.cdiv(plan.slot_len, seat_plan.REDUCE_BLOCK), plan.B)
    launch(reduce_slots_kernel)[grid](
        ws, out, plan.slot_len, plan.row_blocks, plan.items, plan.ctas_per_range,
        ACC=common.tl_acc_dtype(ws.dtype), BLOCK=seat_plan.REDUCE_BLOCK, num_warps=4,
    )
    return out


def combine_through_values(
    d_gamma: torch.Tensor, d_w: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the gradient that flows through V = Gamma W^T: dGamma += S W, dW += sum_b S_b^T Gamma_b."""
    acc = d_gamma.dtype
    with torch.autocast(device_type=gamma.device.type, enabled=False):
        w = weight.to(acc)
        d_gamma = torch.baddbmm(d_gamma, s, w.expand(s.shape[0], -1, -1))
        d_w = d_w + torch.matmul(s.transpose(1, 2), gamma.to(acc)).sum(0)
    return d_gamma, d_w

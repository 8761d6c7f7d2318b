"""The gradient kernel's per-row-block device functions (seat_backward.py): the fused loss's
forward and its losses' gradients, the saved rows, the softmax gradient's values term, the
partial sums' store, and the dq sub-tiles (with the split BatchNorm backward's affine)."""

from __future__ import annotations

import triton
import triton.language as tl
from san_fast.kernels.seat_forward import logits_and_rec_q, mm, tile_offsets


@triton.jit
def forward_rows(
    q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, b, rows, rows_ok, ns, n_ok, chan, chan_ok, N, P, C, tau,
    stride_qm, stride_qp, HAS_BIAS: tl.constexpr, LOGIT_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The forward of one row block over the whole of P: the attention and rec_q, rec_t (bias
    added), in ACC; column j of rec_q, rec_t is channel chan[j]."""
    # Default eviction: the other CTAs of this run read these rows now (traffic.py's L2 rule).
    logits, rec_q = logits_and_rec_q(
        q_img, rows, gamma_ptr, b * N + ns, w_ptr, lb_ptr, rows_ok, n_ok, chan, chan_ok, P, tau, stride_qm, stride_qp,
        LOGIT_BIAS, True, "", PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
    )
    row_max = tl.max(logits, axis=1)
    e = tl.exp(logits - row_max[:, None])
    attn = e / tl.sum(e, axis=1)[:, None]
    v = tl.load(v_blk + ns[:, None] * C + chan[None, :], mask=n_ok[:, None] & chan_ok[None, :], other=0.0)
    rec_t = mm(attn, v, tl.zeros((BLOCK_M, BLOCK_C), ACC), "ieee")
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=chan_ok, other=0.0).to(ACC)
        rec_q += bias[None, :]
        rec_t += bias[None, :]
    return attn, rec_q, rec_t


@triton.jit
def loss_grads(rec_q, rec_t, x_img, rows, rows_ok, chan, chan_ok, low, h_rec, h_con, stride_xm, stride_xc,
               MODE: tl.constexpr, ACC: tl.constexpr, OFFS64: tl.constexpr, U_SUMS: tl.constexpr):
    """The gradients of the two MSE losses at rec_q, rec_t (without the 2/K of the means: O(1)
    residuals survive the cast to fp16/bf16 for tl.dot, and the launcher's grad_scale = 2/K
    multiplies the fp32 results instead).

    Returns gt (columns [0, C)) and gu: gq in columns [0, HALF), u = rec_q - x in
    [HALF, BLOCK_C), so that one tl.dot gives both dW partial sums; with U_SUMS (target x,
    where gq = h_rec u) u alone in [0, HALF), the kernel applying h_rec to dq's W term."""
    both_ok = rows_ok[:, None] & chan_ok[None, :]
    x = tl.load(x_img + tile_offsets(rows, chan, stride_xm, stride_xc, OFFS64), mask=both_ok, other=0.0).to(ACC)
    u = tl.where(both_ok, rec_q - x, 0.0)
    if MODE == 1:
        w_res = tl.where(both_ok, rec_t - x, 0.0)
        gq = h_rec * u
    else:
        w_res = tl.where(both_ok, rec_t - rec_q, 0.0)
        gq = h_rec * u - h_con * w_res
    gt = tl.where(low[None, :], h_con * w_res, 0.0)
    if U_SUMS:
        gu = tl.where(low[None, :], u, 0.0)
    else:
        gu = tl.where(low[None, :], gq, u)
    return gt, gu


@triton.jit
def store_rec_rows(rq_img, rt_img, rec_q, rec_t, rows, rows_ok, cs, chan_ok, low, C, OFFS64: tl.constexpr):
    """rec_q, rec_t of a row block into the image's (M, C) ACC buffers: the low half of the
    columns (the fused loss repeats the C channels in both halves)."""
    out_offs = tile_offsets(rows, cs, C, 1, OFFS64)
    out_ok = rows_ok[:, None] & chan_ok[None, :] & low[None, :]
    tl.store(rq_img + out_offs, rec_q, mask=out_ok)
    tl.store(rt_img + out_offs, rec_t, mask=out_ok)


@triton.jit
def fused_loss_rows(
    q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, x_img, rq_ptr, rt_ptr, b, rows, rows_ok, ns, n_ok, cs, chan,
    chan_ok,
    low, store_rec, M, N, P, C, tau, h_rec, h_con, stride_qm, stride_qp, stride_xm, stride_xc,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, LOGIT_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, OFFS64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    U_SUMS: tl.constexpr,
):
    """The fused design: the forward of one row block (every CTA of the run computes it) and
    the losses' gradients (loss_grads); `store_rec` CTAs write rec_q, rec_t. Returns the
    attention, gt and gu."""
    attn, rec_q, rec_t = forward_rows(
        q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, b, rows, rows_ok, ns, n_ok, chan, chan_ok, N, P, C, tau,
        stride_qm, stride_qp, HAS_BIAS, LOGIT_BIAS, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
    )
    if store_rec:
        store_rec_rows(rq_ptr + b * M * C, rt_ptr + b * M * C, rec_q, rec_t, rows, rows_ok, cs, chan_ok, low, C, OFFS64)
    gt, gu = loss_grads(rec_q, rec_t, x_img, rows, rows_ok, chan, chan_ok, low, h_rec, h_con, stride_xm, stride_xc,
                        MODE, ACC, OFFS64, U_SUMS)
    return attn, gt, gu


@triton.jit
def relay_publish(
    q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, attn_img, rq_img, rt_img, flag_ptr, b, rows, rows_ok, ns, n_ok,
    cs, chan, chan_ok, low, N, P, C, tau, stride_qm, stride_qp,
    HAS_BIAS: tl.constexpr, LOGIT_BIAS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The relay design's producer, one row block: its forward, written for the run's gradient
    CTAs (the attention in q's dtype, rec_q and rec_t in ACC), then its flag raised.

    The flag is a release at GPU scope after a CTA barrier (every thread's stores are then
    ordered before it: PTX's release is cumulative), the pattern of CUTLASS's semaphore."""
    attn, rec_q, rec_t = forward_rows(
        q_img, gamma_ptr, w_ptr, v_blk, bias_ptr, lb_ptr, b, rows, rows_ok, ns, n_ok, chan, chan_ok, N, P, C, tau,
        stride_qm, stride_qp, HAS_BIAS, LOGIT_BIAS, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_N, BLOCK_C, BLOCK_P,
    )
    tl.store(attn_img + tile_offsets(rows, ns, N, 1, OFFS64), attn.to(attn_img.dtype.element_ty),
             mask=rows_ok[:, None] & n_ok[None, :])
    store_rec_rows(rq_img, rt_img, rec_q, rec_t, rows, rows_ok, cs, chan_ok, low, C, OFFS64)
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, 1, sem="release", scope="gpu")


# Every thread spins on its own acquire load, so its later loads are ordered after the flag
# with no barrier. One instruction to triton (an elementwise op), not a loop: a loop inside the
# persistent loop would keep triton's software pipeliner off it (it pipelines innermost loops
# only; offline compiles for sm90 showed 6 async copies with a while loop, none of them in the
# gradient loop). ${:uid} makes the label unique per copy of the asm.
SPIN_ON_FLAG = tl.constexpr("""{
.reg .pred %p_wait;
WAIT${:uid}:
ld.acquire.gpu.global.b32 $0, [$1];
setp.eq.s32 %p_wait, $0, 0;
@%p_wait bra WAIT${:uid};
}""")


@triton.jit
def wait_flag(flag_ptr, SPIN_ASM: tl.constexpr):
    """Return once the int32 at flag_ptr is non-zero (acquire, GPU scope). SPIN_ASM: on a GPU, in
    PTX; else (the interpreter, which cannot run PTX) a loop of atomic reads."""
    if SPIN_ASM:
        tl.inline_asm_elementwise(SPIN_ON_FLAG, "=r,l", [flag_ptr], dtype=tl.int32, is_pure=False, pack=1)
    else:
        ready = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
        while ready == 0:
            ready = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def relayed_rows(attn_img, rq_img, rt_img, x_img, flag_ptr, rows, rows_ok, ns, n_ok, chan, chan_ok, low, N, C,
                 h_rec, h_con, stride_xm, stride_xc, MODE: tl.constexpr, ACC: tl.constexpr, OFFS64: tl.constexpr,
                 U_SUMS: tl.constexpr, SPIN_ASM: tl.constexpr):
    """The relay design's gradient CTA, one row block: wait for its flag, then read what the
    producer wrote and take the losses' gradients (loss_grads). Returns the attention, gt, gu.

    The producer took its ticket before this CTA (seat_grad_kernel), so it is running and
    never waits: the spin ends. Loads bypass L1 (.cg): a neighbouring row block's load may
    have brought these lines into L1 before they were written."""
    wait_flag(flag_ptr, SPIN_ASM)
    attn = tl.load(attn_img + tile_offsets(rows, ns, N, 1, OFFS64), mask=rows_ok[:, None] & n_ok[None, :],
                   other=0.0, cache_modifier=".cg")
    rc_offs = tile_offsets(rows, chan, C, 1, OFFS64)
    rc_ok = rows_ok[:, None] & chan_ok[None, :]
    rec_q = tl.load(rq_img + rc_offs, mask=rc_ok, other=0.0, cache_modifier=".cg")
    rec_t = tl.load(rt_img + rc_offs, mask=rc_ok, other=0.0, cache_modifier=".cg")
    gt, gu = loss_grads(rec_q, rec_t, x_img, rows, rows_ok, chan, chan_ok, low, h_rec, h_con, stride_xm, stride_xc,
                        MODE, ACC, OFFS64, U_SUMS)
    return attn.to(ACC), gt, gu


@triton.jit
def values_grad(gt, attn, v_blk, acc_s, ns, n_ok, cs, C: tl.constexpr, with_s, ACC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """da = gt V^T and, when `with_s`, acc_s += a^T gt, one real channel at a time: C <= 8 (3 in
    SAN), so C rank-one updates cost a fifth of a dot padded to 16 columns, in exact fp32.
    Unrolled over the constexpr C: a loop over a runtime C nested in the persistent loop kept
    triton's software pipeliner off that loop (it pipelines innermost loops only), so each row
    block's loads waited for the previous block's compute (sm90: no async copies before)."""
    da = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for ci in tl.static_range(C):
        g_col = tl.sum(tl.where(cs[None, :] == ci, gt, 0.0), axis=1)
        v_col = tl.load(v_blk + ns * C + ci, mask=n_ok, other=0.0).to(ACC)
        da += g_col[:, None] * v_col[None, :]
        s_col = tl.sum(attn * g_col[:, None], axis=0)
        acc_s += tl.where((cs[None, :] == ci) & with_s, s_col[:, None], 0.0)
    return da, acc_s


@triton.jit
def pack_values_grad(dl, gu, ns, cs, N, C: tl.constexpr, HALF: tl.constexpr, W_ROWS: tl.constexpr):
    """dl with gu's columns in its zero padding: gu column ci (gq) at N + ci and, in the fused
    modes, column HALF + ci (u) at N + C + ci, the order of the dW rows in a workspace slot."""
    for ci in tl.static_range(C):
        col = tl.sum(tl.where(cs[None, :] == ci, gu, 0.0), axis=1)
        dl += tl.where(ns[None, :] == N + ci, col[:, None], 0.0)
        if W_ROWS == 2:
            col = tl.sum(tl.where(cs[None, :] == HALF + ci, gu, 0.0), axis=1)
            dl += tl.where(ns[None, :] == N + C + ci, col[:, None], 0.0)
    return dl


@triton.jit
def saved_rows(attn_img, ga_img, gt_img, rows, rows_ok, ns, n_ok, cs, c_ok, N, stride_am, stride_ac,
               stride_tm, stride_tc, ACC: tl.constexpr, OFFS64: tl.constexpr):
    """MODE_GRADS: a row block's saved attention and the gradients of rec_q, rec_t, in ACC."""
    attn = tl.load(attn_img + tile_offsets(rows, ns, N, 1, OFFS64), mask=rows_ok[:, None] & n_ok[None, :], other=0.0)
    mc_ok = rows_ok[:, None] & c_ok[None, :]
    gu = tl.load(ga_img + tile_offsets(rows, cs, stride_am, stride_ac, OFFS64), mask=mc_ok, other=0.0)
    gt = tl.load(gt_img + tile_offsets(rows, cs, stride_tm, stride_tc, OFFS64), mask=mc_ok, other=0.0)
    return attn.to(ACC), gt.to(ACC), gu.to(ACC)


@triton.jit
def range_sums(q_img, rows, rows_ok, cols, cols_ok, dl_lp, gu_lp, acc_g, acc_w, stride_qm, stride_qp,
               PACK_W: tl.constexpr, PRECISION: tl.constexpr, OFFS64: tl.constexpr):
    """Step 2's sums over a set of rows: acc_g += q^T dl, and acc_w += q^T gu unless dW rides
    in dl's padding (PACK_W). The last read of this Q tile (evict_first)."""
    q2 = tl.load(q_img + tile_offsets(rows, cols, stride_qm, stride_qp, OFFS64),
                 mask=rows_ok[:, None] & cols_ok[None, :], other=0.0, eviction_policy="evict_first")
    q2_t = tl.trans(q2)
    acc_g = mm(q2_t, dl_lp, acc_g, PRECISION)
    if not PACK_W:
        acc_w = mm(q2_t, gu_lp, acc_w, PRECISION)
    return acc_g, acc_w


@triton.jit
def row_halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """Rows [0, BLOCK_M / 2) and [BLOCK_M / 2, BLOCK_M) of a (BLOCK_M, WIDTH) tile."""
    return tl.split(tl.permute(tl.reshape(x, (2, BLOCK_M // 2, WIDTH)), (1, 2, 0)))


@triton.jit
def store_partials(slot_ptr, acc_g, acc_w, acc_s, grad_scale, p_lo, p2, p2_ok, ns, n_ok, cs, c_ok, w_rows, chan_ok,
                   with_s, N, P, C, W_ROWS: tl.constexpr, LOGIT_BIAS: tl.constexpr, PACK_W: tl.constexpr):
    """A run's partial sums for one image into its slot: dGamma (N x P), dW rows, and S (N x C,
    range 0 only), then with LOGIT_BIAS the logit bias's gradient (N, column C of acc_s). Offsets are 64-bit from the slot: built here, they live only while storing.
    With PACK_W acc_g's columns [N, N + W_ROWS C) hold the dW rows, which follow dGamma's."""
    if PACK_W:
        g_ok = ns < N + W_ROWS * C
    else:
        g_ok = n_ok
        tl.store(slot_ptr + p_lo + w_rows[None, :] + p2[:, None], acc_w * grad_scale,
                 mask=chan_ok[None, :] & p2_ok[:, None])
    tl.store(slot_ptr + p_lo + ns[None, :] * P + p2[:, None], acc_g * grad_scale, mask=g_ok[None, :] & p2_ok[:, None])
    if with_s:
        tl.store(slot_ptr + (N + W_ROWS * C) * P + ns[:, None] * C + cs[None, :], acc_s * grad_scale,
                 mask=n_ok[:, None] & c_ok[None, :])
        if LOGIT_BIAS:  # column C of acc_s, after S
            tl.store(slot_ptr + (N + W_ROWS * C) * P + N * C + ns[:, None] + cs[None, :] * 0, acc_s * grad_scale,
                     mask=n_ok[:, None] & (cs == C)[None, :])


@triton.jit
def dq_rows(q_img, dq_img, gamma_ptr, w_ptr, alpha_ptr, beta_ptr, dl_lp, gu_lp, grad_scale, b, rows, rows_ok, ns,
            n_ok, cs, c_ok, pd, p_lo, N, C, P, P_RANGE, stride_qm, stride_qp, stride_dqm, stride_dqp,
            AFFINE: tl.constexpr, PACK_W: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
            OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P2: tl.constexpr, BLOCK_PD: tl.constexpr,
            EVEN_P: tl.constexpr = False, WIDE_RANGE: tl.constexpr = False):
    """dq = dl Gamma + gq W of a row block over range j, in BLOCK_PD-wide sub-tiles; AFFINE adds
    alpha + beta q per channel (q re-read per sub-tile: this pass loads no whole Q tile). With
    PACK_W dl carries gq in columns [N, N + C) and W's rows go under Gamma's: one dot.

    Unrolled, except in a WIDE_RANGE: there the compiler hoisted every unrolled sub-tile's W
    pointers and masks (loop-invariant) out of the persistent loop, which a 512-wide range's
    accumulators leave no registers for."""
    if WIDE_RANGE:
        for s in range(BLOCK_P2 // BLOCK_PD):
            dq_subtile(q_img, dq_img, gamma_ptr, w_ptr, alpha_ptr, beta_ptr, dl_lp, gu_lp, grad_scale, b, rows,
                       rows_ok, ns, n_ok, cs, c_ok, s * BLOCK_PD + pd, p_lo, N, C, P, P_RANGE, stride_qm, stride_qp,
                       stride_dqm, stride_dqp, AFFINE, PACK_W, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_PD, EVEN_P)
    else:
        for s in tl.static_range(BLOCK_P2 // BLOCK_PD):
            dq_subtile(q_img, dq_img, gamma_ptr, w_ptr, alpha_ptr, beta_ptr, dl_lp, gu_lp, grad_scale, b, rows,
                       rows_ok, ns, n_ok, cs, c_ok, s * BLOCK_PD + pd, p_lo, N, C, P, P_RANGE, stride_qm, stride_qp,
                       stride_dqm, stride_dqp, AFFINE, PACK_W, PRECISION, ACC, OFFS64, BLOCK_M, BLOCK_PD, EVEN_P)


@triton.jit
def dq_subtile(q_img, dq_img, gamma_ptr, w_ptr, alpha_ptr, beta_ptr, dl_lp, gu_lp, grad_scale, b, rows, rows_ok, ns,
               n_ok, cs, c_ok, cols, p_lo, N, C, P, P_RANGE, stride_qm, stride_qp, stride_dqm, stride_dqp,
               AFFINE: tl.constexpr, PACK_W: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
               OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_PD: tl.constexpr, EVEN_P: tl.constexpr):
    """One BLOCK_PD-wide sub-tile of dq_rows: columns p_lo + cols."""
    cols_ok = range_columns_ok(cols, p_lo, P_RANGE, P, EVEN_P)
    g = tl.load(gamma_ptr + tile_offsets(b * N + ns, p_lo + cols, P, 1, OFFS64),
                mask=n_ok[:, None] & cols_ok[None, :], other=0.0)
    if PACK_W:
        # Rows [N, N + C) of the operand are W's; the u columns (fused modes) meet zeros.
        w_row = tl.where(ns >= N, ns - N, 0)
        w_ok = (ns >= N) & (ns < N + C)
        g += tl.load(w_ptr + p_lo + w_row[:, None] * P + cols[None, :], mask=w_ok[:, None] & cols_ok[None, :],
                     other=0.0)
        dq = mm(dl_lp, g, tl.zeros((BLOCK_M, BLOCK_PD), ACC), PRECISION) * grad_scale
    else:
        # W in rows [0, C) only: gu @ w is gq W; the u half meets zeros.
        w = tl.load(w_ptr + p_lo + cs[:, None] * P + cols[None, :], mask=c_ok[:, None] & cols_ok[None, :],
                    other=0.0)
        dq = mm(dl_lp, g, tl.zeros((BLOCK_M, BLOCK_PD), ACC), PRECISION)
        dq = mm(gu_lp, w, dq, PRECISION) * grad_scale
    ok = rows_ok[:, None] & cols_ok[None, :]
    if AFFINE:
        q = tl.load(q_img + tile_offsets(rows, p_lo + cols, stride_qm, stride_qp, OFFS64), mask=ok, other=0.0,
                    eviction_policy="evict_first")
        alpha = tl.load(alpha_ptr + p_lo + cols, mask=cols_ok, other=0.0)
        beta = tl.load(beta_ptr + p_lo + cols, mask=cols_ok, other=0.0)
        dq += alpha[None, :] + beta[None, :] * q.to(ACC)
    dq_offs = tile_offsets(rows, p_lo + cols, stride_dqm, stride_dqp, OFFS64)
    tl.store(dq_img + dq_offs, dq.to(dq_img.dtype.element_ty), mask=ok, eviction_policy="evict_first")


@triton.jit
def range_columns_ok(cols, p_lo, P_RANGE, P, EVEN_P: tl.constexpr):
    """Columns cols of range [p_lo, p_lo + P_RANGE) that exist. EVEN_P (every range full and as
    wide as its tile): all of them, a constant the compiler drops from every mask."""
    if EVEN_P:
        ok = cols >= 0
    else:
        ok = (cols < P_RANGE) & (p_lo + cols < P)
    return ok

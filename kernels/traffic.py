"""HBM traffic, FLOPs and modeled time of every SEAT op, from the launches that actually run.

    python -m san_fast.kernels.traffic [--gpu H100] [--full] [--compact]

Each op is a list of launches built from seat_plan.py, the module the launchers take their
tiles, grids and workspaces from: `grad_launches(plan)` counts the bytes of the very GradPlan
`launch_grad` runs. Where the autotuner picks a config at run time, no HBM byte depends on the
pick (only BLOCK_P / BLOCK_PD / warps / stages are tuned); FLOPs (padding) and L2 traffic do, and
the model takes the largest over every candidate, naming them in the launch's config.

Bytes are HBM bytes: each tensor counted once when read or written, plus re-reads that miss L2.
Assumed: gamma and W are fp32 master weights (as under autocast) cast once per call to q's dtype;
the target image x and the rec gradients are in q's dtype.

L2 rule. A re-read hits L2 only if its reuse distance fits the effective capacity:

    reuse distance  = DRIFT_ROW_BLOCKS x T x (bytes one group of K CTAs touches per row block)
                      + the resident set (the gamma operand of the <= T images the runs are on,
                        re-read by every row block)
    effective L2    = L2_FRACTION x the GPU's l2_bytes

L2_FRACTION = 0.5: an H100's 50 MiB L2 is two partitions, and a line used by SMs on both sides
may be held twice; the other half also absorbs imperfect replacement and the writes in flight.
T is the number of concurrent groups (CTA runs; one CTA per SM). A group's bytes per row block:
the Q row block (all K ranges), its dQ, and its attention rows and per-row inputs. The K CTAs of
a group start together and do identical work per row block, so they are assumed to stay within
DRIFT_ROW_BLOCKS = 2 row blocks of each other (nothing enforces it: a GPU measurement checks it).
Re-reads it covers: the fused loss's K reads of each Q row block and its step-2 re-read of the
CTA's own range (else counted as "Q re-read (HBM)"); the K reads of the saved attention and the
rec gradients in the backward (else "attention re-read (HBM)"). Loads that are last uses carry
evict_first (step 2's Q tile, the forward's Q, dQ stores) to keep the shared lines in L2.

L1 rule. Step 2 of the gradient kernel reads its range's gamma slice (N x range) for every row
block. Where the kernel's loads are not software-pipelined (every autotune candidate at
num_stages = 1, so they are plain ld.global, cached in L1; pipelined loads are cp.async.cg
into shared memory, past L1), one CTA per SM, and the CTA's own L1 traffic per row block (the
slice, its Q range tile and, in the fused design, pass 1's Q row block and all of gamma) fits
L1_REUSE_BYTES, the slice is read from L2 once per (CTA, image) and from L1 after that. The
relay design's gradient CTAs at N = 64 are the case (32 x 64 tile, one stage: 8 KiB slice,
4 KiB Q tile; their relayed rows bypass L1). L1_REUSE_BYTES = 32 KiB: a quarter of a V100's
128 KiB of L1 and shared memory (256 KiB on an H100), the rest left to shared memory and lines
in flight.

Time. Per launch, max(HBM bytes / hbm rate, FLOPs / matmul rate, L2 bytes / L2 rate), summed
over launches, with the FLOP and L2 rates scaled by the fraction of SMs the grid occupies. Tensor-core
FLOPs (the big dots in q's dtype, padded as executed) at the GPU's rate for that dtype; the small
fp32 dots at its fp32 rate. L2 bytes: every load and store between the SMs and L2 (hits
included), at the GPU's l2_hit_bytes_per_s (san_fast/gpu_specs.py: assumed, not measured). The
L2 term is this model's addition to max(bytes, FLOPs): without it the fused loss's K-fold reads
of each Q row block, HBM-free by the L2 rule, would look free, and the launcher would pick a
design that moves ~18x Q's bytes through L2 (kernels/README.md, "Which loss design").
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Union

import torch
import triton
from san_fast.gpu_specs import GPUSpec, gpu_spec
from san_fast.kernels import seat_common as common
from san_fast.kernels import seat_plan
from san_fast.kernels.seat_plan import LOSS_MODES, MODE_GRADS, MODE_LOSS_IMAGE, GradPlan

OPS = ("forward", "backward", "forward_backward", "fused_loss", "labels")
LOSS_DESIGNS = ("fused", "relay", "two_pass")
L2_FRACTION = 0.5
DRIFT_ROW_BLOCKS = 2
L1_REUSE_BYTES = 32 * 1024
PAPER = {"B": 16, "M": 128 * 128, "P": 1024, "N": 27, "C": 3, "dtype": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class LaunchTraffic:
    name: str
    grid: tuple
    config: dict
    bytes_by_tensor: dict
    flops: int
    modeled_ms: float
    l2_bytes: int
    ctas: int
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_tensor.values())


@dataclasses.dataclass(frozen=True)
class OpTraffic:
    op: str
    shape: dict
    launches: tuple
    bytes_by_tensor: dict
    total_bytes: int
    floor_bytes: int
    flops: int
    modeled_ms: float
    l2_bytes: int = 0
    l2_ms: float = 0.0
    design: str = ""

    def ratio(self) -> float:
        return self.total_bytes / self.floor_bytes


def _esize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _spec(gpu: Union[str, GPUSpec]) -> GPUSpec:
    return gpu if isinstance(gpu, GPUSpec) else gpu_spec(gpu)


def _launch(name, grid, config, by_tensor, tensor_flops, fp32_flops, l2_bytes, ctas, spec, dtype, note=""):
    frac = min(1.0, ctas / spec.sms)
    rate = spec.matmul_rate(dtype) if dtype in (torch.float16, torch.bfloat16) else spec.matmul_flops["fp32"]
    flop_s = tensor_flops / (rate * frac) + fp32_flops / (spec.matmul_flops["fp32"] * frac)
    by = {k: int(v) for k, v in by_tensor.items()}
    # L2-to-SM bandwidth is per SM too: a grid on a fraction of the SMs gets that fraction.
    l2_s = l2_bytes / (spec.l2_hit_bytes_per_s * frac) if spec.l2_hit_bytes_per_s else 0.0
    ms = max(sum(by.values()) / spec.hbm_bytes_per_s, flop_s, l2_s) * 1e3
    return LaunchTraffic(name, tuple(grid), config, by, int(tensor_flops + fp32_flops), ms, int(l2_bytes), ctas, note)


def _torch_op(name, by_tensor, spec, dtype, flops=0, note=""):
    """A small PyTorch op around the kernels: its bytes, at the GPU's full rate."""
    total = sum(by_tensor.values())
    return _launch(f"torch: {name}", (), {}, by_tensor, 0, flops, total, spec.sms, spec, dtype, note)


def _operand_casts(B, N, P, C, dtype, spec, with_w=True, folded=False) -> list:
    """gamma / W (fp32 masters) to q's dtype, and V = Gamma W^T (seat_common.as_operand,
    seat_forward.values_matrix); folded, V comes with the operands (fold_launches)."""
    e, out = _esize(dtype), []
    if dtype != torch.float32:
        out.append(_torch_op("cast gamma to q's dtype", {"gamma, W, V": B * N * P * (4 + e)}, spec, dtype))
    if with_w and not folded:
        out.append(_torch_op("V = gamma W^T", {"gamma, W, V": B * N * P * 4 + C * P * 4 + B * N * C * 4},
                             spec, dtype, flops=2 * B * N * P * C))
    return out


def fold_launches(B, N, P, C, dtype, spec, backward: bool) -> list:
    """The BatchNorm fold's small torch ops (kernels/seat_bn_fold.py), fp32: the forward reads
    gamma for Gamma s, lb = Gamma t and V' = Gamma W^T - W t and writes Gamma s; the backward
    reads dGamma' and gamma and writes dGamma (dGamma' s + dlb t^T; ds, dt are (P,) sums)."""
    gnp = B * N * P * 4
    out = [_torch_op("BN fold: Gamma s, W s, V', lb", {"gamma, W, V": 4 * gnp + 3 * C * P * 4 + B * N * (C + 1) * 4},
                     spec, dtype, flops=2 * B * N * P * (C + 2))]
    if backward:
        out.append(_torch_op("BN fold backward: dGamma, dW, ds, dt", {"parameter grads": 3 * gnp + 4 * C * P * 4},
                             spec, dtype, flops=6 * B * N * P))
    return out


def forward_launches(B, M, P, N, C, dtype, spec, *, save_attn=False, labels=False, folded=False) -> list:
    e, bn, bc = _esize(dtype), common.block_n(N), common.BLOCK_C
    out = _operand_casts(B, N, P, C, dtype, spec, with_w=not labels, folded=folded)
    configs = seat_plan.forward_configs(bn, interpreter=False)
    by = {"Q read": B * M * P * e, "gamma, W, V": B * N * P * e + (B * N * 4 if folded else 0)}
    if labels:
        by["per-row in/out"] = B * M * 8
    else:
        by["gamma, W, V"] += C * P * e + B * N * C * 4
        by["per-row in/out"] = 2 * B * M * C * e
        if save_attn:
            by["attention write"] = B * M * N * e
    name = "seat_forward_kernel (labels)" if labels else f"seat_forward_kernel{' (saves attention)' if save_attn else ''}"
    candidates = []
    for cfg in configs:
        bm, bp = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_P"]
        progs = B * triton.cdiv(M, bm)
        rows, cols = progs * bm, triton.cdiv(P, bp) * bp
        tensor = 2 * rows * cols * (bn + (0 if labels else bc))
        small = 0 if labels else 2 * rows * bn * bc
        l2 = sum(by.values()) + progs * (N + (0 if labels else C)) * P * e
        config = {"BLOCK_M": bm, "BLOCK_P": bp, "warps": cfg.num_warps, "stages": cfg.num_stages,
                  "autotuned over": [common.config_label(c) for c in configs]}
        candidates.append(_launch(name, ("cdiv(M, BLOCK_M)", B), config, by, tensor, small, l2, progs, spec, dtype,
                                  note="the autotuner's pick taken as its fastest candidate; HBM bytes are the same "
                                       "for every candidate"))
    out.append(min(candidates, key=lambda x: x.modeled_ms))
    return out


def _shared_in_l2(plan: GradPlan, dtype, spec) -> tuple[bool, int]:
    """The L2 rule (module docstring): do the K CTAs of a run share their rows through L2?"""
    e = _esize(dtype)
    per_row = 2 * plan.P * e  # the Q row (all ranges) and its dQ row
    if plan.mode == MODE_GRADS:
        per_row += plan.N * e + 2 * plan.C * e
    else:
        per_row += plan.C * e + 2 * plan.C * 4 + (plan.N * e if plan.relay else 0)
    group = plan.block_m * per_row
    # Each run is on one image at a time: T runs keep at most T images' gamma hot.
    resident = (min(plan.B, plan.ctas_per_range) * plan.N + plan.C) * plan.P * e
    window = DRIFT_ROW_BLOCKS * plan.ctas_per_range * group + resident
    return window <= L2_FRACTION * spec.l2_bytes, window


def _slice_in_l1(plan: GradPlan, dtype, tunes: list) -> bool:
    """The L1 rule (module docstring): does step 2's gamma slice stay in L1 across row blocks?"""
    e = _esize(dtype)
    if any(c.num_stages != 1 or seat_plan.resident_ctas(c.num_warps) != 1 for c in tunes):
        return False
    per_row_block = (plan.block_n + plan.C) * plan.block_p2 * e + plan.block_m * plan.block_p2 * e
    if plan.mode in LOSS_MODES and not plan.relay:  # pass 1 over whole rows, in every CTA
        per_row_block += (plan.block_m + plan.block_n) * plan.P * e
    return per_row_block <= L1_REUSE_BYTES


def grad_launches(plan: GradPlan, dtype: torch.dtype, spec: GPUSpec, folded: bool = False,
                  split_bn: bool = False) -> list:
    """The gradient kernel of `plan`, its slot reduction, and the torch ops that finish dGamma, dW
    (`folded`: with the BatchNorm fold's logit bias and explicit V). `split_bn` (folded,
    MODE_GRADS): the split BatchNorm backward (kernels/seat_bn_split.py), the kernel run twice,
    a sums pass that writes no dQ, then a dq pass that reads Q again, writes dy = dq + alpha +
    beta q and sums nothing. A plan with `split` runs the same two passes, its dq pass reading
    no Q (seat_plan.SPLIT_BACKWARD_BLOCK_N)."""
    B, M, P, N, C = plan.B, plan.M, plan.P, plan.N, plan.C
    e, acc = _esize(dtype), common.acc_dtype(dtype).itemsize
    bn, bc, k, bm = plan.block_n, common.BLOCK_C, plan.k, plan.block_m
    fused = plan.mode in LOSS_MODES
    shared, window = _shared_in_l2(plan, dtype, spec)
    q_bytes = B * M * P * e
    by = {"Q read": q_bytes, "dQ write": q_bytes,
          "gamma, W, V": B * N * P * e + C * P * e + B * N * C * 4 + (B * N * 4 if folded and fused else 0)}
    relay = plan.relay
    loss_rows = B * M * C * e + 2 * B * M * C * acc  # x in, rec_q and rec_t out
    if relay:  # producers read Q; each gradient CTA re-reads its range, and the relayed rows
        attn = B * M * N * e
        by["Q re-read (HBM)"] = 0 if shared else q_bytes
        by["attention write"] = attn
        by["attention re-read (HBM)"] = 0 if shared else k * attn
        by["per-row in/out"] = loss_rows
        row_l2 = 2 * q_bytes + attn + 2 * B * M * C * acc + k * (attn + loss_rows)
    elif fused:
        by["Q re-read (HBM)"] = 0 if shared else k * q_bytes  # K - 1 other CTAs, plus step 2
        by["per-row in/out"] = loss_rows
        row_l2 = k * q_bytes + q_bytes + k * B * M * C * e
    else:
        attn, grads = B * M * N * e, 2 * B * M * C * e
        by["attention read"] = attn
        by["attention re-read (HBM)"] = 0 if shared else (k - 1) * (attn + grads)
        by["per-row in/out"] = grads
        row_l2 = k * (attn + grads) + q_bytes
    used = plan.used_slots()
    by["workspace"] = used * plan.slot_len * acc
    items = plan.items * k  # row blocks visited, all CTAs
    tunes = seat_plan.grad_configs(plan.mode, bn, plan.block_p2, interpreter=False, relay=relay)
    # Step 2's range in every CTA (once per image where L1 holds it); pass 1's whole rows in
    # every CTA (fused) or once (relay).
    in_l1 = _slice_in_l1(plan, dtype, tunes)
    slice_reads = k * used if in_l1 else items
    passes1 = plan.items if relay else items if fused else 0
    gamma_l2 = (slice_reads * plan.p_range + passes1 * P) * N * e
    l2 = row_l2 + q_bytes + gamma_l2 + by["workspace"]
    # dGamma, dW, dq dots; packed, dW rides in dGamma's dot and W under Gamma in dq's (PACK_W)
    step2 = 2 * items * bm * plan.block_p2 * 2 * (bn + (0 if plan.packs_w else bc))
    small = (items + plan.items) * 2 * bm * bn * C  # da = gt V^T (every CTA), S += a^T gt (range 0)
    pass1 = 0
    if fused:
        # The pass-1 chunk (autotuned) only pads P: the least padding, as the fastest pick.
        p_pad = min(triton.cdiv(P, c.kwargs["BLOCK_P"]) * c.kwargs["BLOCK_P"] for c in tunes)
        pass1 = passes1 * 2 * bm * p_pad * (bn + bc)
        small += passes1 * 2 * bm * bn * bc  # rec_t = a V
    config = {"BLOCK_M": bm, "BLOCK_P2": plan.block_p2, "P range": plan.p_range, "K": k,
              "T": plan.ctas_per_range, **({"producers": plan.producers} if relay else {}), "slots used": used,
              "autotuned over": [common.config_label(c) for c in tunes]}
    note = (f"rows shared through L2 (reuse distance {window / 2**20:.1f} MiB)" if shared else
            f"rows NOT shared through L2 (reuse distance {window / 2**20:.1f} MiB)")
    if in_l1:
        note += "; gamma slice held in L1 across row blocks"
    out = _operand_casts(B, N, P, C, dtype, spec, folded=folded)  # launch_grad casts gamma, W (and builds V)
    if split_bn or plan.split:
        out += _split_launches(plan, dtype, spec, config, by, step2, small, l2, note, affine=split_bn)
    else:
        if relay:
            out.append(_torch_op("zero the relay flags", {"flags": 4 * (1 + plan.items)}, spec, dtype))
        kind = "fused loss, relay" if relay else "fused loss" if fused else "from saved attention"
        out.append(_launch(f"seat_grad_kernel ({kind})", plan.grid,
                           config, by, pass1 + step2, small, l2, plan.ctas, spec, dtype, note=note))
    sums = B * plan.slot_len * acc
    out.append(_launch("reduce_slots_kernel", (triton.cdiv(plan.slot_len, seat_plan.REDUCE_BLOCK), B),
                       {"BLOCK": seat_plan.REDUCE_BLOCK}, {"workspace": used * plan.slot_len * acc + sums}, 0, 0,
                       used * plan.slot_len * acc + sums, min(spec.sms, B * triton.cdiv(plan.slot_len, 1024)),
                       spec, dtype))
    w_rows = plan.w_rows
    out.append(_torch_op("sum dW partials over images", {"parameter grads": (B + 1) * w_rows * C * P * acc}, spec, dtype))
    out.append(_torch_op("dGamma += S W, dW += S^T Gamma",
                         {"parameter grads": 2 * B * N * P * acc + B * N * P * 4 + 2 * B * C * P * acc},
                         spec, dtype, flops=4 * B * N * C * P))
    return out


def _split_launches(plan: GradPlan, dtype, spec, config, by, step2, small, l2, note, affine: bool) -> list:
    """A split backward's two launches of the gradient kernel (grad_launches): half of step 2's
    dots each (the sums' in the first, dq's in the second), the per-row softmax gradient and
    its rows in both. `affine` (the split BatchNorm backward): the second reads Q (y) again,
    and per channel alpha, beta."""
    if plan.mode != MODE_GRADS:
        raise ValueError("a split backward runs the gradient kernel from saved attention (MODE_GRADS)")
    sums = {k: v for k, v in by.items() if k != "dQ write"}
    read = ("Q read",) if affine else ()
    dq = {k: by[k] for k in (*read, "dQ write", "gamma, W, V", "attention read", "attention re-read (HBM)",
                             "per-row in/out")}
    dq_l2 = l2 - by["workspace"] - (0 if affine else by["Q read"])
    name, dq_name = ("split BN", "dy = dq + alpha + beta q") if affine else ("split", "no Q read")
    if affine:
        dq["BN alpha, beta"] = 2 * plan.P * 4
    return [_launch(f"seat_grad_kernel ({name}: sums pass, no dQ)", plan.grid, config, sums, step2 // 2, small,
                    l2 - by["Q read"], plan.ctas, spec, dtype, note=note),
            _launch(f"seat_grad_kernel ({name}: dq pass, {dq_name})", plan.grid, config, dq,
                    step2 // 2, small, dq_l2, plan.ctas, spec, dtype, note=note)]


def _loss_glue(B, M, C, dtype, spec, fused: bool) -> list:
    """The losses from rec_q, rec_t, and in the backward the small per-row terms (u, dbias, dx;
    the rec gradients in the two-pass design)."""
    e, acc = _esize(dtype), 4
    rows = B * M * C
    rec = (acc if fused else e)
    out = [_torch_op("losses from rec_q, rec_t", {"per-row in/out": rows * (2 * rec + e)}, spec, dtype)]
    if fused:
        out.append(_torch_op("u, dx, dbias", {"per-row in/out": rows * (3 * acc + 2 * e)}, spec, dtype))
    else:
        out.append(_torch_op("grads of rec_q, rec_t, dx", {"per-row in/out": rows * (3 * e + 3 * e)}, spec, dtype))
    return out


def rescale_launch(B, M, P, C, dtype, spec, skipped: bool = True) -> LaunchTraffic:
    e = _esize(dtype)
    by = {"dQ rescale": 0 if skipped else 2 * B * M * P * e + B * M * C * 4}
    note = ("skipped on the device: upstream gradients equal the hint (else dQ is read and written once more)"
            if skipped else "upstream gradients differ from the hint: dQ read and written once more")
    return _launch("rescale_dq_kernel (in place)", ("cdiv(M, 32)", B), {"BLOCK_M": 32, "BLOCK_P": 128}, by,
                   0, 0 if skipped else 2 * B * M * P * 16, sum(by.values()), spec.sms, spec, dtype, note=note)


def bn_stats_launch(B, M, P, dtype, spec) -> LaunchTraffic:
    """BatchNorm's statistics' backward as its own elementwise passes, where the SEAT loss runs a
    one-pass design: dy = dq + alpha + beta y per channel (seat_bn_fold.attach_moments), as eager
    runs it, the only place a one-pass design runs: moments_grad's addcmul in fp32 (read y, write
    fp32) and its cast to y's dtype, then autograd's sum with dq (read both, write dy). A fused
    pass (torch.compile's) would move 3 of Q's bytes; this one 9 in bf16."""
    rows, e = B * M * P, _esize(dtype)
    per_row = (2 * (4 + e) if e != 4 else 2 * 4) + 3 * e
    return _torch_op("BN statistics backward (eager): alpha + beta y, then dq + it", {"BN statistics pass": rows * per_row},
                     spec, dtype, flops=3 * rows)


def floor_bytes(op: str, B: int, M: int, P: int, N: int, C: int, dtype: torch.dtype) -> int:
    """The bytes an op cannot avoid: Q (and dQ) as the brief counts them, plus the small
    tensors: gamma (B,N,P) and W (C,P) read as fp32 masters, rec_q and rec_t written, the rec
    gradients or the image x read (q's dtype), dGamma and dW written in fp32.

    forward: Q once; labels: Q once (int64 labels out); backward: Q once + dQ once;
    forward_backward: forward + backward (Q twice, dQ once); fused_loss: Q once + dQ once."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {OPS}")
    e = _esize(dtype)
    q, params, grads = B * M * P * e, B * N * P * 4 + C * P * 4, B * N * P * 4 + C * P * 4
    rec = 2 * B * M * C * e
    forward = q + params + rec
    backward = q + params + rec + q + grads  # Q in, rec grads in, dQ and parameter grads out
    return {
        "forward": forward,
        "labels": q + B * N * P * 4 + B * M * 8,
        "backward": backward,
        "forward_backward": forward + backward,
        "fused_loss": q + params + B * M * C * e + q + grads,
    }[op]


def _plan(mode, B, M, P, N, C, dtype, spec, relay: bool = False) -> GradPlan:
    return seat_plan.grad_plan(mode, B, M, P, N, C, dtype, spec, interpreter=False, relay=relay)


def op_traffic(
    op: str, B: int, M: int, P: int, N: int, C: int, dtype: torch.dtype, gpu: Union[str, GPUSpec] = "H100",
    *, design: Optional[str] = None, rescale_skipped: bool = True, folded: bool = False, split_bn: bool = False,
    bn_stats: bool = False,
) -> OpTraffic:
    """Launches, bytes, FLOPs and modeled time of one op on one GPU (a name in
    san_fast.gpu_specs.GPUS or a GPUSpec). For fused_loss, `design` (LOSS_DESIGNS)
    overrides the launcher's choice (seat_plan.loss_design); `rescale_skipped=False` counts the
    dQ rescale that runs when the upstream gradients differ from the hint. `folded`: the
    BatchNorm-folded op (Q is then the conv output y, read the same way; the fold adds its
    small operand ops and the logit bias); `split_bn` with it, in training: the split BatchNorm
    backward (grad_launches) of the ops' two-pass paths (fused_loss: design two_pass only).
    `bn_stats` (fused_loss): the folded loss in training, on BatchNorm's batch statistics, as
    san_fast.ops runs it: the two_pass design with the split backward, the one-pass designs
    followed by the statistics' elementwise backward (bn_stats_launch); the design is then the
    one seat_plan.loss_design picks for that case."""
    spec = _spec(gpu)
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {OPS}")
    if bn_stats:
        if op != "fused_loss" or split_bn:
            raise ValueError("bn_stats: the fused_loss op, whose design decides the split (split_bn is implied)")
        design = design or seat_plan.loss_design(B, M, P, N, C, dtype, spec, bn_stats=True)
        folded, split_bn = True, design == "two_pass"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {dtype}")
    if split_bn and not (folded and op in ("backward", "forward_backward", "fused_loss")):
        raise ValueError(f"split_bn: a folded op with a backward, not {op!r} (folded={folded})")
    launches: list = fold_launches(B, N, P, C, dtype, spec, backward=op not in ("forward", "labels")) \
        if folded else []
    used_design = ""
    fwd = dict(folded=folded)
    if op == "forward":
        launches += forward_launches(B, M, P, N, C, dtype, spec, **fwd)
    elif op == "labels":
        launches += forward_launches(B, M, P, N, C, dtype, spec, labels=True, **fwd)
    elif op == "backward":
        launches += grad_launches(_plan(MODE_GRADS, B, M, P, N, C, dtype, spec), dtype, spec, folded, split_bn)
    elif op == "forward_backward":
        launches += forward_launches(B, M, P, N, C, dtype, spec, save_attn=True, **fwd)
        launches += grad_launches(_plan(MODE_GRADS, B, M, P, N, C, dtype, spec), dtype, spec, folded, split_bn)
    else:
        used_design = design or seat_plan.loss_design(B, M, P, N, C, dtype, spec)
        if used_design not in LOSS_DESIGNS:
            raise ValueError(f"design={used_design!r}: expected one of {LOSS_DESIGNS}")
        if used_design != "two_pass" and split_bn:
            raise ValueError(f"split_bn: the {used_design} design has no split backward (the ops use two_pass for it)")
        if used_design != "two_pass":
            plan = _plan(MODE_LOSS_IMAGE, B, M, P, N, C, dtype, spec, relay=used_design == "relay")
            launches += grad_launches(plan, dtype, spec, folded)
            launches += _loss_glue(B, M, C, dtype, spec, fused=True)
            launches.append(rescale_launch(B, M, P, C, dtype, spec, skipped=rescale_skipped))
            if bn_stats:
                launches.append(bn_stats_launch(B, M, P, dtype, spec))
        else:
            launches += forward_launches(B, M, P, N, C, dtype, spec, save_attn=True, **fwd)
            launches += _loss_glue(B, M, C, dtype, spec, fused=False)
            launches += grad_launches(_plan(MODE_GRADS, B, M, P, N, C, dtype, spec), dtype, spec, folded, split_bn)
    by: dict = {}
    for launch in launches:
        for key, value in launch.bytes_by_tensor.items():
            by[key] = by.get(key, 0) + value
    l2 = sum(x.l2_bytes for x in launches)
    return OpTraffic(
        op=op, shape={"B": B, "M": M, "P": P, "N": N, "C": C, "dtype": str(dtype).replace("torch.", "")},
        launches=tuple(launches), bytes_by_tensor=by, total_bytes=sum(by.values()),
        floor_bytes=floor_bytes(op, B, M, P, N, C, dtype), flops=sum(x.flops for x in launches),
        modeled_ms=sum(x.modeled_ms for x in launches), l2_bytes=l2,
        l2_ms=l2 / spec.l2_hit_bytes_per_s * 1e3 if spec.l2_hit_bytes_per_s else 0.0, design=used_design,
    )


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m san_fast.kernels.traffic`: the tables of traffic_report.py."""
    from san_fast.kernels.traffic_report import main as report_main

    return report_main(argv)


if __name__ == "__main__":
    sys.exit(main())

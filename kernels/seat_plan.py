"""How each SEAT launch is shaped: tile sizes, autotune candidates, grid and workspace.

The launchers (seat_forward.py, seat_backward.py, seat_fused_loss.py) and the traffic model
(traffic.py) both build their launches from the functions here, so the bytes the model counts
are those of the launches that run.

The gradient kernel (seat_backward.py) runs a persistent, lockstep grid (K, T):

* P is cut into K ranges of `p_range` columns (a multiple of 16; the tile is `block_p2`, the next
  power of two). CTA (j, c) owns range j, so it holds its dGamma (N x range) and dW (C x range)
  partial sums in registers across every row block it visits: no workspace read-modify-write.
* The row blocks of all images, (b, rb) in order, are cut into T equal contiguous runs
  (stream-K): CTA (j, c) takes run c. The K CTAs of run c visit the same row blocks at the
  same time, so rows they all read (the saved attention; in the fused loss, the whole Q row
  block) come from HBM once and from L2 for the others (traffic.py states the rule).
* A CTA writes its partial sums once per image it touches, to slot c + b of a workspace
  (T + B - 1 slots): runs are contiguous, so (c, b) pairs along them have distinct c + b.
  reduce_slots_kernel sums each image's slots in a fixed order: deterministic, no atomics.

K * T is at most the SM count times ctas_per_sm (two where the bucket's candidates include a
4-warp config, which fits two CTAs per SM; else one: the 8-warp configs run near 255 registers
per thread), or a few exact waves of it where one wave of whole runs would leave SMs idle; T is
the same for every range so that the K CTAs sharing rows stay in step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import torch
import triton
from san_fast.gpu_specs import GPUS, GPUSpec, spec_for_device
from san_fast.kernels import seat_common as common

MODE_GRADS = 0  # gradients of rec_q / rec_t given (plain backward, from the saved attention)
MODE_LOSS_IMAGE = 1  # fused loss, L_con = mean((rec_t - x)^2)
MODE_LOSS_REC_Q = 2  # fused loss, L_con = mean((rec_t - rec_q)^2), rec_q not detached
LOSS_MODES = (MODE_LOSS_IMAGE, MODE_LOSS_REC_Q)

# Forward / labels: (BLOCK_M, BLOCK_P, num_warps, num_stages) per padded-N bucket, autotuned.
# The logits tile BLOCK_M x BLOCK_N stays in registers for the whole P loop, so BLOCK_M
# shrinks as N grows. From offline compiles (compile_report.py): spill-free for bf16 on sm80 and
# sm90 up to N = 128 (at N = 256 on sm90 only), two per bucket to keep GPU test compiles few.
FORWARD_TRIPLES = {
    32: [(64, 64, 4, 3), (64, 128, 8, 4)],  # measured on an H200: 0.22 ms vs 0.24-0.58 before
    64: [(64, 128, 8, 3), (128, 64, 8, 3)],
    128: [(32, 64, 8, 3), (64, 64, 8, 3)],
    256: [(64, 32, 8, 2), (32, 64, 8, 3)],
}
# Gradient kernel tiles the planner chooses among: (BLOCK_M, BLOCK_P2) per padded-N bucket.
# The accumulators (BLOCK_P2 x BLOCK_N and, unless dW rides in dGamma's padding columns
# (GradPlan.packs_w), BLOCK_P2 x 16, fp32) live in registers across the whole persistent loop.
# Chosen from offline compiles (compile_report.py, JIT specialization, triton 3.9 and 3.6): at
# N <= 32 every candidate below compiles without spills for bf16 on sm90 and sm80
# (tests/test_compile_report.py holds it); above N = 64 the least-spilling. At N = 64 the
# backward's 64 x 128 tile runs split (SPLIT_BACKWARD_BLOCK_N), each pass spill-free: whole, it
# spills (32-772 B) but measured 3.1x faster on an H100 than the spill-free 32 x 64 8-warp tile
# (0.95 against 2.96 ms, bench/results/nvidia-h100-2026-11-26/seat_sweep_n64.json): small tiles
# leave the kernel latency-bound.
GRAD_TILES = {
    "backward": {32: [(64, 128)], 64: [(64, 128)], 128: [(32, 64)], 256: [(16, 64)]},
    "loss": {32: [(32, 64)], 64: [(64, 64)], 128: [(64, 64)], 256: [(64, 64)]},
    # The relay design's (its producers' pass over whole rows runs in other CTAs, in a branch of
    # its own). Spill-free at N <= 64 for bf16 and fp16 on sm80 and sm90 with 8 warps
    # (compile_report.py).
    "relay": {32: [(64, 128), (64, 64)], 64: [(32, 64)], 128: [(64, 64), (32, 128), (32, 64)],
              256: [(32, 64), (64, 64)]},
}
# Autotuned at run time (they change no byte the kernel moves): the dQ sub-tile width
# BLOCK_PD, and for the fused loss the pass-1 chunk BLOCK_P; warps, stages.
# Backward, N <= 32, measured on an H200 (bench/seat_sweep.py, bench/results/nvidia-h200-2026-11-26):
# 4 warps with two CTAs per SM 0.82 ms, 8 warps with one 1.20 ms; N = 64 on an H100
# (seat_sweep_n64.json): 4 warps 0.95 ms, 8 warps 1.38 ms.
GRAD_TUNE = {
    "backward": {32: [(64, 4, 2), (64, 8, 2)], 64: [(64, 4, 2), (64, 8, 2)], 128: [(64, 4, 2), (32, 8, 2)],
                 256: [(32, 4, 2), (32, 8, 2)]},
    "loss": {32: [(64, 64, 8, 2)], 64: [(32, 64, 8, 2)],
             128: [(32, 64, 8, 2), (32, 32, 8, 2)], 256: [(32, 32, 8, 2), (32, 64, 8, 2)]},
    # N = 64: only without pipelining (1 stage) is the 32 x 64 tile spill-free on sm80.
    "relay": {32: [(64, 64, 8, 2)], 64: [(64, 64, 8, 1)], 128: [(64, 64, 8, 2)], 256: [(32, 32, 8, 2)]},
}
# The sums pass alone (PASS_SUMS: of the split backward and of the split BatchNorm backward),
# where the backward's 4-warp config spills in it: 4 B on sm90 at N = 64 (triton 3.6; 3.9 without
# the fold), every BLOCK_PD and 1 to 3 stages tried. Its 8 warps are spill-free on sm80 and sm90.
SUMS_PASS_TUNE = {64: [(64, 8, 2)]}
# The fused loss with target x where its accumulators take at most 32 columns (dW packed into
# dGamma's padding, seat_grad_kernel's U_SUMS: N + C <= 32; or BLOCK_N = 16): wide tiles, each
# with its one config (BLOCK_P, BLOCK_PD, warps, stages). At P = 1024 the 32 x 512 tile runs K = 2
# ranges and the 64 x 256 tile K = 4, instead of 16: an eighth (a quarter) of the 32 x 64 tile's
# re-reads of each Q row block through L2; the planner weighs them against it. Spill-free for
# bf16 and fp16 on sm90 and sm80 under triton 3.6 and 3.9 (compile_report.py; the 32 x 512 tile
# as it is planned, WIDE_RANGE with EVEN_P). Not on sm70, where the 64 x 256 tile spills 14 KB.
WIDE_LOSS_TILES = {(32, 512): (32, 32, 8, 1), (64, 256): (64, 32, 8, 1)}
WIDE_LOSS_P2 = {p2: tune for (_, p2), tune in WIDE_LOSS_TILES.items()}
# Ranges at least this wide run seat_grad_kernel's WIDE_RANGE code (step 2 in two halves of the
# row block, dq's sub-tiles in a loop) and are planned only where every range is full
# (EVEN_P, no column masks): with the 512 x 32 accumulators, anything else spilled 4-300 B on
# sm80 or sm90 in every config tried (compile_report.py, triton 3.6 and 3.9).
WIDE_RANGE_P2 = 512
# The fused loss's kernel (its pass over whole Q rows plus the gradient's accumulators) fits in
# 255 registers without spills on sm80 and sm90 only up to this padded N: above it the launcher
# runs two_pass (loss_design); design="fused" still runs it there (kernels/README.md).
FUSED_LOSS_MAX_BLOCK_N = 32
# Under the interpreter every program runs in numpy one after another: large tiles, one config
# (autotuning several configs does not work there).
INTERPRETER_FORWARD = (64, 64, 4, 1)
INTERPRETER_GRAD_TILE = (64, 64)
INTERPRETER_TUNE = {"backward": (64, 4, 1), "loss": (64, 64, 4, 1), "relay": (64, 64, 4, 1)}
INTERPRETER_SMS = 4
REDUCE_BLOCK = 1024
# Problems of at least FILL_ROWS rows get the fastest plan with a CTA per SM wherever there is
# one (issue 8's "grids that fill the GPU"). It was "within 10% of the fastest" until the relay
# design at N = 64: on a V100 (80 SMs) its filling plans model 11-13% slower than 72 CTAs.
FILL_ROWS = 65536
# At most this many exact waves of CTAs in a wave-filling plan (grad_plan_candidates).
MAX_WAVES = 4
# Padded N where the backward from saved attention runs split (GradPlan.split): its sums pass,
# then its dq pass, two launches of the gradient kernel. At BLOCK_N = 64 the whole kernel spills
# in bf16 on sm80 at every tile tried but 32 x 64, 3.1x slower (GRAD_TILES; 64 x 128: 360 B with
# 4 warps, 60 B with 8; 64 x 64 72 B; 32 x 128 44 B; 128 x 64 812 B), and 96 B on sm90 with 4
# warps, while each pass is spill-free on both (the sums pass with its own config,
# SUMS_PASS_TUNE; compile_report.py, triton 3.6 and 3.9). Q is still read
# once (sums pass) and dQ written once (dq pass, which reads no Q); the split re-reads the saved
# attention and the upstream gradients (N + 2C elements a row: 7% of Q's bytes at N = 64,
# P = 1024) and redoes the per-row softmax gradient. The whole kernel with 4 warps, spilling,
# measured 0.95 ms on an H100 at B=16, 128x128, P=1024 (seat_sweep_n64.json); the split is yet
# to meet a GPU (gpu_check's SEAT stage times both at N = 64: bench/seat_measure.py's `whole`
# row; `python -m bench.seat_sweep --shapes n64 --kinds grad` every candidate both ways).
SPLIT_BACKWARD_BLOCK_N = (64,)
# An override of splits_backward for the backward's plans, as SAN_FAST_LOSS_DESIGN overrides the
# loss design: "split" or "whole" everywhere (to measure one against the other, or to run the
# whole kernel where a GPU times it faster), "auto" the rule.
SPLIT_BACKWARD_ENV = "SAN_FAST_SPLIT_BACKWARD"
SPLIT_BACKWARD_CHOICES = {"auto": None, "split": True, "whole": False}


def bucket(bn: int) -> int:
    return max(32, bn)


def _interp(interpreter: Optional[bool]) -> bool:
    return common.interpreting() if interpreter is None else interpreter


def forward_configs(bn: int, interpreter: Optional[bool] = None) -> list:
    triples = [INTERPRETER_FORWARD] if _interp(interpreter) else FORWARD_TRIPLES[bucket(bn)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_P": p}, num_warps=w, num_stages=s) for m, p, w, s in triples]


def grad_kind(mode: int, relay: bool = False) -> str:
    if relay:
        if mode not in LOSS_MODES:
            raise ValueError("the relay design is a fused-loss design: a loss mode expected")
        return "relay"
    return "loss" if mode in LOSS_MODES else "backward"


def relay_producers(k: int, slots: int = 0) -> int:
    """Producer CTAs per run of K gradient CTAs in the relay design. Per row block a producer's
    pass (the logits' and rec_q's dots over all of P) is about half the dots of the K gradient
    CTAs together (dGamma's and dq's), so at least K / 2 producers, each taking every
    producers-th row block, keep pace with them; up to K where that makes a run's CTAs divide
    the resident `slots` (an A100's 108 at K = 16: 11 producers, 4 runs of 27 CTAs)."""
    base = max(1, triton.cdiv(k, 2))
    return next((p for p in range(base, k + 1) if slots and slots % (k + p) == 0), base)


# An SM's register file and a thread's most registers (sm70 to sm90).
SM_REGISTERS = 65536
MAX_THREAD_REGISTERS = 255


def resident_ctas(warps: int, registers: int = MAX_THREAD_REGISTERS) -> int:
    """CTAs of `warps` warps at `registers` per thread that one SM's registers hold."""
    return SM_REGISTERS // (registers * 32 * warps)


def ctas_per_sm(kind: str, bn: int) -> int:
    """Resident CTAs per SM the grid is sized for, at the most registers a thread may take: two
    where a 4-warp candidate can run, else one."""
    return max(resident_ctas(t[-2]) for t in GRAD_TUNE[kind][bucket(bn)])


def dw_rows(mode: int) -> int:
    """dW partials per slot: the whole dW; in the fused loss with target rec_q also its
    rec-loss part. With target x the rec loss alone reaches W, so the kernel sums u^T q and
    the host scales it by h_rec (seat_grad_kernel's U_SUMS)."""
    return 2 if mode == MODE_LOSS_REC_Q else 1


def packs_dw(mode: int, N: int, C: int) -> bool:
    """dW rides in dGamma's padding columns (seat_grad_kernel's PACK_W): where they fit, up
    to BLOCK_N = 64. Above it the compile report showed no gain (N = 100: 220 B of spills
    packed against 132 unpacked with 8 warps on sm90)."""
    return N + dw_rows(mode) * C <= common.block_n(N) <= 64


def wide_loss(mode: int, N: int, C: int) -> bool:
    """Whether the fused loss runs a wide tile (WIDE_LOSS_TILES): target x, with accumulators
    of at most 32 columns (dGamma's BLOCK_N, plus 16 for dW unless it rides in the padding)."""
    extra = 0 if packs_dw(mode, N, C) else common.BLOCK_C
    return mode == MODE_LOSS_IMAGE and common.block_n(N) + extra <= 32


def wide_range(block_m: int, block_p2: int) -> bool:
    """seat_grad_kernel's WIDE_RANGE for a tile (WIDE_RANGE_P2); each half of its step 2 has a
    dot over BLOCK_M / 2 >= 16 rows."""
    return block_p2 >= WIDE_RANGE_P2 and block_m >= 32


def even_ranges(P: int, p_range: int, block_p2: int) -> bool:
    """Every range full and as wide as the tile (seat_grad_kernel's EVEN_P)."""
    return p_range == block_p2 and P % p_range == 0


def grad_tiles(mode: int, N: int, C: int, sm80: bool = True, relay: bool = False) -> list[tuple[int, int]]:
    """(BLOCK_M, BLOCK_P2) tiles the planner chooses among (outside the interpreter); `sm80`:
    the GPU is sm80 or newer (GPUSpec.bf16)."""
    tiles = GRAD_TILES[grad_kind(mode, relay)][bucket(common.block_n(N))]
    if relay:
        return tiles
    # All of them: at small P a wide tile's range is mostly padding, and the model says so.
    return list(WIDE_LOSS_TILES) + tiles if sm80 and wide_loss(mode, N, C) else tiles


def grad_configs(mode: int, bn: int, block_p2: int, interpreter: Optional[bool] = None,
                 relay: bool = False, sums_pass: bool = False) -> list:
    """Autotune candidates of the gradient kernel for a plan's tile (BLOCK_PD <= BLOCK_P2);
    `sums_pass`: of its sums pass alone (PASS_SUMS)."""
    kind = grad_kind(mode, relay)
    if _interp(interpreter):
        tunes = [INTERPRETER_TUNE[kind]]
    elif kind == "loss" and block_p2 in WIDE_LOSS_P2:
        tunes = [WIDE_LOSS_P2[block_p2]]
    elif sums_pass and bucket(bn) in SUMS_PASS_TUNE:
        tunes = SUMS_PASS_TUNE[bucket(bn)]
    else:
        tunes = GRAD_TUNE[kind][bucket(bn)]
    out, seen = [], set()
    for t in tunes:
        *blocks, warps, stages = t
        # MODE_GRADS has no pass over the whole row: its BLOCK_P is a placeholder.
        kw = {"BLOCK_P": blocks[0] if kind != "backward" else 16, "BLOCK_PD": min(blocks[-1], block_p2)}
        key = (tuple(kw.items()), warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


def device_spec(device: torch.device) -> GPUSpec:
    """The GPU the plan is for: the device's own entry on CUDA; under the interpreter an H100
    with a few SMs, so that tests run small grids with every split axis in use."""
    if torch.device(device).type == "cuda":
        return spec_for_device(torch.device(device))
    return dataclasses.replace(GPUS["H100"], name="interpreter", sms=INTERPRETER_SMS)


@dataclasses.dataclass(frozen=True)
class GradPlan:
    """One launch of seat_grad_kernel (and its reduce_slots_kernel), fully determined."""

    mode: int
    B: int
    M: int
    P: int
    N: int
    C: int
    block_m: int
    block_p2: int
    p_range: int
    ctas_per_range: int
    producers: int = 0  # the relay design's producer CTAs per run (seat_grad_kernel's PRODUCERS)
    # MODE_GRADS: two launches, the sums pass then the dq pass (SPLIT_BACKWARD_BLOCK_N)
    split: bool = False

    @property
    def block_n(self) -> int:
        return common.block_n(self.N)

    @property
    def k(self) -> int:
        return triton.cdiv(self.P, self.p_range)

    @property
    def row_blocks(self) -> int:
        return triton.cdiv(self.M, self.block_m)

    @property
    def items(self) -> int:
        """Row blocks of all images: the work of each range."""
        return self.B * self.row_blocks

    @property
    def relay(self) -> bool:
        return self.producers > 0

    @property
    def grid(self) -> tuple[int, int]:
        return (self.k + self.producers, self.ctas_per_range)

    @property
    def ctas(self) -> int:
        return (self.k + self.producers) * self.ctas_per_range

    @property
    def w_rows(self) -> int:
        return dw_rows(self.mode)

    @property
    def packs_w(self) -> bool:
        return packs_dw(self.mode, self.N, self.C)

    @property
    def wide_range(self) -> bool:
        return wide_range(self.block_m, self.block_p2)

    @property
    def even_p(self) -> bool:
        return even_ranges(self.P, self.p_range, self.block_p2)

    @property
    def slots(self) -> int:
        return self.ctas_per_range + self.B - 1

    @property
    def slot_len(self) -> int:
        # S (N x C), then N for the logit bias's gradient (the BatchNorm fold's; unused without).
        return (self.N + self.w_rows * self.C) * self.P + self.N * (self.C + 1)

    def run(self, c: int) -> tuple[int, int]:
        """Items [start, end) of CTA run c (the same formula as the kernel)."""
        return c * self.items // self.ctas_per_range, (c + 1) * self.items // self.ctas_per_range

    def used_slots(self) -> int:
        """Slots some CTA writes: one per (run, image) pair that share a row block."""
        total = 0
        for c in range(self.ctas_per_range):
            start, end = self.run(c)
            total += (end - 1) // self.row_blocks - start // self.row_blocks + 1
        return total


def _p_ranges(p: int, block_p2: int, sms: int, relay_slots: int = 0) -> list[int]:
    """Range widths for a tile: the full tile, and narrower multiples of 16 that make K divide
    the SM count (every SM busy) while still fitting the tile; with `relay_slots` (the relay
    design's resident slots), K and its producers (relay_producers)."""
    widths = {min(block_p2, triton.cdiv(p, 16) * 16)}
    k0 = triton.cdiv(p, block_p2)
    for parts in range(k0 + 1, 2 * k0 + 2):
        width = triton.cdiv(triton.cdiv(p, parts), 16) * 16
        k = triton.cdiv(p, width)
        group = k + (relay_producers(k, relay_slots) if relay_slots else 0)
        if sms % group == 0 and width <= block_p2:
            widths.add(width)
    return sorted(widths, reverse=True)


def grad_plan_candidates(
    mode: int, B: int, M: int, P: int, N: int, C: int, sms: int, *,
    block_m: Optional[int] = None, block_p2: Optional[int] = None, p_range: Optional[int] = None,
    ctas_per_range: Optional[int] = None, interpreter: Optional[bool] = None, sm80: bool = True,
    relay: bool = False, split: Optional[bool] = None,
) -> list[GradPlan]:
    bn = common.block_n(N)
    split = splits_backward(mode, N, sm80) if split is None else split
    if split and mode != MODE_GRADS:
        raise ValueError("split: the backward from saved attention (MODE_GRADS) only")
    if _interp(interpreter):
        tiles = [INTERPRETER_GRAD_TILE]
    else:
        tiles = grad_tiles(mode, N, C, sm80, relay)
    if block_m is not None or block_p2 is not None:
        tiles = [(block_m or bm, block_p2 or p2) for bm, p2 in tiles[:1]]
    resident = sms * ctas_per_sm(grad_kind(mode, relay), bn)
    plans = []
    for bm, p2 in tiles:
        if p_range is not None and block_p2 is None:
            p2 = max(16, triton.next_power_of_2(p_range))
        widths = [p_range] if p_range is not None else _p_ranges(P, p2, sms, resident if relay else 0)
        if wide_range(bm, p2) and block_p2 is None:  # planned only where every range is full
            widths = [w for w in widths if even_ranges(P, w, p2)]
        for width in widths:
            k = triton.cdiv(P, width)
            producers = relay_producers(k, resident) if relay else 0
            items = B * triton.cdiv(M, bm)
            if ctas_per_range is not None:
                runs = [ctas_per_range]
            else:
                # A CTA per resident slot, or (small problems, where each CTA's partial sums
                # would outweigh its rows) halvings of it.
                runs = [max(1, resident // (k + producers))]
                while runs[-1] > 1:
                    runs.append(runs[-1] // 2)
                # Where one wave of whole runs leaves SMs without a CTA (K not dividing the
                # resident slots: an A100's 108 SMs with one CTA per SM, where no range width
                # that is a multiple of 16 gives such a K), K*T = lcm(K, slots) fills every SM
                # in a few exact waves.
                # (The relay design's CTAs wait only on CTAs that started before them: any
                # number of waves is safe.)
                group = k + producers
                shared = math.gcd(group, resident)
                if runs[0] * group < sms and 1 < group // shared <= MAX_WAVES and resident // shared <= items:
                    runs.append(resident // shared)
            for t in sorted({max(1, min(t, items)) for t in runs}, reverse=True):
                plans.append(GradPlan(mode, B, M, P, N, C, bm, p2, width, t, producers, split))
    return plans


def grad_plan(
    mode: int, B: int, M: int, P: int, N: int, C: int, dtype: torch.dtype, spec: GPUSpec, *,
    block_m: Optional[int] = None, block_p2: Optional[int] = None, p_range: Optional[int] = None,
    ctas_per_range: Optional[int] = None, interpreter: Optional[bool] = None, relay: bool = False,
    split: Optional[bool] = None,
) -> GradPlan:
    """The plan with the least modeled time (traffic.py); among those within 1% of it, the one
    with the most CTAs, then the fewest HBM bytes. The keyword arguments pin a tile, a range
    width or T (tests do); `relay` plans the fused loss's relay design; `split` (MODE_GRADS)
    overrides splits_backward, and so does the environment's SAN_FAST_SPLIT_BACKWARD where it
    is not given."""
    if split is None and mode == MODE_GRADS:
        forced = os.environ.get(SPLIT_BACKWARD_ENV, "auto")
        if forced not in SPLIT_BACKWARD_CHOICES:
            raise ValueError(f"{SPLIT_BACKWARD_ENV}={forced!r}: expected one of {tuple(SPLIT_BACKWARD_CHOICES)}")
        split = SPLIT_BACKWARD_CHOICES[forced]
    return _grad_plan(mode, B, M, P, N, C, dtype, spec, block_m, block_p2, p_range, ctas_per_range,
                      _interp(interpreter), relay, split)


@functools.lru_cache(maxsize=256)
def _grad_plan(mode, B, M, P, N, C, dtype, spec, block_m, block_p2, p_range, ctas_per_range, interpreter,
               relay, split) -> GradPlan:
    from san_fast.kernels import traffic

    plans = grad_plan_candidates(mode, B, M, P, N, C, spec.sms, block_m=block_m, block_p2=block_p2,
                                 p_range=p_range, ctas_per_range=ctas_per_range, interpreter=interpreter,
                                 sm80=spec.bf16, relay=relay, split=split)
    if len(plans) == 1:
        return plans[0]
    scored = []
    for plan in plans:
        launches = traffic.grad_launches(plan, dtype, spec)
        scored.append((sum(x.modeled_ms for x in launches), sum(x.total_bytes for x in launches), plan))
    best = min(ms for ms, _, _ in scored)
    # A grid that leaves SMs idle wastes them in a way the model cannot see (each CTA's share of
    # the HBM bandwidth is not the whole chip's): on problems of at least 65,536 rows take a
    # plan with a CTA per SM where there is one.
    if B * M >= FILL_ROWS:
        filling = [s for s in scored if s[2].ctas >= spec.sms]
        if filling:
            scored = filling
            best = min(ms for ms, _, _ in scored)
    # Within 1% of the fastest, fill more SMs (ranges of K | SMs columns), counting a wave at
    # most (a second wave fills nothing more); then fewer bytes.
    near = [s for s in scored if s[0] <= 1.01 * best]
    slots = spec.sms * ctas_per_sm(grad_kind(mode, relay), common.block_n(N))
    return min(near, key=lambda s: (-min(s[2].ctas, slots), s[1], s[2].k))[-1]


def splits_backward(mode: int, N: int, sm80: bool = True) -> bool:
    """Whether the backward from saved attention runs split at this N (SPLIT_BACKWARD_BLOCK_N)
    on this GPU: sm80 or newer (GPUSpec.bf16), where the spills were. On a V100 the one pass
    stays: its 6 MB L2 does not hold the rows the K CTAs of a run share, so the dq pass would
    re-read them from HBM (1.58x the floor modeled at N = 64, against 1.30x in one pass)."""
    return mode == MODE_GRADS and sm80 and common.block_n(N) in SPLIT_BACKWARD_BLOCK_N


def fused_loss_fits(N: int) -> bool:
    """Whether the fused loss's kernel runs spill-free at this N (FUSED_LOSS_MAX_BLOCK_N); where
    it does not, the launcher never picks it."""
    return common.block_n(N) <= FUSED_LOSS_MAX_BLOCK_N


@functools.lru_cache(maxsize=256)
def loss_design(B: int, M: int, P: int, N: int, C: int, dtype: torch.dtype, spec: GPUSpec,
                bn_stats: bool = False) -> str:
    """The fused loss's design the traffic model says is fastest: 'fused' (one pass, every
    CTA of a run computing the forward of its rows; only where that kernel runs spill-free,
    N up to FUSED_LOSS_MAX_BLOCK_N), 'relay' (one pass, producer CTAs computing the forward and
    handing it to the gradient CTAs) or 'two_pass' (forward saving the attention, then the
    exact backward). Ties go to the earlier of that order.

    `bn_stats`: the BatchNorm-folded loss in training (on the batch statistics), where two_pass
    carries BatchNorm's statistics' backward in its dq pass (seat_bn_split.py) and the one-pass
    designs leave it to an elementwise pass over Q-sized tensors (traffic.op_traffic's bn_stats):
    at the paper shape that pass costs more than the one-pass designs save."""
    from san_fast.kernels import traffic

    designs = ("fused", "relay", "two_pass") if fused_loss_fits(N) else ("relay", "two_pass")
    ms = {d: traffic.op_traffic("fused_loss", B, M, P, N, C, dtype, gpu=spec, design=d, bn_stats=bn_stats).modeled_ms
          for d in designs}
    return min(designs, key=lambda d: (ms[d], designs.index(d)))

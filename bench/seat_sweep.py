"""Measured tile sweep of the SEAT kernels on a GPU: every (tile, warps, stages, grid) candidate
timed at one shape, beside what the traffic model says, so the planner's tables
(kernels/seat_plan.py: FORWARD_TRIPLES, GRAD_TILES, GRAD_TUNE) come from measurements.

    python -m bench.seat_sweep [--shapes paper,n64] [--budget S] [--json PATH] [--kinds caps,grad,loss]

Per gradient candidate: BLOCK_M x BLOCK_P2 tile, P range = BLOCK_P2 (K ranges), T runs per
range (one CTA per SM, and 2x, 4x that), num_warps and num_stages (and with --kinds caps, a
register cap per thread with the grid sized for the CTAs it lets share an SM); the row-block iterations
each CTA runs and the microseconds per iteration, which is what the traffic model does not
see (a CTA per SM runs its row blocks one after another). Forward candidates likewise. With
--kinds loss, the fused loss's three designs (target x) at one shape: the two-pass design once
(kind loss_two_pass), the relay design over its tiles and configs (loss_relay: seat_plan's
relay tables, each tile with the plan the planner makes for it, producers included), then the
fused design over LOSS_TILES and LOSS_CONFIGS (loss: BLOCK_P, BLOCK_PD, warps, stages); which
the launcher runs (seat_plan.loss_design) rests on the model's assumed L2 rate until this
measures it. GPU only: the interpreter's timings mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import triton

from bench.runner import error_line
from bench.seat_measure import PAPER, make_inputs, sweep_shapes
from bench.timing import step_ms, time_ms
from san_fast.io_utils import atomic_write_json
from san_fast.kernels import seat_common as common
from san_fast.kernels import seat_plan, traffic
from san_fast.kernels.seat_backward import launch_grad
from san_fast.kernels.seat_forward import seat_forward
from san_fast.kernels.seat_fused_loss import seat_fused_loss
from san_fast.kernels.seat_reference import as_matrix, as_rows

DEVICE = torch.device("cuda")
GRAD_TILES = [(64, 128), (32, 128), (128, 64), (64, 64), (32, 64), (16, 128), (16, 64), (128, 32)]
WARPS_STAGES = [(8, 2), (4, 2), (8, 3), (4, 3)]
# Register caps to try on 4-warp tiles (BLOCK_M, BLOCK_P2, maxnreg): offline compiles
# (`python -m san_fast.kernels.compile_report --try M=64,P2=64,PD=64,w=4,s=2,r=168`, N = 27, bf16)
# put 64 x 64 at 168 registers without spills on sm90 (three CTAs per SM; 92 B on sm80), and at
# 128 (four per SM) the split BatchNorm backward's dq pass fits every tile tried on sm90.
REG_CAPS = [(64, 64, 168), (64, 64, 128), (64, 128, 168), (32, 128, 168), (32, 64, 128)]
# The fused loss: (BLOCK_M, BLOCK_P2) tiles and (BLOCK_P, BLOCK_PD, warps, stages) configs.
# The planner runs 32 x 512 with (32, 32, 8, 1) where every 512-wide range is full (P = 1024),
# else 64 x 256 with (64, 32, 8, 1) (seat_plan.WIDE_LOSS_TILES; spill-free on sm80 and sm90);
# the others spill a little (4-476 B per thread offline) or re-read each Q row block more often.
LOSS_TILES = [(64, 256), (32, 512), (64, 128), (32, 256), (32, 64), (16, 512)]
LOSS_CONFIGS = [(64, 32, 8, 1), (64, 64, 8, 2), (32, 32, 8, 1), (64, 16, 8, 1)]
FORWARD = [(128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4),
           (256, 64, 8, 3), (64, 64, 4, 4), (32, 128, 4, 3), (128, 32, 4, 4), (64, 128, 8, 4)]


def _time(fn) -> float:
    return time_ms(fn, DEVICE, warmup_ms=5, rep_ms=25)["ms"]


def _operands(shape):
    """(q rows, gamma, W, bias) detached, the target image's rows (B,M,C), and the gradients of
    rec_q, rec_t."""
    q4, gamma, weight, bias, x, grads = make_inputs(shape, DEVICE)
    return as_rows(q4.detach()), gamma.detach(), as_matrix(weight.detach()), bias.detach(), as_rows(x), grads


def _grad_row(shape, ops, spec, chosen, tuned, bm, p2, t, warps, stages, maxnreg=None, split=False) -> dict:
    """One gradient candidate timed: BLOCK_M x BLOCK_P2 tile, T runs per P range, warps,
    stages and, when given, a register cap per thread (triton's maxnreg); `split`: as the sums
    pass and the dq pass (seat_plan.SPLIT_BACKWARD_BLOCK_N), both with that config."""
    q, gamma, w, bias, attn, (g1, g2) = ops
    k = triton.cdiv(shape.P, p2)
    plan = seat_plan.GradPlan(seat_plan.MODE_GRADS, shape.B, shape.M, shape.P, shape.N, shape.C, bm, p2, p2, t,
                              split=split)
    cfg = triton.Config({"BLOCK_P": 16, "BLOCK_PD": min(64, p2)}, num_warps=warps, num_stages=stages,
                        maxnreg=maxnreg)
    iters = triton.cdiv(shape.B * triton.cdiv(shape.M, bm), t)
    row = {"kind": "grad", "block_m": bm, "block_p2": p2, "k": k, "t": t, "warps": warps, "stages": stages,
           "maxnreg": maxnreg, "split": split, "ctas": k * t, "iters_per_cta": iters}
    try:
        def run():
            return launch_grad(seat_plan.MODE_GRADS, q, gamma, w, bias, attn=attn, grad_rec_q=g1, grad_rec_t=g2,
                               plan=plan, config=cfg)
        run()
        row["ms"] = _time(run)
        row["us_per_iter"] = 1e3 * row["ms"] / row["iters_per_cta"]
        row["modeled_ms"] = sum(x.modeled_ms for x in traffic.grad_launches(plan, q.dtype, spec))
    except Exception as exc:  # a tile that does not compile here is a row, not a stop
        row["error"] = error_line(exc)
    row["chosen_now"] = plan == chosen and (warps, stages) in tuned and maxnreg is None
    print(json.dumps(row), flush=True)
    return row


def _grad_setup(shape):
    """The operands with the forward's saved attention, the device spec and the planner's choice."""
    q, gamma, w, bias, _, grads = _operands(shape)
    _, _, attn = seat_forward(q, gamma, w, bias, save_attn=True)
    spec = seat_plan.device_spec(q.device)
    chosen = seat_plan.grad_plan(seat_plan.MODE_GRADS, shape.B, shape.M, shape.P, shape.N, shape.C, q.dtype, spec)
    return (q, gamma, w, bias, attn, grads), spec, chosen


def _tuned(shape, p2) -> list:
    return [(c.num_warps, c.num_stages) for c in seat_plan.grad_configs(seat_plan.MODE_GRADS,
                                                                        common.block_n(shape.N), p2)]


def sweep_grad(shape, deadline: float, rows: list) -> None:
    ops, spec, chosen = _grad_setup(shape)
    # Where the planner splits the backward, each candidate split and whole: what the split costs.
    splits = (True, False) if chosen.split else (False,)
    # The planner's own tile first: a short budget measures it against its warps and grids.
    for bm, p2 in sorted(GRAD_TILES, key=lambda tile: tile != (chosen.block_m, chosen.block_p2)):
        base = max(1, spec.sms // triton.cdiv(shape.P, p2))
        tuned = _tuned(shape, p2)
        for warps, stages in WARPS_STAGES:
            for t in sorted({base, 2 * base, 4 * base}):
                for split in splits:
                    if time.monotonic() > deadline:
                        return
                    rows.append(_grad_row(shape, ops, spec, chosen, tuned, bm, p2, t, warps, stages, split=split))


def sweep_caps(shape, deadline: float, rows: list) -> None:
    """Register-capped 4-warp tiles (REG_CAPS) against the same tiles uncapped: a cap of R
    registers lets more CTAs share an SM (seat_plan.resident_ctas), and the grid gets that many
    per SM, so more of the kernel's latency is hidden, at the price of what the cap spills."""
    ops, spec, chosen = _grad_setup(shape)
    uncapped: set = set()  # tiles measured without a cap already
    for bm, p2, cap in REG_CAPS:
        base = max(1, spec.sms // triton.cdiv(shape.P, p2))
        tuned = _tuned(shape, p2)
        for maxnreg in ((cap,) if (bm, p2) in uncapped else (None, cap)):
            if time.monotonic() > deadline:
                return
            resident = seat_plan.resident_ctas(4, maxnreg or seat_plan.MAX_THREAD_REGISTERS)
            rows.append(_grad_row(shape, ops, spec, chosen, tuned, bm, p2, resident * base, 4, 2, maxnreg))
        uncapped.add((bm, p2))


def _loss_row(shape, ops, x, spec, chosen, bm, p2, t, cfg) -> dict:
    """One fused-loss candidate timed (target x, hints (1, 1)); ops = (q rows, gamma, W, bias)."""
    block_p, block_pd, warps, stages = cfg
    plan = seat_plan.GradPlan(seat_plan.MODE_LOSS_IMAGE, shape.B, shape.M, shape.P, shape.N, shape.C, bm, p2,
                              min(p2, triton.cdiv(shape.P, 16) * 16), t)
    config = triton.Config({"BLOCK_P": block_p, "BLOCK_PD": min(block_pd, p2)}, num_warps=warps,
                           num_stages=stages)
    row = {"kind": "loss", "block_m": bm, "block_p2": p2, "k": plan.k, "t": t, "block_p": block_p,
           "block_pd": block_pd, "warps": warps, "stages": stages, "ctas": plan.ctas,
           "iters_per_cta": triton.cdiv(plan.items, t)}
    _time_fused(row, ops, x, spec, plan, config)
    tuned = [_config_key(c) for c in seat_plan.grad_configs(plan.mode, plan.block_n, p2)]
    row["chosen_now"] = plan == chosen and (block_p, min(block_pd, p2), warps, stages) in tuned
    print(json.dumps(row), flush=True)
    return row


def _config_key(config) -> tuple:
    return config.kwargs["BLOCK_P"], config.kwargs["BLOCK_PD"], config.num_warps, config.num_stages


def _time_fused(row: dict, ops, x, spec, plan, config) -> None:
    """Fills `row` with seat_fused_loss's time as `plan` and `config` run it (ms, us per row
    block of a gradient CTA, the model's ms), or with why it could not run."""
    try:
        def run():
            return seat_fused_loss(*ops, x, False, 1.0, 1.0, plan=plan, config=config)
        run()
        row["ms"] = _time(run)
        row["us_per_iter"] = 1e3 * row["ms"] / row["iters_per_cta"]
        row["modeled_ms"] = sum(launch.modeled_ms for launch in traffic.grad_launches(plan, ops[0].dtype, spec))
    except Exception as exc:  # a candidate that does not compile here is a row, not a stop
        row["error"] = error_line(exc)


def _relay_row(ops, x, spec, chosen, plan, config) -> dict:
    """One relay-design candidate timed (target x, hints (1, 1)): the plan's K gradient CTAs
    and its producers per run, T runs."""
    block_p, block_pd, warps, stages = _config_key(config)
    t = plan.ctas_per_range
    row = {"kind": "loss_relay", "block_m": plan.block_m, "block_p2": plan.block_p2, "k": plan.k,
           "producers": plan.producers, "t": t, "block_p": block_p, "block_pd": block_pd, "warps": warps,
           "stages": stages, "ctas": plan.ctas, "iters_per_cta": triton.cdiv(plan.items, t)}
    _time_fused(row, ops, x, spec, plan, config)
    tuned = [_config_key(c) for c in seat_plan.grad_configs(plan.mode, plan.block_n, plan.block_p2, relay=True)]
    row["chosen_now"] = plan == chosen and _config_key(config) in tuned
    print(json.dumps(row), flush=True)
    return row


def _two_pass_row(shape, ops, grads, spec) -> dict:
    """The launcher's other design at the same shape: the forward saving the attention, then the
    gradient kernel from it (the losses' own small ops aside), as planned and autotuned."""
    g1, g2 = grads
    row = {"kind": "loss_two_pass"}
    try:
        def run():
            _, _, attn = seat_forward(*ops, save_attn=True)
            return launch_grad(seat_plan.MODE_GRADS, *ops, attn=attn, grad_rec_q=g1, grad_rec_t=g2)
        run()
        row["ms"] = _time(run)
        row["modeled_ms"] = traffic.op_traffic("fused_loss", shape.B, shape.M, shape.P, shape.N, shape.C,
                                               shape.dtype, gpu=spec, design="two_pass").modeled_ms
    except Exception as exc:
        row["error"] = error_line(exc)
    print(json.dumps(row), flush=True)
    return row


def relay_plans(shape, spec) -> tuple:
    """(the planner's relay plan, the plans sweep_relay times)."""
    dims = (seat_plan.MODE_LOSS_IMAGE, shape.B, shape.M, shape.P, shape.N, shape.C, shape.dtype, spec)
    chosen = seat_plan.grad_plan(*dims, relay=True)
    tiles = seat_plan.grad_tiles(seat_plan.MODE_LOSS_IMAGE, shape.N, shape.C, spec.bf16, relay=True)
    plans = [seat_plan.grad_plan(*dims, block_m=bm, block_p2=p2, interpreter=False, relay=True)
             for bm, p2 in sorted(tiles, key=lambda tile: tile != (chosen.block_m, chosen.block_p2))]
    slots = spec.sms * seat_plan.ctas_per_sm("relay", chosen.block_n)
    if chosen.producers < chosen.k:
        plans.append(dataclasses.replace(chosen, producers=chosen.k, ctas_per_range=max(1, slots // (2 * chosen.k))))
    return chosen, plans


def sweep_relay(shape, ops, x, spec, deadline: float, rows: list) -> None:
    """The relay design's tiles and configs as planned for a GPU (seat_plan's relay tables, a
    handful), the planner's tile first, each tile with the range width, T and producers the
    planner gives it; then the planner's plan with K producers per run instead of K / 2. The
    producers alone read Q from HBM, on a third of the SMs: whether that many SMs keep enough
    loads in flight to stream at the HBM rate is what the model (counting bytes, not loads in
    flight) cannot say."""
    chosen, plans = relay_plans(shape, spec)
    for plan in plans:
        for config in seat_plan.grad_configs(plan.mode, plan.block_n, plan.block_p2, interpreter=False, relay=True):
            if time.monotonic() > deadline:
                return
            rows.append(_relay_row(ops, x, spec, chosen, plan, config))


def sweep_loss(shape, deadline: float, rows: list) -> None:
    """The two-pass design once, the relay design's candidates (sweep_relay), then the fused
    loss's tiles and configs (LOSS_TILES, LOSS_CONFIGS), the planner's tile first, with one CTA
    per SM and twice that. The relay rows come before the fused ones, which a short budget may
    not get through: they are few, and the model's pick at most shapes."""
    *ops, x, grads = _operands(shape)
    spec = seat_plan.device_spec(x.device)
    chosen = seat_plan.grad_plan(seat_plan.MODE_LOSS_IMAGE, shape.B, shape.M, shape.P, shape.N, shape.C,
                                 shape.dtype, spec)
    rows.append(_two_pass_row(shape, ops, grads, spec))
    sweep_relay(shape, ops, x, spec, deadline, rows)
    for bm, p2 in sorted(LOSS_TILES, key=lambda tile: tile != (chosen.block_m, chosen.block_p2)):
        base = max(1, spec.sms // triton.cdiv(shape.P, p2))
        # The planner's config for a tile first, as its tile comes first.
        for cfg in sorted(LOSS_CONFIGS, key=lambda c: c != seat_plan.WIDE_LOSS_TILES.get((bm, p2))):
            for t in (base, 2 * base):
                if time.monotonic() > deadline:
                    return
                rows.append(_loss_row(shape, ops, x, spec, chosen, bm, p2, t, cfg))


def sweep_forward(shape, deadline: float, rows: list) -> None:
    q, gamma, w, bias, _, _ = _operands(shape)
    for bm, bp, warps, stages in FORWARD:
        if time.monotonic() > deadline:
            return
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_P": bp}, num_warps=warps, num_stages=stages)
        row = {"kind": "forward", "block_m": bm, "block_p": bp, "warps": warps, "stages": stages}
        for save in (False, True):
            try:
                def run():
                    return seat_forward(q, gamma, w, bias, save_attn=save, config=cfg)
                run()
                row["ms_save_attn" if save else "ms"] = _time(run)
            except Exception as exc:
                row["error"] = error_line(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)


def profile_op(shape) -> None:
    """Kernel times of the op's forward + backward as the model calls it (torch.profiler)."""
    from san_fast import ops

    q, gamma, weight, bias, _, (g1, g2) = make_inputs(shape, DEVICE)

    def step():
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton")
        torch.autograd.backward((rec_q, rec_t), (g1, g2))

    for _ in range(3):
        step()
    host_ms, wall_ms = step_ms(step, DEVICE, 10)
    print(f"[profile] host issue {host_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step (no L2 flush)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="paper")
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--json", default=None)
    p.add_argument("--kinds", default="profile,grad,forward",
                   help="comma-separated: profile, grad, forward, caps (register-capped tiles, REG_CAPS), "
                   "loss (the fused loss's designs: two_pass once, the relay and fused designs' tiles "
                   "and configs)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("seat_sweep: needs a CUDA GPU (interpreter timings mean nothing)")
        return 2
    shapes = {"paper": PAPER, **sweep_shapes()}
    names = args.shapes.split(",")
    start = time.monotonic()
    out = {"gpu": torch.cuda.get_device_name(), "rows": {}}
    kinds = args.kinds.split(",")
    for i, name in enumerate(names):
        share = (args.budget - (time.monotonic() - start)) / (len(names) - i)
        deadline = time.monotonic() + share
        rows: list = []
        out["rows"][name] = rows
        if "profile" in kinds:
            profile_op(shapes[name])
        if "caps" in kinds:
            sweep_caps(shapes[name], deadline, rows)
        if "loss" in kinds:
            sweep_loss(shapes[name], deadline - (0.5 * share if "grad" in kinds else 0), rows)
        if "grad" in kinds:
            sweep_grad(shapes[name], deadline - (0.3 * share if "forward" in kinds else 0), rows)
        if "forward" in kinds:
            sweep_forward(shapes[name], deadline, rows)
        if args.json:
            atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SEAT + reconstruction, measured: the fused Triton op against PyTorch ways of computing the same
thing, speed and memory, against the traffic model and the floor (issue 8, line 6).

Variants: `triton` (san_fast.ops, impl="triton"; in mode `loss` the design the launcher picks,
seat_plan.loss_design, which the traffic model makes relay at most shapes, the paper shape
included), `eager` (the plain PyTorch reference), `fused` and `relay` (paper and tiny shapes,
mode `loss`, and `relay` in mode `bnloss`: impl="triton" with design="fused", the one-pass fused loss, or design="relay",
whose producer CTAs hand the forward to the gradient CTAs, whatever the launcher would pick
there: the model's choice among the designs rests on an assumed L2 rate that these rows, beside
bench/seat_sweep.py's two-pass row, measure), `whole` (mode `fwdbwd` at the sweep shapes where
the planner splits the backward, N = 64: the Triton op with the whole gradient kernel instead,
SAN_FAST_SPLIT_BACKWARD=whole, beside the `triton` row's split), `compiled` (torch.compile of
the reference; GPU only), `sdpa` (Theta through
F.scaled_dot_product_attention with gamma as key and value, then the 1x1 conv as a linear).
Modes: `fwd`, `fwdbwd` (forward + backward of both reconstructions), `loss` (L_rec + L_con and
their backward; Triton's fused-loss kernel against the reference losses), `labels` (argmax),
`bnloss` (paper and tiny shapes: the loss on Q = BatchNorm(q) in training mode, gradients of q
through the batch statistics included: `triton` the split BatchNorm backward,
kernels/seat_bn_split.py, the design the launcher picks there at the paper shape; `relay` the
relay design with the statistics' backward as its own elementwise pass, which the model prices
slower (seat_plan.loss_design's bn_stats); `fold` the fold's autograd path on (scale, shift),
whose backward ends in an elementwise pass over q and dq; `eager` torch's batch_norm, then the reference), `moments` (paper and tiny
shapes: BatchNorm's per-channel statistics of q, as the fold takes them each step: `triton`
kernels/channel_moments.py, `stats` torch.batch_norm_stats (CUDA only), `eager` var_mean in fp32).

Per case: device time (san_fast's bench.timing: CUDA events, L2 flushed before each run), the
GPU's own work (torch.profiler) and the time of the case captured as a CUDA graph and replayed
(what the host's launches cost, they no longer do: --compile's CUDA graphs run the op so); the
floor (san_fast.kernels.traffic.floor_bytes: forward one read of Q; forward+backward two reads
of Q and one write of dQ; fused loss one read and one write) and, for the Triton variants, the
bytes the traffic model says its launches move; GB/s over each and the floor's GB/s as a
fraction of the measured copy bandwidth; the peak memory the op allocates beyond its inputs
and the dQ it must return, as a fraction of Q. Targets (H100, paper shape) beside those rows.

`python -m bench.seat_measure --json PATH --budget S` runs the paper shape first, then the
sweeps while the budget lasts; `--dry-run` one tiny fp32 shape (CPU: Triton's interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
from dataclasses import dataclass, replace
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F

from bench.runner import StageReport, error_line
from bench.timing import copy_bandwidth, extra_peak_bytes, graph_ms, kernel_ms, time_ms
from san_fast import ops

# Targets at the paper shape on an H100 (issue 8): milliseconds per mode, extra memory vs Q.
TARGET_MS = {"fwd": 0.23, "fwdbwd": 0.67, "loss": 0.45}
TARGET_EXTRA_OF_Q = 0.05
HOST_BOUND = 0.8  # GPU work under this share of the event time: the host sets the pace
TRAFFIC_OP = {"fwd": "forward", "fwdbwd": "forward_backward", "loss": "fused_loss", "labels": "labels",
              "bnloss": "fused_loss", "moments": None}
MODES = ("fwd", "fwdbwd", "loss", "labels", "bnloss", "moments")
VARIANTS = ("triton", "fused", "relay", "whole", "eager", "compiled", "sdpa", "fold", "stats")
# the project's kernels: modeled bytes, targets, autotuned configs
TRITON_VARIANTS = ("triton", "fused", "relay", "whole")
FORCED_DESIGNS = ("fused", "relay")  # variants that run the fused loss's design of their name
BN_EPS = 1e-5


@dataclass(frozen=True)
class Shape:
    B: int
    M: int
    P: int
    N: int
    C: int
    dtype: torch.dtype

    def q_bytes(self) -> int:
        return self.B * self.M * self.P * torch.finfo(self.dtype).bits // 8

    def as_dict(self) -> dict:
        return {"B": self.B, "M": self.M, "P": self.P, "N": self.N, "C": self.C, "dtype": str(self.dtype)}


PAPER = Shape(16, 128 * 128, 1024, 27, 3, torch.bfloat16)
TINY = Shape(1, 16 * 16, 64, 6, 3, torch.float32)


def sweep_shapes() -> dict[str, Shape]:
    """Issue 8's sweep: N in {6, 64, 100, 256}, HW from 32x32 to 256x256, B from 1 to 64."""
    shapes = {f"n{n}": replace(PAPER, N=n) for n in (6, 64, 100, 256)}
    shapes.update({f"hw{s}x{s}": replace(PAPER, M=s * s) for s in (32, 64, 256)})
    shapes.update({f"b{b}": replace(PAPER, B=b) for b in (1, 64)})
    return shapes


def cases(shape_name: str, device: torch.device) -> list[tuple[str, str]]:
    """(variant, mode) pairs: every variant at the paper (or tiny) shape, Triton and eager in
    sweeps; torch.compile's cases (tens of seconds each to compile) last."""
    ops_modes = ("fwd", "fwdbwd", "loss")
    if shape_name not in ("paper", "tiny"):
        out = [(v, m) for v in ("triton", "eager") for m in ops_modes]
        if _splits_backward(shape_name, device):  # the planner's split beside the whole kernel
            out.insert(out.index(("triton", "fwdbwd")) + 1, ("whole", "fwdbwd"))
        return out
    out = [(v, m) for v in ("triton", "eager", "sdpa") for m in ops_modes if (v, m) != ("sdpa", "loss")]
    at = out.index(("triton", "loss")) + 1
    out[at:at] = [(design, "loss") for design in FORCED_DESIGNS]
    out += [(v, "labels") for v in ("triton", "eager")]
    out += [(v, "bnloss") for v in ("triton", "relay", "fold", "eager")]
    out += [(v, "moments") for v in ("triton", "stats", "eager") if v != "stats" or device.type == "cuda"]
    if device.type == "cuda":
        out += [("compiled", m) for m in ops_modes]
    return out


def _splits_backward(shape_name: str, device: torch.device) -> bool:
    """Whether the planner splits the backward at this sweep shape on this device."""
    try:
        from san_fast.kernels import seat_plan
    except ImportError:  # no triton: no Triton rows either
        return False
    shape = sweep_shapes().get(shape_name)
    return (shape is not None and seat_plan.splits_backward(seat_plan.MODE_GRADS, shape.N)
            and seat_plan.device_spec(device).bf16)


def whole_backward():
    """The `whole` variant's context: the backward's plans without the split (SAN_FAST_SPLIT_BACKWARD)."""
    from san_fast.kernels import seat_plan

    return mock.patch.dict(os.environ, {seat_plan.SPLIT_BACKWARD_ENV: "whole"})


def make_inputs(s: Shape, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    side = int(s.M ** 0.5)
    q = torch.randn(s.B, s.P, side, side, device=device, generator=gen).to(s.dtype)
    q = q.contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.randn(s.B, s.N, s.P, device=device, generator=gen).requires_grad_()
    weight = (torch.randn(s.C, s.P, 1, 1, device=device, generator=gen) / s.P ** 0.5).requires_grad_()
    bias = torch.randn(s.C, device=device, generator=gen).requires_grad_()
    x = torch.randn(s.B, s.C, side, side, device=device, generator=gen).to(s.dtype)
    grads = tuple(torch.randn(s.B, s.M, s.C, device=device, generator=gen).to(s.dtype) for _ in range(2))
    return q, gamma, weight, bias, x, grads


def sdpa_reconstruct(q, gamma, weight, bias):
    rows = q.flatten(2).transpose(1, 2)
    g = gamma.to(rows.dtype).unsqueeze(1)
    theta = F.scaled_dot_product_attention(rows.unsqueeze(1), g, g).squeeze(1)
    w = weight.flatten(1).to(rows.dtype)
    b = bias.to(rows.dtype)
    return F.linear(rows, w, b), F.linear(theta, w, b)


@functools.cache
def _compiled(fn):
    return torch.compile(fn)


def reconstruct_fn(variant: str):
    if variant in ("triton", "whole"):
        return functools.partial(ops.seat_reconstruct, impl="triton")
    if variant == "compiled":
        return _compiled(ops.seat_reconstruct_reference)
    return {"eager": ops.seat_reconstruct_reference, "sdpa": sdpa_reconstruct}[variant]


def loss_fn(variant: str):
    if variant == "triton":
        return functools.partial(ops.seat_reconstruct_loss, impl="triton")
    if variant in FORCED_DESIGNS:
        return functools.partial(ops.seat_reconstruct_loss, impl="triton", design=variant)
    if variant == "compiled":
        return _compiled(ops.seat_reconstruct_loss_reference)
    return {"eager": ops.seat_reconstruct_loss_reference}[variant]


def labels_fn(variant: str):
    return functools.partial(ops.seat_labels, impl="triton") if variant == "triton" else ops.seat_labels_reference


def build(variant: str, mode: str, inputs):
    """A no-argument callable running one case; it returns its outputs (kept alive for the
    memory measurement). The `whole` variant runs the Triton op's backward without the split."""
    run = _build(variant, mode, inputs)
    if variant != "whole":
        return run

    def whole():
        with whole_backward():
            return run()
    return whole


def _build(variant: str, mode: str, inputs):
    q, gamma, weight, bias, x, grads = inputs
    params = (q, gamma, weight, bias)
    if mode == "fwd":
        op = reconstruct_fn(variant)

        def run():
            with torch.no_grad():
                return op(q, gamma, weight, bias)
    elif mode == "fwdbwd":
        op = reconstruct_fn(variant)

        def run():
            return torch.autograd.grad(op(q, gamma, weight, bias), params, grads)
    elif mode == "loss":
        op = loss_fn(variant)

        def run():
            l_rec, l_con = op(q, gamma, weight, bias, x)
            return torch.autograd.grad(l_rec + l_con, params)
    elif mode == "bnloss":
        return _bn_loss(variant, inputs)
    elif mode == "moments":
        return _moments(variant, q.detach())
    else:
        op = labels_fn(variant)

        def run():
            with torch.no_grad():
                return op(q.detach(), gamma.detach())
    return run


def _bn_loss_design(variant: str) -> str:
    """The loss design a `bnloss` Triton variant forces: the relay, else two_pass (the split backward)."""
    return "relay" if variant == "relay" else "two_pass"


def _bn_loss(variant: str, inputs):
    """The `bnloss` case: BatchNorm's statistics of q taken in the forward, as the model does."""
    from san_fast.kernels.seat_bn_fold import bn_affine
    from san_fast.model.sync_batchnorm import channel_moments

    q, gamma, weight, bias, x, _ = inputs
    bn_w = torch.ones(q.shape[1], device=q.device, requires_grad=True)
    bn_b = torch.zeros(q.shape[1], device=q.device, requires_grad=True)
    params = (q, gamma, weight, bias, bn_w, bn_b)

    def run():
        if variant == "eager":
            rows = F.batch_norm(q, None, None, bn_w, bn_b, training=True, eps=BN_EPS)
            l_rec, l_con = ops.seat_reconstruct_loss_reference(rows, gamma, weight, bias, x)
        elif variant in ("triton", "relay"):
            with torch.no_grad():
                mean, var = channel_moments(q, BN_EPS)
            stats = ops.BatchStats(mean, var, bn_w, bn_b, BN_EPS)
            l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton",
                                                     design=_bn_loss_design(variant), affine=stats)
        else:
            mean, var = channel_moments(q, BN_EPS)
            l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton", design="two_pass",
                                                     affine=bn_affine(mean, var, BN_EPS, bn_w, bn_b))
        return torch.autograd.grad(l_rec + l_con, params)
    return run


def _moments(variant: str, q: torch.Tensor):
    """The `moments` case: per-channel mean and variance of q (B,P,H,W) over (B,H,W)."""
    from san_fast.kernels.channel_moments import channel_moments_reference, channel_moments_triton

    if variant == "stats":
        return functools.partial(torch.batch_norm_stats, q, BN_EPS)
    return functools.partial(channel_moments_triton if variant == "triton" else channel_moments_reference, q)


def traffic_figures(s: Shape, mode: str, variant: str, gpu) -> dict:
    """Floor bytes for the op and, for the Triton variant, the traffic model's bytes."""
    if mode == "moments":  # one read of q; the kernel's own model of its two launches
        from san_fast.gpu_specs import GPUS
        from san_fast.kernels.channel_moments import modeled_bytes

        sms = (GPUS[gpu] if isinstance(gpu, str) else gpu).sms
        side = int(s.M ** 0.5)
        modeled = modeled_bytes((s.B, s.P, side, side), s.dtype, sms) if variant == "triton" else None
        return {"floor_bytes": s.q_bytes(), "modeled_bytes": modeled}
    try:
        from san_fast.kernels import traffic
    except ImportError as exc:
        return {"floor_bytes": None, "modeled_bytes": None, "traffic_error": str(exc)}
    op = TRAFFIC_OP[mode]
    floor = traffic.floor_bytes(op, s.B, s.M, s.P, s.N, s.C, s.dtype)
    modeled = None
    if variant in TRITON_VARIANTS:
        if mode == "bnloss":  # the statistics' backward in the balance, as ops.seat_reconstruct_loss has it
            how = dict(bn_stats=True, design=_bn_loss_design(variant))
        elif variant in FORCED_DESIGNS:
            how = dict(design=variant)
        else:
            how = {}
        with whole_backward() if variant == "whole" else contextlib.nullcontext():
            modeled = traffic.op_traffic(op, s.B, s.M, s.P, s.N, s.C, s.dtype, gpu=gpu, **how).total_bytes
    return {"floor_bytes": int(floor), "modeled_bytes": None if modeled is None else int(modeled)}


def figures(s: Shape, mode: str, ms: float, bytes_: dict, copy_bps: float, extra) -> dict:
    """GB/s over the floor and the model, fraction of copy bandwidth, extra memory vs Q."""
    seconds = ms / 1e3
    out = {}
    for key, name in (("floor_bytes", "floor"), ("modeled_bytes", "modeled")):
        n = bytes_.get(key)
        out[f"gbps_{name}"] = None if n is None else n / seconds / 1e9
        out[f"of_copy_bw_{name}"] = None if n is None else n / seconds / copy_bps
    if extra is not None:
        must_return = s.q_bytes() if mode in ("fwdbwd", "loss", "bnloss") else 0  # dQ is an output
        out["extra_peak_bytes"] = extra
        out["extra_beyond_outputs_of_q"] = (extra - must_return) / s.q_bytes()
    return out


def target_fields(shape_name: str, variant: str, mode: str, ms: float, extra_of_q,
                  graph: Optional[float] = None) -> dict:
    """The paper shape's targets for the Triton rows: by the events' time (the host issuing
    each launch) and, where measured, by the CUDA-graph replay's."""
    if shape_name != "paper" or variant not in TRITON_VARIANTS or mode not in TARGET_MS:
        return {}
    return {"target_ms": TARGET_MS[mode], "target_met": ms <= TARGET_MS[mode],
            "target_met_graph": None if graph is None else graph <= TARGET_MS[mode],
            "target_extra_of_q": TARGET_EXTRA_OF_Q,
            "extra_met": None if extra_of_q is None else extra_of_q <= TARGET_EXTRA_OF_Q}


def _graphed(run, device, rep_ms: float) -> dict:
    """The case replayed from a CUDA graph (bench.timing.graph_ms), or why it could not be."""
    try:
        timing = graph_ms(run, device, rep_ms=rep_ms)
    except Exception as exc:  # a case that cannot be captured keeps its other figures
        return {"graph_ms": None, "graph_error": error_line(exc)}
    return {"graph_ms": None if timing is None else timing["ms"]}


def autotuned_configs(mode: str) -> dict:
    try:
        from san_fast.kernels import seat_common
    except ImportError:
        return {}
    chosen = getattr(seat_common, "chosen_configs", None)
    kinds = {"fwd": ("forward",), "fwdbwd": ("forward", "backward"), "loss": ("loss", "relay"),
             "labels": ("forward",), "bnloss": ("forward", "backward", "relay"), "moments": ()}
    return chosen(kinds[mode]) if chosen else {}


def measure_case(shape_name: str, s: Shape, variant: str, mode: str, inputs, device, copy_bps: float,
                 gpu, rep_ms: float = 100) -> dict:
    run = build(variant, mode, inputs)
    run()  # autotuning / compilation outside the measurement
    extra = extra_peak_bytes(run, device)
    timing = time_ms(run, device, rep_ms=rep_ms)
    bytes_ = traffic_figures(s, mode, variant, gpu)
    row = {"shape_name": shape_name, "shape": s.as_dict(), "variant": variant, "mode": mode, **timing, **bytes_}
    # The GPU's own time beside the events' (which include the GPU idling while the host issues
    # launches): the H200 run of 2026-11-26 found the Triton cases bound by the host.
    row["kernel_ms"] = kernel_ms(run, device)
    row["host_bound"] = None if row["kernel_ms"] is None else row["kernel_ms"] < HOST_BOUND * timing["ms"]
    row.update(_graphed(run, device, rep_ms / 2))
    row.update(figures(s, mode, timing["ms"], bytes_, copy_bps, extra))
    row.update(target_fields(shape_name, variant, mode, timing["ms"], row.get("extra_beyond_outputs_of_q"),
                             row.get("graph_ms")))
    if variant in TRITON_VARIANTS:
        row["autotuned"] = autotuned_configs(mode)
    return row


def _gpu_spec(device: torch.device):
    if device.type != "cuda":
        return "H100"
    from san_fast.gpu_specs import spec_for_device

    return spec_for_device(device)


def run_stage(report: StageReport, shapes: dict[str, Shape], device: torch.device, rep_ms: float,
              modes: Optional[list[str]] = None, variants: Optional[list[str]] = None) -> None:
    copy_bps = copy_bandwidth(device)
    report.set(device=str(device), copy_gbps=copy_bps / 1e9)
    report.note(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s (read + write)")
    gpu = _gpu_spec(device)
    for shape_name, s in shapes.items():
        todo = [(v, m) for v, m in cases(shape_name, device)
                if (modes is None or m in modes) and (variants is None or v in variants)]
        inputs = make_inputs(s, device)
        for variant, mode in todo:
            # A compile takes tens of seconds; a Triton case a few: leave the rest for later shapes.
            need = 45.0 if variant == "compiled" else 4.0
            if not report.deadline.allows(need):
                report.row({"shape_name": shape_name, "variant": variant, "mode": mode, "status": "skipped (time)"})
                continue
            try:
                row = measure_case(shape_name, s, variant, mode, inputs, device, copy_bps, gpu, rep_ms)
                row["status"] = "ok"
            except Exception as exc:  # one failing case must not hide the others' numbers
                row = {"shape_name": shape_name, "variant": variant, "mode": mode,
                       "status": f"error: {error_line(exc, 200)}"}
            report.row(row)
            print(format_row(row), flush=True)
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _fmt(value, spec: str, width: int) -> str:
    return "-".rjust(width) if value is None else format(value, spec).rjust(width)


def format_row(r: dict) -> str:
    name = f"{r['shape_name']}-{r['variant']}-{r['mode']}"
    if r.get("status", "ok") != "ok":
        return f"{name:28s} {r['status']}"
    return (f"{name:28s} {_fmt(r['ms'], '.3f', 9)} {_fmt(r.get('kernel_ms'), '.3f', 9)} {_fmt(r.get('graph_ms'), '.3f', 9)} "
            f"{_fmt(r.get('gbps_floor'), '.0f', 7)} "
            f"{_fmt(r.get('of_copy_bw_floor'), '.2f', 6)} {_fmt(r.get('extra_beyond_outputs_of_q'), '.3f', 7)}")


def _choice(parser, flag: str, value: Optional[str], allowed: tuple) -> Optional[list[str]]:
    if not value:
        return None
    chosen = value.split(",")
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        parser.error(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the stage report here")
    p.add_argument("--budget", type=float, default=None, help="seconds; later shapes are skipped past it")
    p.add_argument("--dry-run", action="store_true", help="one tiny fp32 shape (runs on the CPU)")
    p.add_argument("--shapes", default=None, help="comma-separated names: paper, " + ", ".join(sweep_shapes()))
    p.add_argument("--modes", default=None, help="comma-separated, of: " + ", ".join(MODES) + " (default all)")
    p.add_argument("--variants", default=None, help="comma-separated, of: " + ", ".join(VARIANTS) + " (default all)")
    args = p.parse_args(argv)
    modes = _choice(p, "--modes", args.modes, MODES)
    variants = _choice(p, "--variants", args.variants, VARIANTS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = StageReport(args.json, "seat", args.budget)
    if args.dry_run or device.type != "cuda":
        shapes = {"tiny": TINY}
        if device.type != "cuda":
            report.note("no CUDA device: one tiny fp32 shape through the Triton interpreter (checks the code, not speed)")
    else:
        shapes = {"paper": PAPER, **sweep_shapes()}
        if args.shapes:
            wanted = args.shapes.split(",")
            shapes = {k: v for k, v in shapes.items() if k in wanted}
    run_stage(report, shapes, device, rep_ms=100 if device.type == "cuda" else 0, modes=modes, variants=variants)
    skipped = sum(1 for r in report.data["rows"] if r.get("status", "").startswith("skipped"))
    if skipped:
        report.note(f"{skipped} cases skipped: the stage's time ran out")
    errors = sum(1 for r in report.data["rows"] if r.get("status", "").startswith("error"))
    report.finish("errors" if errors else "ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

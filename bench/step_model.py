"""The training step's floor, modeled: FLOPs and minimum HBM bytes of every kernel of one step, as
the project runs it, turned into milliseconds per GPU (issue 12, line 1).

    python bench/step_model.py                    # paper preset, the step as train.py runs it
    python bench/step_model.py --amp off          # any preset and flag of train.py
    python bench/step_model.py --adam foreach --bn-folded --json model.json

The step (bench/step_trace.py) is traced on fake tensors: forward, backward, optimizer. Each op
is a kernel reading its inputs and writing its outputs once, with these fusion assumptions:
- eager: one kernel per aten op; a BatchNorm forward reads its input twice (statistics, then
  normalisation), its backward reads dy and x twice (the two sums, then dx); a LayerNorm
  backward reads dy and x for dx and again for the weight gradients.
- --compile: Inductor fuses element-wise ops, casts and row-local reductions (LayerNorm,
  softmax) between library kernels (matmuls, convolutions, attention, the SEAT kernel) into
  one pass; a kernel that needs a full reduction's result (BatchNorm statistics, a loss) starts
  a new pass; nothing fuses into or across library kernels. The optimizer is never compiled.
- a tensor the backward reads is saved by the forward as eager autograd saves it, except under
  --compile a BatchNorm's output read only by element-wise backward ops: AOTAutograd's min-cut
  partitioner keeps BN's input and statistics, and the backward recomputes the output in a pass
  that reads the input anyway, so the output is neither written for the backward nor read back
  (a matmul's backward still reads it saved). Other cheap element-wise results Inductor may
  recompute are counted as saved.
- the SEAT op fused (--seat-impl triton, or auto on sm80+): one row whose bytes and FLOPs are
  the traffic model's (san_fast.kernels.traffic, op "fused_loss", all its launches). Not fused:
  the PyTorch reference's ops, costed as above.
- AMP: weights cast to the AMP dtype where autocast casts them (read fp32, write 16-bit), their
  gradients cast back; GradScaler (fp16) reads and writes every gradient once more.
- Adam: what the project builds (san_fast.train_step.build_optimizer; --adam overrides):
  fused, one kernel (about 28 bytes per parameter), or foreach (about 72: seven passes).
- --bn-folded (default: as --fold-bn decides, i.e. wherever the fused SEAT op runs):
  BatchNorm's affine applied inside the SEAT kernels (Q never written), its backward sums
  taken from the SEAT kernels' small outputs (kernels/seat_bn_fold.py): the normalisation pass
  and the backward's reduction pass over Q go; the statistics pass stays.
- --bn-split (default: with the fold wherever the SEAT loss runs two-pass, as the ops do): the
  statistics' backward inside the SEAT backward (kernels/seat_bn_split.py): the gradient kernel
  runs twice (sums, then dy = dq + alpha + beta y), so BatchNorm's elementwise backward pass goes
  too and the SEAT op reads y once more (the traffic model's split_bn launches). Without it
  the elementwise pass stays.
- the SEAT op's design: two-pass (forward keeps Q, the backward reads it again) under
  --compile or where the traffic model picks it, as san_fast.ops does; else the one-pass fused
  loss, whose forward writes dQ for the backward.
- channels-last changes the layout, not the bytes: it is not in the floor.
A kernel's floor is max(FLOPs / matmul rate, bytes / copy bandwidth) with the rates of
san_fast.gpu_specs; the step's floor is their sum (no overlap between kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.step_cost import activation_bytes, kernel_ms, kernels
from bench.step_trace import SeatCall, Settings, StepTracer, Trace, fake_mode, seat_region
from san_fast.config import Config, build_parser, resolve
from san_fast.gpu_specs import GPUS, GPUSpec
from san_fast.io_utils import atomic_write_json
from san_fast.ops import AUTO_TRITON_MAX_N

PART_LABELS = {"": "loss, glue", "encoder": "pixel encoder", "backbone": "ViT", "vit": "ViT",
               "generator": "sem. heads", "matcher": "token matcher", "seat": "SEAT + recon",
               "optimizer": "optimizer", "amp casts": "AMP casts", "monitor": "Q's zero grad"}


def resolve_settings(cfg: Config, gpu: str, adam: Optional[str], bn_folded: Optional[bool],
                     monitor_grad: str = "auto", bn_split: Optional[bool] = None) -> Settings:
    spec = GPUS[gpu]
    if cfg.amp == "auto":
        amp = spec.amp_dtype
    elif cfg.amp == "off":
        amp = None
    elif cfg.amp == "bf16" and not spec.bf16:
        raise ValueError(f"{gpu} has no bf16 (--amp bf16)")
    else:
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    # san_fast.ops.resolve_impl: the kernel on sm80+ (the GPUs with bf16 here) for `auto`, up to
    # AUTO_TRITON_MAX_N semantics.
    auto_fused = spec.bf16 and cfg.semantics() <= AUTO_TRITON_MAX_N
    seat_fused = cfg.reconstruction and (cfg.seat_impl == "triton" or (cfg.seat_impl == "auto" and auto_fused))
    if bn_folded is None:  # as SAN.folds_bn decides: auto folds wherever the Triton op runs
        fold = getattr(cfg, "fold_bn", "off")
        folded = fold == "on" or (fold == "auto" and seat_fused)
    else:
        folded = bn_folded
    if folded and not seat_fused:
        raise ValueError("--bn-folded applies BatchNorm inside the fused SEAT kernels: it needs the "
                         "fused op (--seat-impl triton or auto on sm80+, with reconstruction)")
    two_pass = seat_fused and _loss_design(cfg, spec, amp, folded) == "two_pass"
    split = folded and two_pass if bn_split is None else bn_split
    if split and not (folded and two_pass):
        raise ValueError("--bn-split: the split BatchNorm backward needs BatchNorm folded and the two-pass loss design")
    return Settings(gpu, amp, amp == torch.float16, seat_fused, cfg.compile,
                    cfg.channels_last if cfg.channels_last is not None else True, adam or project_adam(cfg),
                    folded, split, two_pass, monitor_grad, torch.backends.cudnn.allow_tf32,
                    torch.get_float32_matmul_precision() != "highest")


def _loss_design(cfg: Config, spec: GPUSpec, amp: Optional[torch.dtype], folded: bool = False) -> str:
    """The SEAT loss's design as san_fast.ops picks it: two-pass under torch.compile, else the
    traffic model's choice for the step's shape (BatchNorm folded, in training: on its batch
    statistics, whose backward the two-pass design carries in its dq pass)."""
    if cfg.compile:
        return "two_pass"
    from san_fast.kernels import seat_plan

    from san_fast.data import input_channels

    return seat_plan.loss_design(cfg.batch_size, cfg.crop_size ** 2, cfg.embed_dim, cfg.semantics(),
                                 input_channels(cfg), amp or torch.float32, spec, bn_stats=folded)


def project_adam(cfg: Config) -> str:
    """Fused or foreach, as san_fast.train_step.build_optimizer chooses (foreach: torch's CUDA
    default, where the project has no such function)."""
    try:
        from san_fast.train_step import build_optimizer

        with fake_mode():
            opt = build_optimizer(torch.nn.Linear(2, 2), cfg, announce=False)
    except (ImportError, TypeError):
        return "foreach"
    return "fused" if opt.defaults.get("fused") else "foreach"


def seat_traffic_cost(gpu: str, folded: bool = False, split: bool = False, two_pass: bool = True):
    """The fused loss's bytes and FLOPs from the kernels' traffic model in the design the ops run
    (BatchNorm-folded: with the fold's operand ops and logit bias; `split`: and the split
    BatchNorm backward)."""
    from san_fast.kernels import seat_plan, traffic

    def cost(b, m, p, n, c, dtype):
        # the one-pass design the ops pick (the statistics' pass is step_cost's to count)
        design = "two_pass" if two_pass else seat_plan.loss_design(b, m, p, n, c, dtype, GPUS[gpu], bn_stats=folded)
        t = traffic.op_traffic("fused_loss", b, m, p, n, c, dtype, gpu=gpu, folded=folded, split_bn=split,
                               design=design)
        return {"bytes": int(t.total_bytes), "flops": int(t.flops), "dtype": dtype}

    return cost


def _meta_model(cfg: Config) -> torch.nn.Module:
    """SAN on the meta device: its random initialisers cannot run on fake tensors."""
    from san_fast.model import SAN

    with torch.device("meta"):
        return SAN(cfg)


def _fake_model(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Every parameter and buffer of a meta model replaced by a fake tensor of the same shape,
    4-D weights channels-last as `model.to(memory_format=...)` leaves them (call inside the fake
    mode)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                layout = torch.channels_last if channels_last and p.dim() == 4 else torch.contiguous_format
                module._parameters[key] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, memory_format=layout), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return model


def _model_and_input(cfg: Config, settings: Settings, meta_model):
    model = _fake_model(meta_model, settings.channels_last)
    model.set_attention_backend("sdpa", torch.device("cpu"))
    model.train()
    channels = model.recon.weight.shape[0]
    x = torch.empty(cfg.batch_size, channels, cfg.crop_size, cfg.crop_size)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def _optimizer(model, cfg: Config, settings: Settings):
    params = [p for p in model.parameters() if p.requires_grad]
    fused = settings.adam == "fused"
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True if fused else None, foreach=None if fused else True)


def trace_step(cfg: Config, settings: Settings) -> Trace:
    """Forward, backward and optimizer step of one batch on fake tensors."""
    call = SeatCall()
    # Traced unfused: step_cost.expand folds BatchNorm into the SEAT op by settings.bn_folded.
    cfg = dataclasses.replace(cfg, fold_bn="off")
    meta_model = _meta_model(cfg)
    with fake_mode():
        model, x = _model_and_input(cfg, settings, meta_model)
        optimizer = _optimizer(model, cfg, settings)
        params = list(model.parameters())
        for p in params:  # Adam allocates its state on the first step: a one-off, not traced
            p.grad = torch.empty_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracer = StepTracer({id(m): n for n, m in model.named_modules()},
                            {p.untyped_storage()._cdata for p in params})
        seat = seat_region(tracer, settings.seat_fused,
                           seat_traffic_cost(settings.gpu, settings.bn_folded, settings.bn_split, settings.seat_two_pass)
                           if settings.seat_fused else None, call, settings.seat_two_pass)
        autocast = torch.autocast("cpu", dtype=settings.amp, enabled=settings.amp is not None)
        with FlopCounterMode(display=False) as counter, tracer, seat:
            with autocast:
                terms, q, _ = model.losses(x)
            tracer.phase = "bwd"
            outputs, grads = [terms["loss"]], [None]
            monitor = settings.monitor_grad == "on" or (settings.monitor_grad == "auto" and settings.compile)
            if monitor and q.requires_grad and not settings.bn_folded:
                # AOTAutograd hands the compiled backward a zero gradient for every returned
                # output that requires grad: it is allocated and filled outside the graph.
                start = len(tracer.ops)
                grads.append(torch.zeros_like(q))
                outputs.append(q)
                for op in tracer.ops[start:]:
                    op.part = "monitor"
                    op.kind = "extern" if op.kind == "fusible" else op.kind
            torch.autograd.backward(outputs, grads)
            tracer.phase = "opt"
            if settings.grad_scaler:
                # GradScaler.unscale_: one read and one write of every fp32 gradient.
                tracer.synthetic("grad_scaler_unscale", "optimizer",
                                 {"bytes": 8 * sum(p.numel() for p in params), "flops": 0})
            optimizer.step()
    if cfg.reconstruction and call.calls != 1:
        raise RuntimeError("step model: SAN.losses no longer calls san_fast.ops.seat_reconstruct_loss once; "
                           "bench/step_trace.py's seat_region must follow the new call")
    for op in tracer.ops:
        op.part = op.part.split(".")[0]
        if op.phase == "opt":
            op.part = "optimizer"
        elif op.tags & {"weight-cast", "grad-cast"}:
            op.part = "amp casts"
    return Trace(tracer.ops, call, counter.get_total_flops(), sum(p.numel() for p in params), cfg.batch_size)


def floor_table(trace: Trace, settings: Settings, spec: GPUSpec) -> dict:
    """Per-part, per-category rows (FLOPs, bytes, floor) and the step's totals on `spec`."""
    rows: dict[tuple[str, str], dict] = {}
    for k in kernels(trace, settings):
        flop_ms, byte_ms = kernel_ms(k, spec, settings)
        row = rows.setdefault((k.part, k.category), {"part": PART_LABELS.get(k.part, k.part), "category": k.category,
                                                     "kernels": 0, "gflop": 0.0, "gb": 0.0, "flop_ms": 0.0,
                                                     "byte_ms": 0.0, "floor_ms": 0.0})
        row["kernels"] += 1
        row["gflop"] += k.flops / 1e9
        row["gb"] += k.bytes / 1e9
        row["flop_ms"] += flop_ms
        row["byte_ms"] += byte_ms
        row["floor_ms"] += max(flop_ms, byte_ms)
    ordered = sorted(rows.values(), key=lambda r: (-r["floor_ms"]))
    total = sum(r["floor_ms"] for r in ordered)
    return {"gpu": spec.name, "total_ms": total, "tflop": sum(r["gflop"] for r in ordered) / 1e3,
            "gb": sum(r["gb"] for r in ordered), "params": trace.params,
            "activation_gb_per_image": activation_bytes(trace, settings) / trace.batch / 1e9,
            "flop_counter_tflop": trace.flop_counter_total / 1e12, "settings": settings.describe(), "rows": ordered}


# --------------------------------------------------------------------------- CLI


def model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Floor of one training step per GPU (FLOPs and minimum HBM bytes per kernel). "
                    "Every other flag is train.py's (preset, sizes, --amp, --compile, --seat-impl, ...).",
        add_help=False)
    p.add_argument("--gpu", action="append", choices=sorted(GPUS), help="GPUs to model (default: all)")
    p.add_argument("--adam", choices=("fused", "foreach"), default=None,
                   help="Adam implementation (default: what san_fast.train_step.build_optimizer builds)")
    p.add_argument("--bn-folded", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm of Q applied inside the SEAT kernels (default: as --fold-bn decides, "
                        "auto: wherever the fused SEAT op runs)")
    p.add_argument("--bn-split", action=argparse.BooleanOptionalAction, default=None,
                   help="with BatchNorm folded, its statistics' backward inside the SEAT dq pass "
                        "(kernels/seat_bn_split.py; default: as the ops run it, with the two-pass loss design)")
    p.add_argument("--monitor-grad", choices=("auto", "on", "off"), default="auto",
                   help="a zero gradient for Q returned attached from SAN.losses (auto: when compiled and attached)")
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="measured copy bandwidth (GB/s, read + write) to use instead of the table's")
    p.add_argument("--json", default=None, help="also write the tables here")
    return p


def config_for(train_flags: list[str]) -> Config:
    """train.py's flags -> Config, resolved as on a CUDA machine (the paper preset by default)."""
    cfg = resolve(vars(build_parser().parse_args(train_flags)), cuda_available=True)
    return dataclasses.replace(cfg, baseline=False)


def model_step(train_flags: list[str], gpus: list[str], adam=None, bn_folded=None, monitor_grad="auto",
               copy_gbps: Optional[float] = None, bn_split: Optional[bool] = None) -> dict:
    """Tables per GPU for the step that `train.py train_flags` runs (GPUs it cannot run on are
    reported with the reason)."""
    cfg = config_for(train_flags)
    out = {"train_flags": train_flags, "gpus": {}}
    for gpu in gpus:
        try:
            settings = resolve_settings(cfg, gpu, adam, bn_folded, monitor_grad, bn_split)
        except ValueError as exc:
            out["gpus"][gpu] = {"error": str(exc)}
            continue
        # One trace per GPU: the SEAT op's cost is the traffic model's for that GPU.
        trace = trace_step(cfg, settings)
        spec = GPUS[gpu]
        if copy_gbps:
            spec = dataclasses.replace(spec, hbm_bytes_per_s=copy_gbps * 1e9)
        try:
            out["gpus"][gpu] = floor_table(trace, settings, spec)
        except ValueError as exc:
            if bn_folded is not None or not settings.bn_folded:
                raise
            # The ResNet encoder normalises at 1/8 resolution, then upsamples: its BatchNorm's
            # output is not the Q the SEAT op reads, so the fold is modeled as not applied (its
            # passes are over a 1/64-size tensor).
            settings = dataclasses.replace(settings, bn_folded=False, bn_split=False)
            out["gpus"][gpu] = floor_table(trace_step(cfg, settings), settings, spec)
            out["gpus"][gpu]["note"] = f"BatchNorm fold not modeled: {exc}"
    return out


def format_table(name: str, table: dict) -> str:
    if "error" in table:
        return f"{name}: not modeled ({table['error']})"
    s = table["settings"]
    lines = [f"{name} ({table['gpu']}): floor {table['total_ms']:.2f} ms per step | {table['tflop']:.2f} TFLOP, "
             f"{table['gb']:.2f} GB moved, {table['params'] / 1e6:.1f}M parameters, activations "
             f"{table['activation_gb_per_image']:.3f} GB per image",
             f"  amp {s['amp']}, compile {s['compile']}, SEAT fused {s['seat_fused']}, Adam {s['adam']}, "
             f"BN folded {s['bn_folded']} (statistics' backward in the SEAT kernel: {s['bn_split']})",
             f"  {'part':13s} {'kind':22s} {'kernels':>7s} {'GFLOP':>9s} {'GB':>7s} {'FLOP ms':>8s} {'byte ms':>8s} {'floor ms':>9s}"]
    # Rows sorted by floor: the first dozen, and any further one worth 1% of the step.
    shown = [r for i, r in enumerate(table["rows"]) if i < 12 or r["floor_ms"] >= 0.01 * table["total_ms"]]
    rest = table["rows"][len(shown):]
    for r in shown:
        lines.append(f"  {r['part'][:13]:13s} {r['category'][:22]:22s} {r['kernels']:>7d} {r['gflop']:>9.1f} "
                     f"{r['gb']:>7.2f} {r['flop_ms']:>8.2f} {r['byte_ms']:>8.2f} {r['floor_ms']:>9.2f}")
    if rest:
        lines.append(f"  {len(rest)} more rows ({sum(r['floor_ms'] for r in rest):.3f} ms together; all in --json)")
    if "note" in table:
        lines.append(f"  note: {table['note']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, train_flags = model_parser().parse_known_args(argv)
    if "-h" in train_flags or "--help" in train_flags:
        model_parser().print_help()
        print("\nand train.py's flags:")
        build_parser().print_help()
        return 0
    try:
        result = model_step(train_flags, args.gpu or list(GPUS), args.adam, args.bn_folded, args.monitor_grad,
                            args.copy_gbps, args.bn_split)
    except (ValueError, RuntimeError) as exc:
        print(f"step_model: error: {exc}", file=sys.stderr)
        return 2
    for name, table in result["gpus"].items():
        print(format_table(name, table))
        print()
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

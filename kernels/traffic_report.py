"""The traffic model's tables (`python -m san_fast.kernels.traffic`, the README's and
kernels/README.md's tables): modeled bytes over the floor per op and shape, the loss design the
launcher picks, modeled times. The model itself is traffic.py."""

from __future__ import annotations

import argparse
import itertools
from typing import Optional, Union

import torch
from san_fast.gpu_specs import HALF_DTYPE_KEYS, GPUSpec
from san_fast.kernels.traffic import OPS, PAPER, _spec, op_traffic

SWEEP_N = (6, 27, 64, 100, 256)
SWEEP_SIDE = (32, 64, 128, 256)
SWEEP_B = (1, 4, 16, 64)


def sweep_shapes(full: bool = False, dtype: torch.dtype = PAPER["dtype"]) -> list[dict]:
    """The paper shape, then the sweep: one parameter at a time from the paper shape (or, with
    `full`, every combination of N, side and B), in q's `dtype`."""
    paper = {**PAPER, "dtype": dtype}
    if full:
        return [{**paper, "N": n, "M": side * side, "B": b}
                for n, side, b in itertools.product(SWEEP_N, SWEEP_SIDE, SWEEP_B)]
    shapes = [dict(paper)]
    shapes += [{**paper, "N": n} for n in SWEEP_N if n != PAPER["N"]]
    shapes += [{**paper, "M": side * side} for side in SWEEP_SIDE if side * side != PAPER["M"]]
    shapes += [{**paper, "B": b} for b in SWEEP_B if b != PAPER["B"]]
    return shapes


def _shape_name(s: dict) -> str:
    side = int(round(s["M"] ** 0.5))
    return f"B={s['B']} {side}x{side} N={s['N']}"


def table(gpu: Union[str, GPUSpec] = "H100", full: bool = False, ops=OPS) -> list[str]:
    spec = _spec(gpu)
    dtype = spec.amp_dtype  # q's dtype under training's --amp auto
    head = (f"| shape ({spec.name}, P=1024, C=3, {HALF_DTYPE_KEYS[dtype]}) | op | design | modeled MB | floor MB | ratio | GFLOP "
            "| modeled ms | L2 hit GB | CTAs |")
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sweep_shapes(full, dtype):
        for op in ops:
            t = op_traffic(op, s["B"], s["M"], s["P"], s["N"], s["C"], s["dtype"], gpu=spec)
            ctas = max(x.ctas for x in t.launches if not x.name.startswith("torch"))
            lines.append(f"| {_shape_name(s)} | {op} | {t.design or '-'} | {t.total_bytes / 1e6:.1f} | "
                         f"{t.floor_bytes / 1e6:.1f} | {t.ratio():.3f} | {t.flops / 1e9:.1f} | {t.modeled_ms:.3f} | "
                         f"{t.l2_bytes / 1e9:.2f} | {ctas} |")
    return lines


def compact_table(gpu: Union[str, GPUSpec] = "H100", full: bool = False) -> list[str]:
    """One row per shape: modeled bytes over the floor for each op, the loss design the launcher
    picks, and modeled times."""
    spec = _spec(gpu)
    dtype = spec.amp_dtype
    lines = [f"| shape ({spec.name}, P=1024, C=3, {HALF_DTYPE_KEYS[dtype]}) | forward | backward | fwd+bwd | fused loss (design) "
             "| labels | ms fwd+bwd | ms loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sweep_shapes(full, dtype):
        t = {op: op_traffic(op, s["B"], s["M"], s["P"], s["N"], s["C"], s["dtype"], gpu=spec) for op in OPS}
        lines.append(f"| {_shape_name(s)} | {t['forward'].ratio():.2f}x | {t['backward'].ratio():.2f}x | "
                     f"{t['forward_backward'].ratio():.2f}x | {t['fused_loss'].ratio():.2f}x "
                     f"({t['fused_loss'].design}) | {t['labels'].ratio():.2f}x | "
                     f"{t['forward_backward'].modeled_ms:.3f} | {t['fused_loss'].modeled_ms:.3f} |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    from san_fast.gpu_specs import GPUS

    parser = argparse.ArgumentParser(prog="python -m san_fast.kernels.traffic",
                                     description="Modeled HBM bytes of the SEAT kernels against the floor, per op and shape.")
    parser.add_argument("--gpu", default="H100", choices=list(GPUS), help="GPU of san_fast.gpu_specs")
    parser.add_argument("--full", action="store_true", help="every combination of the sweep, not one axis at a time")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--compact", action="store_true", help="one row per shape, bytes over floor per op")
    args = parser.parse_args(argv)
    lines = compact_table(args.gpu, args.full) if args.compact else table(args.gpu, args.full, tuple(args.ops))
    print("\n".join(lines))
    return 0


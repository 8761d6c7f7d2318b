"""xformers in the ViT, measured (issue 13, item 3): does xformers load (with the CUDA 12 runtime
from nvidia-cuda-runtime-cu12 when torch is a CUDA 13 build) and does memory_efficient_attention
run; do the ViT's outputs and gradients with xformers match SDPA's (same weights, same input,
bf16 autocast and fp32); the ViT's forward+backward time with each at the paper preset (B=16,
128x128, patch 8, width 1024, 6 blocks, heads of 64); and what `--attn auto` picks.

    python -m bench.attn_check --json attn.json --budget 60 [--dry-run]
The dry run (CPU) compares the math backend with SDPA instead, on a tiny ViT.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata

import torch

from bench.runner import StageReport
from bench.timing import time_ms
from san_fast.config import resolve
from san_fast.model import attention
from san_fast.model.vit import ViT

TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def build_vit(dry_run: bool, device: torch.device):
    cfg = resolve({"preset": "cpu" if dry_run else "paper", "num_semantics": 27}, cuda_available=not dry_run)
    batch = 2 if dry_run else cfg.batch_size
    vit = ViT(cfg.crop_size, cfg.patch_size, cfg.vit_width(), cfg.vit_depth, cfg.vit_num_heads()).to(device)
    x = torch.randn(batch, 3, cfg.crop_size, cfg.crop_size, device=device)
    tokens = (cfg.crop_size // cfg.patch_size) ** 2
    heads = cfg.vit_num_heads()
    return vit, x, (batch, tokens, heads, cfg.vit_width() // heads)


def step(vit, x, dtype: torch.dtype) -> torch.Tensor:
    vit.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = vit(x)
    out.float().square().mean().backward()
    return out


def forward_backward(vit, x, backend: str, dtype: torch.dtype):
    vit.set_attention_backend(backend)
    out = step(vit, x, dtype)
    grads = torch.cat([p.grad.flatten().float() for p in vit.parameters()])
    return out.detach().float(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def environment(report: StageReport, device: torch.device) -> bool:
    lib = attention.load_cudart12()
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        version = None
    works = attention.xformers_works(device.type)
    report.set(torch_cuda=torch.version.cuda, xformers_version=version,
               cudart12=None if lib is None else str(lib), cudart12_found=str(attention.find_cudart12()),
               xformers_works=works)
    if version is None:
        report.note("xformers is not installed (carry the wheels: README, 'GPU check')")
    elif not works:
        report.note("xformers imports but its probe call failed: SDPA would be used")
    return works


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dry_run = args.dry_run or device.type != "cuda"
    report = StageReport(args.json, "xformers", args.budget)
    works = environment(report, device)
    # Without a working xformers the comparison still runs (math against SDPA), so the stage's
    # code is exercised; the rows say which backend was compared.
    other = "xformers" if works else "math"
    vit, x, shape = build_vit(dry_run, device)
    report.set(shape_bmhk=list(shape), compared=other)
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        ref_out, ref_grads = forward_backward(vit, x, "sdpa", dtype)
        out, grads = forward_backward(copy.deepcopy(vit), x, other, dtype)
        row = {"kind": "agreement", "backend": other, "dtype": str(dtype), "output_rel_err": rel(out, ref_out),
               "grad_rel_err": rel(grads, ref_grads), "tolerance": TOLERANCE[dtype],
               "finite": bool(torch.isfinite(out).all() and torch.isfinite(grads).all())}
        row["ok"] = row["finite"] and max(row["output_rel_err"], row["grad_rel_err"]) <= TOLERANCE[dtype]
        report.row(row)
    timing_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for backend in ("sdpa", other):
        if not report.deadline.allows(5):
            report.row({"kind": "timing", "backend": backend, "status": "skipped (time)"})
            continue
        vit.set_attention_backend(backend)
        timing = time_ms(lambda: step(vit, x, timing_dtype), device)
        report.row({"kind": "timing", "backend": backend, "dtype": str(timing_dtype), **timing})
    if device.type == "cuda":
        report.set(auto_picks=attention.resolve_backend("auto", device, shape=shape, dtype=timing_dtype))
    bad = [r for r in report.data["rows"] if r.get("kind") == "agreement" and not r["ok"]]
    report.finish("mismatch" if bad else "ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

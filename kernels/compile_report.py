"""Compile every SEAT kernel config for a GPU architecture without a GPU, and report its cost.

    python -m san_fast.kernels.compile_report                  # sm70, sm80, sm90, all dtypes
    python -m san_fast.kernels.compile_report --arch 90 --dtype bf16 --n 27

For each kernel (forward, labels, backward, the split BatchNorm backward's sums and dq passes,
fused loss in both consistency modes, dq rescale),
q dtype, architecture and N bucket, the real launcher in san_fast.kernels is called with small
CPU tensors and a `launch` hook that records the kernel's arguments instead of running it;
each autotune config is then compiled by `triton.compile` for that target, and the bundled
ptxas reports registers and spill bytes. Shared memory is checked against the architecture's
per-block limit: a bucket with no config that fits would fail at launch on that GPU.

This is what can be known about the kernels on a machine with no GPU; the speed itself is
measured by bench/bench_seat.py on one. Exit status 1 if any config fails to compile or any
bucket has no config that fits. Needs TRITON_INTERPRET unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import torch

# Per-block shared memory limit (opt-in maximum) by compute capability.
SHARED_LIMIT = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
KINDS = ("forward", "labels", "backward", "backward_sums", "backward_dq_affine", "loss_image", "loss_rec_q",
         "loss_relay", "loss_relay_rec_q", "rescale")
DTYPES = ("fp32", "fp16", "bf16")
# fp64 (the gradcheck path) is compiled on request only.
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# One N per padded bucket (BLOCK_N = 32, 64, 128, 256); 27 is the paper's COCO-Stuff-27.
DEFAULT_NS = (27, 64, 100, 256)


@dataclasses.dataclass
class Row:
    kind: str
    kernel: str
    dtype: str
    arch: int
    n: int
    config: str
    ok: bool
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    fits: Optional[bool] = None
    # cp.async instructions in the PTX: loads the software pipeliner made asynchronous (into
    # shared memory, past L1); traffic.py's L1 rule holds only for kernels with none.
    async_copies: Optional[int] = None
    seconds: float = 0.0
    error: str = ""
    # False where no launcher picks this kernel on its own: the fused design above
    # seat_plan.FUSED_LOSS_MAX_BLOCK_N (relay or two_pass run there; design="fused" still can).
    chosen: bool = True


@dataclasses.dataclass
class _Launch:
    kernel: object
    args: tuple
    kwargs: dict


def _recording_launch(calls: list) -> Callable:
    def launch(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append(_Launch(kernel, args, kwargs))

        return _Grid()

    return launch


def _launches(kind: str, dtype: torch.dtype, n: int, arch: int = 90) -> list[_Launch]:
    """Call the real launcher for `kind` with small tensors; return what it would launch (on `arch`)."""
    from san_fast.kernels import seat_backward, seat_forward, seat_fused_loss, seat_plan

    b, m, p, c = 1, 80, 48, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, m, p, generator=gen).to(dtype)
    # fp32 master weights, as under autocast; everything float64 on the gradcheck path.
    master = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = torch.randn(b, n, p, generator=gen, dtype=master)
    weight = torch.randn(c, p, generator=gen, dtype=master)
    bias = torch.randn(c, generator=gen, dtype=master)
    calls: list[_Launch] = []
    launch = _recording_launch(calls)
    if kind == "forward":
        seat_forward.seat_forward(q, gamma, weight, bias, save_attn=True, launch=launch)
    elif kind == "labels":
        seat_forward.seat_labels(q, gamma, launch=launch)
    elif kind.startswith("backward"):
        attn = torch.zeros(b, m, n, dtype=dtype)
        grad = torch.randn(b, m, c, generator=gen).to(dtype)
        # The split BatchNorm backward's two passes (kernels/seat_bn_split.py): folded operands.
        split = {"backward_sums": dict(with_dq=False),
                 "backward_dq_affine": dict(dq_affine=(torch.zeros(p, dtype=master), torch.ones(p, dtype=master)))}
        folded = dict(values=torch.zeros(b, n, c, dtype=master), logit_bias=torch.zeros(b, n, dtype=master))
        # One pass or split (its sums pass, then its dq pass) as the planner runs it on `arch`.
        plan = seat_plan.grad_plan(seat_plan.MODE_GRADS, b, m, p, n, c, dtype, seat_plan.device_spec(q.device),
                                   split=seat_plan.splits_backward(seat_plan.MODE_GRADS, n, arch >= 80))
        seat_backward.launch_grad(
            seat_backward.MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=grad, grad_rec_t=grad,
            launch=launch, plan=plan, **(dict(split[kind], **folded) if kind in split else {}),
        )
    elif kind in ("loss_image", "loss_rec_q", "loss_relay", "loss_relay_rec_q"):
        x = torch.randn(b, m, c, generator=gen, dtype=master)
        target_rec_q, relay = kind.endswith("rec_q"), kind.startswith("loss_relay")
        mode = seat_plan.MODE_LOSS_REC_Q if target_rec_q else seat_plan.MODE_LOSS_IMAGE
        spec = seat_plan.device_spec(q.device)
        # every tile the planner may pick there
        for bm, p2 in seat_plan.grad_tiles(mode, n, c, arch >= 80, relay=relay):
            # A wide range is planned only where every range is full (EVEN_P): compiled so.
            wide = seat_plan.wide_range(bm, p2)
            pt = p2 if wide else p
            qt, gt, wt = (torch.randn(*t.shape[:-1], pt, generator=gen).to(t.dtype) for t in (q, gamma, weight))
            plan = seat_plan.grad_plan(mode, b, m, pt, n, c, dtype, spec, block_m=bm, block_p2=p2,
                                       p_range=p2 if wide else None, interpreter=False, relay=relay)
            seat_fused_loss.seat_fused_loss(qt, gt, wt, bias, x, target_rec_q, 1.0, 1.0, launch=launch, plan=plan)
    elif kind == "rescale":
        u = torch.randn(b, m, c, generator=gen, dtype=master)
        coef = torch.ones(2, dtype=master)
        seat_fused_loss.rescale_dq_(q, u, weight, coef, launch=launch)
    else:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    return calls


def _jit_source(fn, args: tuple, constexprs: dict, target, warps: int, stages: int, maxnreg: Optional[int] = None):
    """The ASTSource and options the JIT itself would build for this call on `target`: the same
    argument specialization (integers equal to 1 become constants, pointers and integers get
    their 16-divisibility attributes), which decides vectorization and so the registers."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    launch = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    bound, specialization, options = binder(*args, **constexprs, **launch)
    options, signature, consts, attrs = fn._pack_args(backend, {**constexprs, **launch}, bound, specialization, options)
    return ASTSource(fn, signature, consts, attrs), options


def _ptxas_report(ptx: str, arch: int) -> tuple[Optional[int], Optional[int]]:
    from triton.backends.nvidia.compiler import get_ptxas

    # The ptxas triton itself uses for this arch: the bundled ones accept different PTX versions.
    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def _configs(kernel):
    """(JITFunction, [(config kwargs, num_warps, num_stages, maxnreg)]) for an autotuner or a plain kernel."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        return kernel.fn, [(dict(cfg.kwargs), cfg.num_warps, cfg.num_stages, cfg.maxnreg) for cfg in kernel.configs]
    return kernel, [({}, None, None, None)]


def compile_kind(
    kind: str,
    dtype: str,
    arch: int,
    n: int,
    tf32: bool = False,
    first_only: bool = False,
    candidates: Optional[list[dict]] = None,
) -> list[Row]:
    """Compile `kind`'s autotune configs (or the `candidates` instead, to try new ones: dicts of
    constexprs, e.g. BLOCK_M, BLOCK_P2, BLOCK_PD, with num_warps, num_stages and optionally
    maxnreg, a register cap per thread) for one dtype,
    arch and N. Candidates apply to the autotuned kernel of the kind, not to its helpers."""
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for call in _launches(kind, TORCH_DTYPE[dtype], n, arch):
        fn, configs = _configs(call.kernel)
        autotuned = bool(configs[0][0])  # the rescale kernel has no BLOCK_* to try
        kwargs = dict(call.kwargs)
        if candidates and autotuned:
            # A candidate may also replace tiles the launcher passes itself (the gradient
            # kernel's BLOCK_M and BLOCK_P2, from its plan): config values override kwargs.
            tuned = configs[0][0]
            configs = [({**tuned, **{k: v for k, v in cand.items() if k.startswith("BLOCK_")}},
                        cand["num_warps"], cand["num_stages"], cand.get("maxnreg")) for cand in candidates]
        launch_warps = kwargs.pop("num_warps", 4)
        launch_stages = kwargs.pop("num_stages", 3)
        if "PRECISION" in kwargs:
            kwargs["PRECISION"] = "tf32" if (dtype == "fp32" and tf32 and arch >= 80) else "ieee"
        for cfg_kwargs, warps, stages, maxnreg in configs[:1] if first_only else configs:
            warps = warps or launch_warps
            stages = stages or launch_stages
            constexprs = {**kwargs, **cfg_kwargs}
            if "WIDE_RANGE" in constexprs:  # follows the tile, as in the plan (a candidate may change it)
                from san_fast.kernels import seat_plan

                constexprs["WIDE_RANGE"] = seat_plan.wide_range(constexprs["BLOCK_M"], constexprs["BLOCK_P2"])
            tiles = [k for k in ("BLOCK_M", "BLOCK_P", "BLOCK_P2", "BLOCK_PD") if k in constexprs and autotuned]
            label = ",".join(f"{k[6:]}={constexprs[k]}" for k in tiles)
            label = f"{label + ',' if label else ''}w={warps},s={stages}" + (f",r={maxnreg}" if maxnreg else "")
            if constexprs.get("PASS"):  # a pass of a split gradient kernel
                from san_fast.kernels.seat_backward import PASS_NAMES

                label += f",pass={PASS_NAMES[constexprs['PASS']]}"
            row = Row(kind, fn.__name__, dtype, arch, n, label, ok=False, chosen=_chosen(kind, n))
            start = time.perf_counter()
            try:
                target = GPUTarget("cuda", arch, 32)
                src, options = _jit_source(fn, call.args, constexprs, target, warps, stages, maxnreg)
                compiled = triton.compile(src, target=target, options=options.__dict__)
                row.registers, row.spill_bytes = _ptxas_report(compiled.asm["ptx"], arch)
                row.async_copies = len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", compiled.asm["ptx"]))
                row.shared_bytes = int(compiled.metadata.shared)
                row.fits = row.shared_bytes <= SHARED_LIMIT.get(arch, 48 * 1024)
                row.ok = True
            except Exception as exc:  # a config that does not compile is a finding, not a crash
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            row.seconds = time.perf_counter() - start
            rows.append(row)
    return rows


def _chosen(kind: str, n: int) -> bool:
    from san_fast.kernels import seat_plan

    return kind not in ("loss_image", "loss_rec_q") or seat_plan.fused_loss_fits(n)


def summarise(rows: list[Row]) -> tuple[list[str], bool]:
    """One line per (kind, dtype, arch, N): how many configs compile, fit, and run without spills."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row.kind, row.kernel, row.dtype, row.arch, row.n), []).append(row)
    lines, good = [], True
    for (kind, kernel, dtype, arch, n), group in groups.items():
        compiled = [r for r in group if r.ok]
        fitting = [r for r in compiled if r.fits]
        clean = [r for r in fitting if r.spill_bytes == 0]
        verdict = "ok" if len(compiled) == len(group) and fitting else "FAIL"
        good = good and verdict == "ok"
        least = min(fitting, key=lambda r: (r.spill_bytes or 0, r.registers or 0), default=None)
        best = f"least spill {least.config} ({least.registers} regs, {least.spill_bytes} B)" if least else "-"
        unused = "" if group[0].chosen else "  (not chosen: the launcher never runs the fused design at this N)"
        lines.append(
            f"{kind:11s} {kernel:22s} {dtype:5s} sm{arch} N={n:<4d} compiled {len(compiled)}/{len(group)}, "
            f"fit shared {len(fitting)}, spill-free {len(clean)}  {verdict}  {best}{unused}"
        )
    return lines, good


def _format_row(row: Row) -> str:
    head = f"{row.kind:11s} {row.kernel:22s} {row.dtype:5s} sm{row.arch} N={row.n:<4d} {row.config:34s}"
    if not row.ok:
        return f"{head} FAILED {row.error}"
    over = "" if row.fits else " OVER LIMIT"
    return (
        f"{head} regs {row.registers!s:>4s} spill {row.spill_bytes!s:>5s} B "
        f"shared {row.shared_bytes / 1024:6.1f} KiB{over}  ({row.seconds:.1f} s)"
    )


_SHORT = {"w": "num_warps", "s": "num_stages", "r": "maxnreg"}


def _candidate(text: str) -> dict:
    """'M=64,P2=256,PD=64,w=8,s=2' -> {BLOCK_M: 64, BLOCK_P2: 256, BLOCK_PD: 64, num_warps: 8, num_stages: 2};
    r=168 adds a register cap (maxnreg)."""
    out = {}
    try:
        for part in text.split(","):
            key, value = part.split("=")
            out[_SHORT.get(key, f"BLOCK_{key}")] = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE pairs, e.g. M=64,P2=256,PD=64,w=8,s=2") from None
    if "num_warps" not in out or "num_stages" not in out:
        raise argparse.ArgumentTypeError(f"{text!r}: give the warps and stages too (w=8,s=2)")
    return out


def _compile_job(job: tuple, **options) -> list[Row]:
    kind, dtype, arch, n = job
    return compile_kind(kind, dtype, arch, n, **options)


def _valid(dtype: str, arch: int) -> bool:
    return not (dtype in ("bf16", "fp64") and arch < 80)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m san_fast.kernels.compile_report",
        description="Compile the SEAT kernels' autotune configs offline for GPU architectures and "
        "report registers, spills and shared memory (no GPU needed).",
    )
    add = parser.add_argument
    add("--arch", type=int, nargs="+", default=[70, 80, 90], help="compute capabilities, e.g. 80 90")
    add("--dtype", nargs="+", default=list(DTYPES), choices=list(TORCH_DTYPE),
        help="q dtypes (bf16 skipped below sm80; fp64, the gradcheck path, only when named)")
    add("--kind", nargs="+", default=list(KINDS), choices=KINDS, help="kernels to compile")
    add("--n", type=int, nargs="+", default=list(DEFAULT_NS), help="numbers of semantics N (one per bucket)")
    add("--tf32", action="store_true", help="fp32 dots as TF32 on sm80+ (default IEEE, as torch's default)")
    add(
        "--try", dest="candidates", nargs="+", metavar="K=V,...", type=_candidate,
        help="compile these configs instead of the autotune lists, e.g. M=64,P2=256,PD=64,w=8,s=2 "
        "(M, P, P2, PD: BLOCK_M, BLOCK_P, BLOCK_P2, BLOCK_PD; w: warps; s: stages; r: register cap, maxnreg)",
    )
    add("--first-config-only", action="store_true", help="one config per kernel and bucket (quick check)")
    add("--jobs", type=int, default=1, help="compile in this many processes")
    add("--json", help="also write every row to this JSON file")
    add("--quiet", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)

    # Triton 3.9 warns once per process unless the (unchanged) default is spelled out.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; run without it")
    for arch in args.arch:
        if arch < 70:
            parser.error(f"--arch {arch}: the kernels need sm70 or newer (tl.dot)")
    for n in args.n:
        if not 2 <= n <= 256:
            parser.error(f"--n {n}: N must be in [2, 256]")

    import triton

    print(f"triton {triton.__version__}, torch {torch.__version__}: compiling offline (no GPU used)", flush=True)
    jobs = [(kind, dtype, arch, n) for arch in args.arch for dtype in args.dtype if _valid(dtype, arch)
            for kind in args.kind for n in (args.n if kind != "rescale" else args.n[:1])]
    work = functools.partial(_compile_job, tf32=args.tf32, first_only=args.first_config_only,
                             candidates=args.candidates)
    rows: list[Row] = []
    # Compiles are single-threaded: separate processes use the other cores (CI has two).
    with concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        for found in (pool.map(work, jobs) if pool else map(work, jobs)):
            for row in found:
                if not args.quiet:
                    print(_format_row(row), flush=True)
            rows.extend(found)
    lines, good = summarise(rows)
    print("\nsummary (one line per kernel, dtype, architecture and N bucket):")
    print("\n".join(lines))
    if args.json:
        from san_fast.io_utils import atomic_write_json

        atomic_write_json(args.json, {"triton": triton.__version__, "rows": [dataclasses.asdict(r) for r in rows]})
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

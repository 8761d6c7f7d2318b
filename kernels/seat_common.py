"""Host-side helpers shared by the SEAT launchers: limits, dtypes, dot precision, device guard,
launch preconditions, and the autotuner registry.

The kernels live in seat_forward.py, seat_backward.py and seat_fused_loss.py; how each launch
is shaped (tiles, grid, workspace) is decided in seat_plan.py, which traffic.py also reads.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from san_fast.kernels.seat_reference import MAX_C, MAX_N, MIN_C, MIN_N, MIN_P

# C (output channels of the 1x1 conv) is at most 8; tl.dot needs every dimension >= 16.
BLOCK_C = 16
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def identity_launch(kernel):
    """Default `launch` of the launchers: run the kernel as is (compile_report.py passes a recorder)."""
    return kernel


def block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs keep float64 end to end so that gradcheck can run the real kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(q: torch.Tensor) -> str:
    """fp32 tl.dot precision: follow torch's own matmul setting, so the default ("highest")
    stays IEEE fp32 and `torch.set_float32_matmul_precision("high")` opts into TF32."""
    if q.dtype != torch.float32 or interpreting() or q.device.type != "cuda":
        return "ieee"
    if torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    major, _ = torch.cuda.get_device_capability(q.device)
    return "tf32" if major >= 8 else "ieee"


def device_guard(t: torch.Tensor):
    """Launch on t's device, not on whichever CUDA device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """True when an offset within one image of a (B, rows, cols) tensor may reach 2^31 (or, for
    a contiguous (B, rows, cols) operand such as gamma, within the whole tensor): the kernels
    then build their tile offsets in 64 bits. Image bases are 64-bit either way."""
    limit = 2**31
    for t in tensors:
        per_image = sum(abs(st) * (n - 1) for st, n in zip(t.stride()[1:], t.shape[1:]))
        if per_image >= limit or (t.is_contiguous() and t.numel() >= limit):
            return True
    return False


def check_launch(q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """The kernels' preconditions, checked where they are launched (san_fast.ops checks the same
    for its users; this catches direct callers). Returns B, M, P, N, C."""
    if q.dim() != 3:
        raise ValueError(f"SEAT kernels take q as rows (B,M,P), got shape {tuple(q.shape)}")
    bsz, m, p = q.shape
    if bsz < 1 or m < 1:
        raise ValueError(f"SEAT kernels need at least one image and one pixel, got q of shape {tuple(q.shape)}")
    if p < MIN_P:
        raise ValueError(f"SEAT kernels need P >= {MIN_P} (tl.dot tiles), got P={p}")
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if gamma.dim() != 3 or gamma.shape[0] != bsz or gamma.shape[2] != p:
        raise ValueError(f"gamma must be (B,N,P)=({bsz},N,{p}), got {tuple(gamma.shape)}")
    n = gamma.shape[1]
    if not MIN_N <= n <= MAX_N:
        raise ValueError(f"SEAT kernels need N in {MIN_N}..{MAX_N}, got N={n}")
    c = 1
    tensors = [gamma]
    if weight is not None:
        if weight.dim() != 2 or weight.shape[1] != p:
            raise ValueError(f"weight must be (C,P) with P={p}, got {tuple(weight.shape)}")
        c = weight.shape[0]
        if not MIN_C <= c <= MAX_C:
            raise ValueError(f"SEAT kernels need C in {MIN_C}..{MAX_C} (the fused loss packs 2C <= 16 columns), got C={c}")
        tensors.append(weight)
    for t in tensors:
        if t.device != q.device:
            raise ValueError(f"all SEAT kernel inputs must be on q's device {q.device}, got one on {t.device}")
    return bsz, m, p, n, c


def check_rows(name: str, t: torch.Tensor, shape: tuple, device: torch.device) -> None:
    """A per-row input of a launcher (gradients, targets, saved attention) must match q's rows."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def check_small(name: str, t: Optional[torch.Tensor], shape: tuple, q: torch.Tensor, dtype: torch.dtype):
    """An optional small per-image input (the fold's values (B,N,C), logit bias (B,N)): None
    passes; else checked against `shape` and q's device, returned contiguous in `dtype`."""
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    with torch.autocast(device_type=t.device.type, enabled=False):
        return t.to(dtype).contiguous()


def as_operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gamma / W in q's dtype, contiguous, as autocast would feed tl.dot (a no-op when they
    already are): the kernels then read them at q's element size, with fixed strides."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        return t.to(dtype).contiguous()


_AUTOTUNED: dict = {}


def autotuned(kernel, kind: str, bucket: int, configs: list, key: list, reset_to_zero: Optional[list] = None):
    """One autotuner per (kernel, kind, N bucket), each with the configs that fit that N;
    `reset_to_zero`: arguments zeroed before each timed run (the relay design's flags)."""
    reg_key = (kernel, kind, bucket, tuple(str(c) for c in configs))
    if reg_key not in _AUTOTUNED:
        _AUTOTUNED[reg_key] = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(kernel)
    return _AUTOTUNED[reg_key]


def with_config(kernel, config):
    """(kernel, launch kwargs): the autotuner as is, or, given a triton.Config, the kernel it
    wraps with that config's parameters (tests run every config this way)."""
    if config is None:
        return kernel, {}
    cap = {"maxnreg": config.maxnreg} if config.maxnreg else {}  # a register cap per thread
    return kernel.fn, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages, **cap}


def config_label(cfg) -> str:
    parts = [f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.kwargs.items()]
    return ",".join(parts + [f"w={cfg.num_warps}", f"s={cfg.num_stages}"] + ([f"r={cfg.maxnreg}"] if cfg.maxnreg else []))


def chosen_configs(kinds: tuple[str, ...] = ("forward", "backward", "loss")) -> dict[str, str]:
    """The configs the autotuners of `kinds` have picked so far, by N bucket and autotune key
    (the benchmarks record them, so a timing can be matched with compile_report.py's registers
    and spills for that config). A single-config autotuner (the interpreter's) never tunes."""
    out = {}
    for (_, kind, bucket, _), tuner in _AUTOTUNED.items():
        if kind not in kinds:
            continue
        picks = dict(getattr(tuner, "cache", None) or {})
        if not picks and len(tuner.configs) == 1:
            picks = {"only config": tuner.configs[0]}
        for key, cfg in picks.items():
            out[f"{kind} N<={bucket} {key}"] = config_label(cfg)
    return out

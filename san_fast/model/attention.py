"""Multi-head attention backends for the ViT: xformers, torch SDPA, or plain math.

All backends take q, k, v in xformers' layout (B, M, H, K) and return the same layout, so the
ViT code never changes with the backend. `auto` uses torch SDPA unless xformers imports and a
tiny probe call (forward and backward) works on the CUDA device; then it times both once at the
ViT's shape and keeps the faster (cached per process, announced in one line). The environment
variable SAN_ATTN overrides `auto` (as timm/dinov2 do for their optional backends).

PyPI's xformers wheels are built against CUDA 12, so their `_C.so` needs `libcudart.so.12`,
which a CUDA 13 build of torch does not ship. When the `nvidia-cuda-runtime-cu12` package is
installed (it puts the library in site-packages' nvidia/cuda_runtime/lib/), it is loaded with
RTLD_GLOBAL before xformers is imported, so the extension's CUDA operators load.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")
CUDART12 = Path("nvidia", "cuda_runtime", "lib", "libcudart.so.12")
# (B, M, H, K) of the paper preset's ViT (batch 16, 128x128 crops, patch 8, width 1024, heads
# of 64): the shape `auto` times when the caller does not give the model's own.
PAPER_SHAPE = (16, 256, 16, 64)


def _notice(message: str) -> None:
    print(f"[san_fast] {message}", file=sys.stderr)


def find_cudart12() -> Optional[Path]:
    """libcudart.so.12 from the nvidia-cuda-runtime-cu12 package, wherever sys.path has it."""
    for entry in sys.path:
        candidate = Path(entry or ".") / CUDART12
        if candidate.is_file():
            return candidate.resolve()
    return None


@functools.lru_cache(maxsize=None)
def load_cudart12() -> Optional[Path]:
    """Load the CUDA 12 runtime globally for xformers' extension, once; None when not needed
    (torch is itself a CUDA 12 build, so the library is already loaded) or not installed."""
    if (torch.version.cuda or "").startswith("12."):
        return None
    path = find_cudart12()
    if path is None:
        return None
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _notice(f"could not load {path} for xformers ({exc})")
        return None
    _notice(f"loaded {path} (nvidia-cuda-runtime-cu12) for xformers' CUDA 12 extension")
    return path


def _import_xformers_ops():
    load_cudart12()
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # a broken install raises more than ImportError
        return None


@functools.lru_cache(maxsize=None)
def xformers_works(device_type: str) -> bool:
    """Probe xformers once per device type with a tiny forward and backward; wheels without
    CUDA operators (or without the CUDA 12 runtime they link) raise."""
    ops = _import_xformers_ops()
    if ops is None or device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        x = torch.randn(1, 8, 1, 16, device="cuda", dtype=torch.float16, requires_grad=True)
        ops.memory_efficient_attention(x, x, x).sum().backward()
    except Exception as exc:  # NotImplementedError on CPU-only wheels, RuntimeError otherwise
        _notice(f"xformers unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "using torch SDPA for ViT attention")
        return False
    return True


def time_fwd_bwd(backend: str, shape: tuple, dtype: torch.dtype, device: torch.device,
                 reps: int = 10) -> float:
    """Median milliseconds of one attention forward + backward at `shape` (CUDA events)."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)
    times = []
    for i in range(reps + 3):  # three warm-up rounds: library load, kernel selection
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(attention(q, k, v, backend), (q, k, v), grad)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose_by_timing(candidates: tuple[str, ...], timer: Callable[[str], float]) -> tuple[str, dict]:
    """The candidate with the smallest time; a candidate whose timing raises is left out."""
    times = {}
    for name in candidates:
        try:
            times[name] = timer(name)
        except Exception as exc:  # a backend that fails at this shape is not a candidate
            _notice(f"attention auto: {name} failed while timing ({type(exc).__name__}: {exc})")
    if not times:
        raise RuntimeError(f"attention auto: none of {candidates} ran")
    return min(times, key=times.get), times


@functools.lru_cache(maxsize=None)
def pick_auto(device_type: str, shape: tuple, dtype: torch.dtype) -> str:
    """`auto` for one device type, shape and dtype: SDPA unless xformers works and is faster."""
    if not xformers_works(device_type):
        return "sdpa"
    device = torch.device(device_type)
    best, times = choose_by_timing(("xformers", "sdpa"), lambda name: time_fwd_bwd(name, shape, dtype, device))
    summary = ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items())
    _notice(f"attention auto: {summary} (forward+backward, (B,M,H,K)={shape}, {str(dtype).split('.')[-1]}): "
            f"using {best}")
    return best


def resolve_backend(name: str, device: torch.device, shape: Optional[tuple] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """A concrete backend for `name` on `device`. For `auto`, `shape` (B, M, H, K) and `dtype`
    are what the ViT will run (default: the paper preset's shape, bf16 or fp16 by the GPU)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = os.environ.get("SAN_ATTN", "auto")
        if name not in BACKENDS:
            raise ValueError(f"SAN_ATTN={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        if dtype is None:
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float16
        return pick_auto(device.type, tuple(shape or PAPER_SHAPE), dtype)
    if name == "xformers" and _import_xformers_ops() is None:
        raise RuntimeError("--attn xformers: the xformers package is not importable "
                           "(README.md, 'What ran where', says how to install it)")
    return name


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (B, M, H, K) -> (B, H, M, K); softmax in fp32 so the reference is trustworthy under AMP.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.matmul(scores.softmax(dim=-1), v.float()).to(v.dtype)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax attention over (B, M, H, K) tensors with a resolved backend name."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share a (B, M, H, K) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if backend == "xformers":
        return _import_xformers_ops().memory_efficient_attention(q, k, v)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "math":
        return _math_attention(q, k, v)
    raise ValueError(f"unresolved attention backend {backend!r}")

"""Multi-head attention backends for the ViT: xformers, torch SDPA, or plain math.

All backends take q, k, v in xformers' layout (B, M, H, K) and return the same layout, so the
ViT code never changes with the backend. `auto` picks xformers' memory-efficient attention when
it imports and works on the tensors' CUDA device, else torch SDPA; the environment variable
SAN_ATTN overrides `auto` (as timm/dinov2 do for their optional backends).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")


def _import_xformers_ops():
    try:
        return importlib.import_module("xformers.ops")
    except Exception:  # a broken install raises more than ImportError
        return None


@functools.lru_cache(maxsize=None)
def xformers_works(device_type: str) -> bool:
    """Probe xformers once per device type with a tiny call; wheels without CUDA ops raise."""
    ops = _import_xformers_ops()
    if ops is None or device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        x = torch.randn(1, 8, 1, 16, device="cuda", dtype=torch.float16)
        ops.memory_efficient_attention(x, x, x)
    except Exception as exc:  # NotImplementedError on CPU-only wheels, RuntimeError otherwise
        print(f"[san_fast] xformers unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
              "using torch SDPA for ViT attention", file=sys.stderr)
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = os.environ.get("SAN_ATTN", "auto")
        if name not in BACKENDS:
            raise ValueError(f"SAN_ATTN={name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "xformers" if xformers_works(device.type) else "sdpa"
    if name == "xformers" and _import_xformers_ops() is None:
        raise RuntimeError("--attn xformers: the xformers package is not importable "
                           "(pip install xformers, CUDA builds come from PyTorch's index)")
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

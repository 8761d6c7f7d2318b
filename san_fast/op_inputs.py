"""Checks of san_fast.ops' inputs: shapes, dtypes, devices, the BatchNorm affine, each failing
with a one-line error that says what was expected."""

from __future__ import annotations

import torch
from san_fast.kernels.seat_bn_fold import BatchStats
from san_fast.kernels.seat_reference import MAX_C, MAX_N, MIN_C, MIN_N, MIN_P, as_matrix, as_rows

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(q, gamma, weight=None, bias=None, x=None):
    """Checks shapes, dtypes and devices; returns q as rows (B,M,P), gamma (B,N,P), weight (C,P)."""
    _check_tensor("q", q)
    _check_tensor("gamma", gamma)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B,M,P) or channels-last (B,P,H,W), got shape {tuple(q.shape)}")
    rows = as_rows(q)
    bsz, m, p = rows.shape
    if bsz < 1:
        raise ValueError(f"q has an empty batch (B=0): shape {tuple(q.shape)}; expected at least one image")
    if gamma.dim() != 3:
        raise ValueError(f"gamma must be (B,N,P), got shape {tuple(gamma.shape)}")
    if gamma.shape[0] not in (1, bsz):
        raise ValueError(f"gamma has batch {gamma.shape[0]}, q has batch {bsz}: expected equal (or 1)")
    if gamma.shape[2] != p:
        raise ValueError(f"gamma's embedding length {gamma.shape[2]} does not match q's P={p}")
    n = gamma.shape[1]
    if not MIN_N <= n <= MAX_N:
        raise ValueError(f"N (gamma.shape[1]) must be in {MIN_N}..{MAX_N}, got {n}")
    if p < MIN_P:
        raise ValueError(f"P must be at least {MIN_P} (tl.dot tiles), got {p}")
    if m < 1:
        raise ValueError(f"q has no pixels: shape {tuple(q.shape)}")
    tensors = {"q": q, "gamma": gamma}
    w2 = None
    if weight is not None:
        _check_tensor("weight", weight)
        w2 = as_matrix(weight)
        if w2.shape[1] != p:
            raise ValueError(f"weight has {w2.shape[1]} input channels, q has P={p}")
        c = w2.shape[0]
        if not MIN_C <= c <= MAX_C:
            raise ValueError(f"C (weight.shape[0]) must be in {MIN_C}..{MAX_C}, got {c}")
        tensors["weight"] = weight
        if bias is not None:
            _check_tensor("bias", bias)
            if bias.shape != (c,):
                raise ValueError(f"bias must be ({c},) to match weight, got {tuple(bias.shape)}")
            tensors["bias"] = bias
        if x is not None:
            _check_tensor("x", x)
            if x.dim() == 3:
                expected = (bsz, m, c)
            elif x.dim() == 4 and q.dim() == 4:
                expected = (bsz, c, *q.shape[2:])
            elif x.dim() == 4:
                expected = (bsz, c, x.shape[2], x.shape[3]) if x.shape[2] * x.shape[3] == m else None
            else:
                expected = None
            if expected is None or tuple(x.shape) != expected:
                raise ValueError(
                    f"x must be (B,M,C)=({bsz},{m},{c}) or an image (B,C,H,W) with H*W = M matching q, "
                    f"got {tuple(x.shape)}"
                )
            tensors["x"] = x
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    return rows, gamma.expand(bsz, -1, -1), w2


def check_affine(affine, rows: torch.Tensor):
    """None, (scale, shift) checked as two (P,) float tensors on q's device, or BatchStats
    (mean, var, weight, bias the same)."""
    if affine is None:
        return None
    if isinstance(affine, BatchStats):
        names = ("mean", "var", "weight", "bias")
        _check_vectors("BatchStats", names, [getattr(affine, name) for name in names], rows)
        return affine
    if not isinstance(affine, (tuple, list)) or len(affine) != 2:
        raise TypeError("affine must be None or a pair (scale, shift) of (P,) tensors")
    _check_vectors("affine", ("scale", "shift"), affine, rows)
    return tuple(affine)


def _check_vectors(prefix: str, names, tensors, rows: torch.Tensor) -> None:
    """Per-channel float tensors: (P,) each, on q's device."""
    p = rows.shape[-1]
    for name, t in zip(names, tensors):
        _check_tensor(f"{prefix} {name}", t)
        if t.shape != (p,) or t.device != rows.device:
            raise ValueError(f"{prefix} {name} must be (P,)=({p},) on q's device {rows.device}, got "
                             f"{tuple(t.shape)} on {t.device}")

"""SEAT fused with the reconstruction 1x1 conv: the one entry point the model calls.

rec_q = q W^T + b and rec_t = softmax(tau q gamma^T) (gamma W^T) + b, tau = 1/sqrt(P)
(DESIGN.md section 2). Theta = A gamma is never formed.

Layers, as in Liger-Kernel: Triton kernels (san_fast.kernels) -> launchers registered as opaque
custom ops ``torch.ops.san_fast.*`` and autograd Functions (san_fast.kernels.seat_autograd) ->
the public functions below, which validate inputs and pick the implementation. The plain
PyTorch references live next to the kernels (san_fast.kernels.seat_reference) and are the
``impl="torch"`` path.

Inputs: q (B,M,P) or (B,P,H,W). A 4-D q is read through strides as (B,HW,P) without a copy,
whatever its memory format: channels-last (the model's layout) gives contiguous rows; NCHW
works too, with loads strided along P (slower). gamma (B,N,P) (a (1,N,P) gamma is expanded),
weight (C,P) or (C,P,1,1), bias (C,) or None. q may be fp16/bf16/fp32 (fp64 for checks) while
gamma/weight/bias are fp32 master weights: the kernels accumulate in fp32 and return rec_q,
rec_t in q's dtype, gradients in each input's dtype, losses in fp32. No op reads a device value
on the host (no synchronisation), eager or compiled.

BatchNorm folded: every function takes `affine=(scale, shift)`, two (P,) tensors, and then
computes the op on Q = q * scale + shift per channel (BatchNorm's affine; q is the conv output y).
With impl='triton' the affine is applied inside the kernels and Q is never written
(kernels/seat_bn_fold.py); gradients reach scale and shift, hence BatchNorm's statistics and
parameters. `seat_labels` also takes a `FoldedQ(y, scale, shift)` as q (what SAN.losses
returns for the collapse monitor when it folds).

`affine` may also be a `BatchStats` (a training BatchNorm's detached batch statistics of q and
its weight and bias; san_fast.model.sync_batchnorm.batch_stats): the same op on BN(q), whose
gradient also reaches q through the statistics. With impl='triton' and the two-pass design, the
statistics' backward then runs inside the SEAT backward's dq pass (kernels/seat_bn_split.py:
no elementwise pass over Q-sized tensors after it); elsewhere the (scale, shift) path runs,
with the statistics' backward as the elementwise pass it was.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple, Optional, Union

import torch
from san_fast.kernels.seat_bn_fold import (
    BatchStats,
    affine_rows_reference,
    attach_moments,
    bn_affine,
    folded_operands,
    labels_operands,
)
from san_fast.kernels.seat_reference import (
    MAX_C,
    MAX_N,
    MIN_C,
    MIN_N,
    MIN_P,
    as_rows,
    image_rows,
    loss_dtype,
    losses,
    seat_labels_reference,
    seat_reconstruct_loss_reference,
    seat_reconstruct_reference,
)
from san_fast.op_inputs import check_affine as _validate_affine
from san_fast.op_inputs import check_inputs as _validate

_HAS_TRITON = importlib.util.find_spec("triton") is not None

CONSISTENCY_TARGETS = ("image", "rec_q")
LOSS_DESIGNS = ("auto", "fused", "relay", "two_pass")
LOSS_DESIGN_ENV = "SAN_FAST_LOSS_DESIGN"
_as_rows = as_rows  # the name other modules (bench/step_trace.py) use
__all__ = [
    "seat_reconstruct", "seat_reconstruct_loss", "seat_labels", "FoldedQ", "seat_reconstruct_reference",
    "seat_reconstruct_loss_reference", "seat_labels_reference", "resolve_impl", "check_impl", "BatchStats",
    "MIN_N", "MAX_N", "MIN_C", "MAX_C", "MIN_P",
]


class FoldedQ(NamedTuple):
    """Q = y * scale + shift per channel, not materialised: y (B,P,H,W) or (B,M,P), scale and
    shift (P,) (BatchNorm's affine in a batch)."""

    y: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


# Above this N, 'auto' runs the PyTorch reference: an H100 measured the Triton op's
# forward+backward at N = 256 at 12.8 ms against 3.9 ms eager (its gradient kernel's
# accumulators spill there), and at N = 100 the two even (bench/results/nvidia-h100-2026-11-26).
AUTO_TRITON_MAX_N = 128


def resolve_impl(impl: str, device, n: Optional[int] = None) -> str:
    """'auto' -> 'triton' on a CUDA device of compute capability >= 8.0 when Triton imports and
    the number of semantics `n` (when given) is at most AUTO_TRITON_MAX_N, else 'torch'; other
    names pass through.

    On sm70 the kernels compile and run (impl='triton'), but Triton >= 3 lowers tl.dot to FMAs
    there (no Volta tensor-core path), so the PyTorch reference is the faster default."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: expected 'auto', 'triton' or 'torch'")
    if impl != "auto":
        return impl
    device = torch.device(device)
    if device.type != "cuda" or not _HAS_TRITON or (n is not None and n > AUTO_TRITON_MAX_N):
        return "torch"
    return "triton" if torch.cuda.get_device_capability(device)[0] >= 8 else "torch"


def check_impl(impl: str, device, n: Optional[int] = None) -> str:
    """Resolve `impl` for tensors on `device` (and N semantics) and fail early, with the reason,
    where the Triton kernels cannot run there. Returns 'triton' or 'torch'."""
    impl = resolve_impl(impl, device, n)
    if impl == "torch":
        return impl
    if not _HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install 'san-fast[triton]')")
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors (q is on {device}); set TRITON_INTERPRET=1 "
            "before importing san_fast to run the kernels in the CPU interpreter"
        )
    return impl


def _use_triton(impl: str, q: torch.Tensor, n: int) -> bool:
    if check_impl(impl, q.device, n) == "torch":
        return False
    if q.dtype == torch.bfloat16 and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
        raise TypeError("bfloat16 q needs a GPU with compute capability >= 8.0 for impl='triton'")
    return True


# --------------------------------------------------------------------------- public API


def seat_reconstruct(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    impl: str = "auto",
    affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rec_q, rec_t (B,M,C) in q's dtype; differentiable in q, gamma, weight, bias (and the
    affine's scale and shift).

    With impl='triton' and gradients needed, the forward also keeps the attention (B,M,N) in
    q's dtype (N/P of Q's bytes) so the backward reads Q once."""
    rows, gamma3, w2 = _validate(q, gamma, weight, bias)
    affine = _validate_affine(affine, rows)
    triton = _use_triton(impl, q, gamma3.shape[1])
    if isinstance(affine, BatchStats):
        if triton and _needs_grad(rows, gamma3, w2, bias, affine.weight, affine.bias):
            from san_fast.kernels.seat_bn_split import seat_batchnorm

            return seat_batchnorm(rows, affine, gamma3, w2, bias)
        affine = _stats_affine(affine, rows)
    if not triton:
        rows = rows if affine is None else affine_rows_reference(rows, *affine)
        return seat_reconstruct_reference(rows, gamma3, w2, bias)
    if affine is not None:
        rec_q, rec_t, _ = _folded(rows, gamma3, w2, bias, affine)
        return rec_q, rec_t
    if not _needs_grad(rows, gamma3, w2, bias):
        rec_q, rec_t, _ = torch.ops.san_fast.seat_forward(rows, gamma3, w2, bias, False)
        return rec_q, rec_t
    from san_fast.kernels.seat_autograd import SeatReconstructFunction

    rec_q, rec_t, _ = SeatReconstructFunction.apply(rows, gamma3, w2, bias, True)
    return rec_q, rec_t


def seat_reconstruct_loss(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
    consistency_target: str = "image",
    impl: str = "auto",
    loss_weights: tuple[float, float] = (1.0, 1.0),
    design: str = "auto",
    affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_rec, L_con) as fp32 scalars: mean((rec_q - x)^2), mean((rec_t - target)^2).

    x is the target image, (B,M,C) or (B,C,H,W) at q's spatial size; target is x
    ("image") or rec_q ("rec_q", gradients flow through both sides).

    With impl='triton' and gradients needed, `design` picks how:
    - "fused": the forward also computes every gradient (one read of Q, one write of dQ) for the
      total loss loss_weights[0] * L_rec + loss_weights[1] * L_con. Other upstream gradients
      (other weights, a GradScaler's scale) stay exact: the backward rescales dQ in place (one
      more read and write of dQ), deciding on the device, without a host sync. Eager only.
    - "relay": the same, in one launch where producer CTAs compute the forward of each row
      block and hand it to the CTAs computing the gradients (Q read once from HBM, each of its
      rows once more from L2). Eager only.
    - "two_pass": forward keeping the attention, then the exact backward (two reads of Q).
    - "auto": whichever the traffic model (san_fast.kernels.traffic) says is faster on this
      GPU, or the design the environment variable SAN_FAST_LOSS_DESIGN names; always
      "two_pass" under torch.compile. With a BatchStats `affine` the model weighs two_pass,
      which then runs BatchNorm's statistics' backward inside its dq pass, against the
      one-pass designs plus that backward as an elementwise pass over Q-sized tensors: two_pass
      at the paper shape (seat_plan.loss_design).
    """
    if consistency_target not in CONSISTENCY_TARGETS:
        raise ValueError(f"consistency_target={consistency_target!r}: expected 'image' or 'rec_q'")
    if design not in LOSS_DESIGNS:
        raise ValueError(f"design={design!r}: expected one of {LOSS_DESIGNS}")
    h_rec, h_con = (float(w) for w in loss_weights)
    if h_con == 0.0:
        raise ValueError("loss_weights[1] (the weight of L_con) must be non-zero")
    rows, gamma3, w2 = _validate(q, gamma, weight, bias, x)
    affine = _validate_affine(affine, rows)
    x_rows = image_rows(x)
    target_rec_q = consistency_target == "rec_q"
    triton = _use_triton(impl, q, gamma3.shape[1])
    if isinstance(affine, BatchStats):
        if triton and _needs_grad(rows, gamma3, w2, bias, x_rows, affine.weight, affine.bias):
            # Decided here, with the statistics' backward in the balance: the design runs below
            # on (scale, shift), which no longer says where they came from.
            design = _loss_design(design, rows, gamma3.shape[1], w2.shape[0], bn_stats=True)
            if design == "two_pass":
                from san_fast.kernels.seat_bn_split import seat_batchnorm

                rec_q, rec_t = seat_batchnorm(rows, affine, gamma3, w2, bias)
                return losses(rec_q, rec_t, x_rows, target_rec_q, loss_dtype(rows))
        affine = _stats_affine(affine, rows)
    if not triton:
        rows = rows if affine is None else affine_rows_reference(rows, *affine)
        return seat_reconstruct_loss_reference(rows, gamma3, w2, bias, x_rows, consistency_target)
    if affine is not None:
        return _folded_loss(rows, gamma3, w2, bias, x_rows, target_rec_q, (h_rec, h_con), design, affine)
    if not _needs_grad(rows, gamma3, w2, bias, x_rows):
        rec_q, rec_t, _ = torch.ops.san_fast.seat_forward(rows, gamma3, w2, bias, False)
        return losses(rec_q, rec_t, x_rows, target_rec_q, loss_dtype(q))
    from san_fast.kernels import seat_autograd

    used = _loss_design(design, rows, gamma3.shape[1], w2.shape[0])
    if used == "two_pass":
        rec_q, rec_t, _ = seat_autograd.SeatReconstructFunction.apply(rows, gamma3, w2, bias, True)
        return losses(rec_q, rec_t, x_rows, target_rec_q, loss_dtype(q))
    out = seat_autograd.SeatFusedLossFunction.apply(rows, gamma3, w2, bias, x_rows, target_rec_q, h_rec, h_con,
                                                    None, None, used == "relay")
    return out[0], out[1]


def seat_labels(
    q: Union[torch.Tensor, FoldedQ], gamma: torch.Tensor, impl: str = "auto",
    affine: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Argmax over N of the SEAT attention, (B,M) int64, without the attention in memory.
    q may be a FoldedQ (then `affine` must be None)."""
    if isinstance(q, FoldedQ):
        if affine is not None:
            raise ValueError("seat_labels: q is a FoldedQ, which carries its affine; pass affine=None")
        q, affine = q.y, (q.scale, q.shift)
    rows, gamma3, _ = _validate(q, gamma)
    affine = _validate_affine(affine, rows)
    if isinstance(affine, BatchStats):
        affine = affine.affine()
    if not _use_triton(impl, q, gamma3.shape[1]):
        rows = rows if affine is None else affine_rows_reference(rows, *affine)
        return seat_labels_reference(rows, gamma3)
    if affine is not None:
        gamma_s, lb = labels_operands(*affine, gamma3, loss_dtype(rows))
        return torch.ops.san_fast.seat_labels_folded(rows, gamma_s, lb)
    return torch.ops.san_fast.seat_labels(rows, gamma3)


def _folded(rows, gamma, weight, bias, affine):
    """The SEAT op on rows * scale + shift, the affine inside the kernels (kernels/seat_bn_fold.py)."""
    from san_fast.kernels.seat_autograd import SeatFoldedFunction

    operands = folded_operands(*affine, gamma, weight, bias, loss_dtype(rows))
    if not _needs_grad(rows, gamma, weight, bias, *affine):
        return torch.ops.san_fast.seat_forward_folded(rows, *operands, False)
    return SeatFoldedFunction.apply(rows, *operands, True)


def _folded_loss(rows, gamma, weight, bias, x_rows, target_rec_q, hints, design, affine):
    used = _loss_design(design, rows, gamma.shape[1], weight.shape[0]) if _needs_grad(
        rows, gamma, weight, bias, x_rows, *affine) else "two_pass"
    if used != "two_pass":
        from san_fast.kernels.seat_autograd import SeatFusedLossFunction

        g_s, w_s, values, bias_f, lb = folded_operands(*affine, gamma, weight, bias, loss_dtype(rows))
        out = SeatFusedLossFunction.apply(rows, g_s, w_s, bias_f, x_rows, target_rec_q, *hints, values, lb,
                                          used == "relay")
        return out[0], out[1]
    rec_q, rec_t, _ = _folded(rows, gamma, weight, bias, affine)
    return losses(rec_q, rec_t, x_rows, target_rec_q, loss_dtype(rows))


def _stats_affine(stats: BatchStats, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BN's (scale, shift) in this batch, through which the gradient reaches rows as through
    BatchNorm's own statistics (attach_moments: no second pass over rows)."""
    if not _needs_grad(rows):
        return stats.affine()
    return bn_affine(*attach_moments(rows, stats), stats.eps, stats.weight, stats.bias)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _loss_design(design: str, rows: torch.Tensor, n: int, c: int, bn_stats: bool = False) -> str:
    compiling = torch.compiler.is_compiling()
    if design in ("fused", "relay") and compiling:
        raise ValueError(f"design={design!r} cannot run under torch.compile: its in-place dQ rescale would be "
                         "functionalized into a copy of dQ; use design='auto' or 'two_pass'")
    if design != "auto":
        return design
    if compiling:
        return "two_pass"
    # An override of the model's choice for design="auto" in eager, as timm's and dinov2's
    # attention backends take one: to run a design the model does not pick, or to set one aside.
    forced = os.environ.get(LOSS_DESIGN_ENV, "auto")
    if forced not in LOSS_DESIGNS:
        raise ValueError(f"{LOSS_DESIGN_ENV}={forced!r}: expected one of {LOSS_DESIGNS}")
    if forced != "auto":
        return forced
    from san_fast.kernels import seat_plan

    bsz, m, p = rows.shape
    # float64 (the gradcheck path) has no GPU model of its own: choose as for fp32.
    dtype = torch.float32 if rows.dtype == torch.float64 else rows.dtype
    return seat_plan.loss_design(bsz, m, p, n, c, dtype, seat_plan.device_spec(rows.device), bn_stats)


if _HAS_TRITON:
    import san_fast.kernels.seat_autograd  # noqa: F401  (registers torch.ops.san_fast.*)
    import san_fast.kernels.seat_bn_split  # noqa: F401  (and the split BatchNorm backward's two)

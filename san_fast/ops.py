"""SEAT fused with the reconstruction 1x1 conv: the one entry point the model calls.

rec_q = q W^T + b and rec_t = softmax(tau q gamma^T) (gamma W^T) + b, tau = 1/sqrt(P)
(DESIGN.md section 2). Theta = A gamma is never formed.

Layers, as in Liger-Kernel: Triton kernels (san_fast.kernels) -> launchers registered as
custom ops ``torch.ops.san_fast.*`` (``torch.library.triton_op`` so torch.compile sees the
kernels; ``custom_op`` + ``register_fake`` under the Triton interpreter or an older torch) ->
one ``torch.autograd.Function`` per op (its ``setup_context``/``backward`` are also registered
on the op with ``torch.library.register_autograd``) -> the public functions below.

Inputs: q (B,M,P) or (B,P,H,W). A 4-D q is read through strides as (B,HW,P) without a copy,
whatever its memory format: channels-last (the model's layout) gives contiguous rows; NCHW
works too, with loads strided along P (slower). gamma (B,N,P) (a (1,N,P) gamma is expanded),
weight (C,P) or (C,P,1,1), bias (C,) or None. q may be fp16/bf16/fp32 (fp64 for checks) while
gamma/weight/bias are fp32 master weights: the kernels accumulate in fp32 and return rec_q,
rec_t in q's dtype, gradients in each input's dtype, losses in fp32.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_N, MAX_N = 2, 256
MIN_C, MAX_C = 1, 8
MIN_P = 16
CONSISTENCY_TARGETS = ("image", "rec_q")


# --------------------------------------------------------------------------- reference (torch)


def _as_rows(q: torch.Tensor) -> torch.Tensor:
    """(B,M,P) as is, or (B,P,H,W) viewed as (B,HW,P): a view for channels-last and NCHW alike."""
    if q.dim() == 3:
        return q
    if q.dim() == 4:
        return q.flatten(2).transpose(1, 2)
    raise ValueError(f"q must be (B,M,P) or (B,P,H,W), got shape {tuple(q.shape)}")


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.flatten(1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f"weight must be (C,P) or a 1x1 conv weight (C,P,1,1), got {tuple(weight.shape)}")


def _image_rows(x: torch.Tensor) -> torch.Tensor:
    """Target image (B,M,C) as is, or (B,C,H,W) viewed as (B,HW,C)."""
    return x if x.dim() == 3 else x.flatten(2).transpose(1, 2)


def seat_reconstruct_reference(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch SEAT + reconstruction; returns rec_q, rec_t of shape (B,M,C)."""
    rows = _as_rows(q)
    w = _as_matrix(weight).to(rows.dtype)
    g = gamma.to(rows.dtype)
    tau = 1.0 / math.sqrt(rows.shape[-1])
    attn = torch.softmax(torch.matmul(rows, g.transpose(1, 2)) * tau, dim=-1)
    values = torch.matmul(g, w.t())  # (B,N,C)
    b = None if bias is None else bias.to(rows.dtype)
    rec_q = torch.nn.functional.linear(rows, w, b)
    rec_t = torch.matmul(attn, values)
    if b is not None:
        rec_t = rec_t + b
    return rec_q, rec_t


def _loss_dtype(q: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of losses and weight gradients: fp32, or fp64 for float64 checks."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _losses(rec_q, rec_t, x_rows, target_rec_q: bool, dtype: torch.dtype):
    rq, rt, xs = rec_q.to(dtype), rec_t.to(dtype), x_rows.to(dtype)
    return (rq - xs).pow(2).mean(), (rt - (rq if target_rec_q else xs)).pow(2).mean()


def seat_reconstruct_loss_reference(
    q: torch.Tensor,
    gamma: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    x: torch.Tensor,
    consistency_target: str = "image",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_rec = mean((rec_q - x)^2), L_con = mean((rec_t - target)^2), target x or rec_q."""
    rec_q, rec_t = seat_reconstruct_reference(q, gamma, weight, bias)
    return _losses(rec_q, rec_t, _image_rows(x), consistency_target != "image", _loss_dtype(q))


def seat_labels_reference(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    rows = _as_rows(q)
    dtype = _loss_dtype(q)
    return torch.matmul(rows.to(dtype), gamma.to(dtype).transpose(1, 2)).argmax(-1)


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _validate(q, gamma, weight=None, bias=None, x=None):
    """Checks shapes, dtypes and devices; returns q as rows (B,M,P), gamma (B,N,P), weight (C,P)."""
    _check_tensor("q", q)
    _check_tensor("gamma", gamma)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B,M,P) or channels-last (B,P,H,W), got shape {tuple(q.shape)}")
    rows = _as_rows(q)
    bsz, m, p = rows.shape
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
        w2 = _as_matrix(weight)
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


def resolve_impl(impl: str, device) -> str:
    """'auto' -> 'triton' on a CUDA device of compute capability >= 8.0 when Triton imports,
    else 'torch'; other names pass through.

    On sm70 the kernels compile and run (impl='triton'), but Triton >= 3 lowers tl.dot to FMAs
    there (no Volta tensor-core path), so the PyTorch reference is the faster default."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: expected 'auto', 'triton' or 'torch'")
    if impl != "auto":
        return impl
    device = torch.device(device)
    if device.type != "cuda" or not _HAS_TRITON:
        return "torch"
    return "triton" if torch.cuda.get_device_capability(device)[0] >= 8 else "torch"


def check_impl(impl: str, device) -> str:
    """Resolve `impl` for tensors on `device` and fail early, with the reason, where the
    Triton kernels cannot run there. Returns 'triton' or 'torch'."""
    impl = resolve_impl(impl, device)
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


def _use_triton(impl: str, q: torch.Tensor) -> bool:
    if check_impl(impl, q.device) == "torch":
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """rec_q, rec_t (B,M,C) in q's dtype; differentiable in q, gamma, weight, bias."""
    rows, gamma3, w2 = _validate(q, gamma, weight, bias)
    if not _use_triton(impl, q):
        return seat_reconstruct_reference(rows, gamma3, w2, bias)
    rec_q, rec_t, _ = SeatReconstructFunction.apply(rows, gamma3, w2, bias)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_rec, L_con) as fp32 scalars: mean((rec_q - x)^2), mean((rec_t - target)^2).

    x is the target image, (B,M,C) or (B,C,H,W) at q's spatial size; target is x
    ("image") or rec_q ("rec_q", gradients flow through both sides).

    With impl='triton' and gradients needed, the forward pass also computes every gradient
    (one read of Q, one write of dQ), for the total loss
    loss_weights[0] * L_rec + loss_weights[1] * L_con. Other upstream gradients (other weights,
    a GradScaler's scale) stay exact but cost one more read+write of dQ in the backward. Under
    torch.compile that pass always runs (skipping it needs a host-side check).
    """
    if consistency_target not in CONSISTENCY_TARGETS:
        raise ValueError(f"consistency_target={consistency_target!r}: expected 'image' or 'rec_q'")
    h_rec, h_con = (float(w) for w in loss_weights)
    if h_con == 0.0:
        raise ValueError("loss_weights[1] (the weight of L_con) must be non-zero")
    rows, gamma3, w2 = _validate(q, gamma, weight, bias, x)
    x_rows = _image_rows(x)
    if not _use_triton(impl, q):
        return seat_reconstruct_loss_reference(rows, gamma3, w2, bias, x_rows, consistency_target)
    tensors = (rows, gamma3, w2, bias, x_rows)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad:
        rec_q, rec_t, _ = torch.ops.san_fast.seat_forward(rows, gamma3, w2, bias)
        return _losses(rec_q, rec_t, x_rows, consistency_target == "rec_q", _loss_dtype(q))
    out = SeatReconstructLossFunction.apply(
        rows, gamma3, w2, bias, x_rows, consistency_target == "rec_q", h_rec, h_con
    )
    return out[0], out[1]


def seat_labels(q: torch.Tensor, gamma: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Argmax over N of the SEAT attention, (B,M) int64, without the attention in memory."""
    rows, gamma3, _ = _validate(q, gamma)
    if not _use_triton(impl, q):
        return seat_labels_reference(rows, gamma3)
    return torch.ops.san_fast.seat_labels(rows, gamma3)


# --------------------------------------------------------------------------- custom ops + autograd


def _use_triton_op() -> bool:
    # Under the interpreter wrap_triton hands back the raw kernel, which cannot run on the
    # FakeTensors that triton_op's tracing uses: register an opaque custom_op there instead.
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreted


def _define_op(name: str, impl, fake, mutates_args=()):
    if _use_triton_op():
        return torch.library.triton_op(f"san_fast::{name}", impl, mutates_args=mutates_args)
    op = torch.library.custom_op(f"san_fast::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def _launch_wrapper():
    return torch.library.wrap_triton if _use_triton_op() else (lambda kernel: kernel)


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


class SeatReconstructFunction(torch.autograd.Function):
    """(q rows, gamma, W, bias) -> (rec_q, rec_t, lse); lse is saved for the backward."""

    @staticmethod
    def forward(q, gamma, weight, bias):
        return torch.ops.san_fast.seat_forward(q, gamma, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, gamma, weight, bias = inputs
        ctx.save_for_backward(q, gamma, weight, output[2])
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_rec_q, grad_rec_t, _grad_lse):
        q, gamma, weight, lse = ctx.saved_tensors
        shape = (q.shape[0], q.shape[1], weight.shape[0])
        like = torch.empty(shape, device=q.device, dtype=q.dtype)
        grad_rec_q = _zeros_if_none(grad_rec_q, like)
        grad_rec_t = _zeros_if_none(grad_rec_t, like)
        dq, d_gamma, d_weight = torch.ops.san_fast.seat_backward(q, gamma, weight, lse, grad_rec_q, grad_rec_t)
        d_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            d_bias = (grad_rec_q.to(d_gamma.dtype) + grad_rec_t.to(d_gamma.dtype)).sum((0, 1)).to(ctx.bias_dtype)
        return dq, d_gamma.to(gamma.dtype), d_weight.to(weight.dtype), d_bias


class SeatReconstructLossFunction(torch.autograd.Function):
    """(q rows, gamma, W, bias, x rows, target_rec_q, h_rec, h_con) -> (L_rec, L_con, saved...).

    Only the first two outputs are losses; the rest are the precomputed gradients the
    backward rescales (non-differentiable)."""

    @staticmethod
    def forward(q, gamma, weight, bias, x, target_rec_q, h_rec, h_con):
        return torch.ops.san_fast.seat_loss(q, gamma, weight, bias, x, target_rec_q, h_rec, h_con)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, gamma, weight, bias, x, target_rec_q, h_rec, h_con = inputs
        _, _, rec_q, rec_t, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u = output
        ctx.save_for_backward(weight, x, rec_q, rec_t, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u)
        ctx.mark_non_differentiable(*output[2:])
        ctx.target_rec_q = target_rec_q
        ctx.h_rec, ctx.h_con = h_rec, h_con
        ctx.dtypes = (gamma.dtype, weight.dtype, None if bias is None else bias.dtype, x.dtype)

    @staticmethod
    def backward(ctx, grad_rec, grad_con, *_unused):
        weight, x, rec_q, rec_t, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u = ctx.saved_tensors
        gamma_dtype, weight_dtype, bias_dtype, x_dtype = ctx.dtypes
        acc = rec_q.dtype
        grad_rec = grad_rec.to(acc)
        grad_con = grad_con.to(acc)
        # Upstream (g_rec, g_con) against the hint (h_rec, h_con): see kernels/seat_fused_loss.py.
        a = grad_con / ctx.h_con
        b = grad_rec - a * ctx.h_rec
        bsz, m, c = rec_q.shape
        scale = 2.0 / (bsz * m * c)
        x_acc = x.to(acc)
        u = (rec_q - x_acc) * scale
        w_res = (rec_t - (rec_q if ctx.target_rec_q else x_acc)) * scale
        needs = ctx.needs_input_grad
        dq = d_gamma = d_weight = d_bias = dx = None
        if needs[0]:
            coef = torch.stack([a, b])
            if torch.compiler.is_compiling():
                dq = torch.ops.san_fast.seat_rescale_dq(dq_pre, u, weight, coef)
            else:
                a_host, b_host = coef.tolist()
                if a_host == 1.0 and b_host == 0.0:
                    dq = dq_pre
                else:
                    dq = torch.ops.san_fast.seat_rescale_dq(dq_pre, u, weight, coef)
        if needs[1]:
            d_gamma = (a * d_gamma_pre).to(gamma_dtype)
        if needs[2]:
            d_weight = (a * d_weight_pre + b * d_weight_u).to(weight_dtype)
        if needs[3] and bias_dtype is not None:
            d_bias = grad_rec * u.sum((0, 1))
            if not ctx.target_rec_q:
                d_bias = d_bias + grad_con * w_res.sum((0, 1))
            d_bias = d_bias.to(bias_dtype)
        if needs[4]:
            dx = -grad_rec * u
            if not ctx.target_rec_q:
                dx = dx - grad_con * w_res
            dx = dx.to(x_dtype)
        return dq, d_gamma, d_weight, d_bias, dx, None, None, None


def _register_ops() -> None:
    from san_fast.kernels.seat_backward import (
        MODE_GRADS,
        combine_through_values,
        launch_backward,
    )
    from san_fast.kernels.seat_forward import seat_forward as launch_forward
    from san_fast.kernels.seat_forward import seat_labels as launch_labels
    from san_fast.kernels.seat_fused_loss import rescale_dq, seat_fused_loss

    launch = _launch_wrapper()

    def forward_impl(
        q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_forward(q, gamma, weight, bias, launch=launch)

    def forward_fake(q, gamma, weight, bias):
        bsz, m, _ = q.shape
        c = weight.shape[0]
        return (
            q.new_empty((bsz, m, c)),
            q.new_empty((bsz, m, c)),
            q.new_empty((bsz, m), dtype=_loss_dtype(q)),
        )

    def backward_impl(
        q: torch.Tensor,
        gamma: torch.Tensor,
        weight: torch.Tensor,
        lse: torch.Tensor,
        grad_rec_q: torch.Tensor,
        grad_rec_t: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq, d_gamma, d_weight, _, s, _, _ = launch_backward(
            MODE_GRADS, q, gamma, weight, None, lse=lse, grad_rec_q=grad_rec_q, grad_rec_t=grad_rec_t,
            launch=launch,
        )
        d_gamma, d_weight = combine_through_values(d_gamma, d_weight, s, gamma, weight)
        return dq, d_gamma, d_weight

    def backward_fake(q, gamma, weight, lse, grad_rec_q, grad_rec_t):
        acc = _loss_dtype(q)
        return torch.empty_like(q), gamma.new_empty(gamma.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc)

    def loss_impl(
        q: torch.Tensor,
        gamma: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        x: torch.Tensor,
        target_rec_q: bool,
        h_rec: float,
        h_con: float,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
    ]:
        rec_q, rec_t, dq, d_gamma, d_weight, d_weight_u = seat_fused_loss(
            q, gamma, weight, bias, x, target_rec_q, h_rec, h_con, launch=launch
        )
        l_rec, l_con = _losses(rec_q, rec_t, x, target_rec_q, rec_q.dtype)
        return l_rec, l_con, rec_q, rec_t, dq, d_gamma, d_weight, d_weight_u

    def loss_fake(q, gamma, weight, bias, x, target_rec_q, h_rec, h_con):
        acc = _loss_dtype(q)
        bsz, m, _ = q.shape
        c = weight.shape[0]
        return (
            q.new_empty((), dtype=acc),
            q.new_empty((), dtype=acc),
            q.new_empty((bsz, m, c), dtype=acc),
            q.new_empty((bsz, m, c), dtype=acc),
            torch.empty_like(q),
            gamma.new_empty(gamma.shape, dtype=acc),
            weight.new_empty(weight.shape, dtype=acc),
            weight.new_empty(weight.shape, dtype=acc),
        )

    def rescale_impl(dq_pre: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return rescale_dq(dq_pre, u, weight, coef, launch=launch)

    def rescale_fake(dq_pre, u, weight, coef):
        return torch.empty_like(dq_pre)

    def labels_impl(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return launch_labels(q, gamma, launch=launch)

    def labels_fake(q, gamma):
        return q.new_empty(q.shape[:2], dtype=torch.int64)

    forward_op = _define_op("seat_forward", forward_impl, forward_fake)
    _define_op("seat_backward", backward_impl, backward_fake)
    loss_op = _define_op("seat_loss", loss_impl, loss_fake)
    _define_op("seat_rescale_dq", rescale_impl, rescale_fake)
    _define_op("seat_labels", labels_impl, labels_fake)
    # The ops are differentiable on their own too (e.g. for torch.export users), with the same
    # formulas as the autograd.Functions the public functions go through.
    torch.library.register_autograd(
        forward_op, SeatReconstructFunction.backward, setup_context=SeatReconstructFunction.setup_context
    )
    torch.library.register_autograd(
        loss_op, SeatReconstructLossFunction.backward, setup_context=SeatReconstructLossFunction.setup_context
    )


if _HAS_TRITON:
    _register_ops()

"""The SEAT launchers as PyTorch ops: opaque custom ops for torch.compile, autograd Functions.

Custom ops `torch.ops.san_fast.*` (torch.library.custom_op, on CUDA and under the interpreter
alike):

    seat_forward(q, gamma, weight, bias, save_attn) -> (rec_q, rec_t, attn)   (differentiable)
    seat_backward(q, gamma, weight, attn, grad_rec_q, grad_rec_t) -> (dq, dgamma, dweight)
    seat_labels(q, gamma) -> labels
    seat_forward_folded(q, gamma, weight, values, bias, logit_bias, save_attn) -> (rec_q, rec_t, attn)
    seat_backward_folded(q, gamma, weight, values, logit_bias, attn, grad_rec_q, grad_rec_t)
        -> (dq, dgamma, dweight, dvalues, dlogit_bias)
    seat_labels_folded(q, gamma, logit_bias) -> labels

and, in kernels/seat_bn_split.py (the split BatchNorm backward), seat_backward_folded_sums and
seat_backward_folded_dq_affine.

The "folded" ops take V (B,N,C) explicitly and a logit bias lb (B,N) (logits tau (q Gamma^T +
lb)) and return the gradients of both, leaving the chain rule to autograd: the BatchNorm fold
(kernels/seat_bn_fold.py) builds its operands from Gamma, W and BN's scale and shift with small
differentiable torch ops.

They are opaque on purpose, not torch.library.triton_op: inductor then neither traces the
kernels nor works out which arguments they mutate. On the lent GPU's stack (torch 2.11 +
triton 3.6) that analysis fails for kernels that take runtime scalars (pytorch issues 170049,
173795) and inductor falls back to treating every input as mutated, cloning q around each launch.
These ops allocate their outputs and mutate nothing, so a compiled graph holds no copy of q
(tests/test_seat_compile.py reads inductor's output code to check it).

SeatReconstructFunction: seat_forward saving the attention, then seat_backward: exact for any
upstream gradient. SeatFusedLossFunction (eager only): the one-pass fused loss, whose first
backward rescales the precomputed dq in place (seat_fused_loss.py). Under torch.compile san_fast.ops
runs the loss as forward + backward instead: an in-place rescale of a tensor saved for the
backward is functionalized by AOTAutograd into a copy of dQ, which costs more than the second
pass it saves.
"""

from __future__ import annotations

from typing import Optional

import torch
from san_fast.kernels.seat_backward import MODE_GRADS, combine_through_values, launch_grad
from san_fast.kernels.seat_forward import seat_forward as launch_forward
from san_fast.kernels.seat_forward import seat_labels as launch_labels
from san_fast.kernels.seat_fused_loss import rescale_dq_, seat_fused_loss
from san_fast.kernels.seat_reference import loss_dtype


def _zeros_if_none(grad: Optional[torch.Tensor], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, device=like.device, dtype=like.dtype) if grad is None else grad


@torch.library.custom_op("san_fast::seat_forward", mutates_args=())
def seat_forward_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], save_attn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_forward(q, gamma, weight, bias, save_attn=save_attn)


@seat_forward_op.register_fake
def _forward_fake(q, gamma, weight, bias, save_attn):
    bsz, m, _ = q.shape
    c, n = weight.shape[0], gamma.shape[1]
    attn = q.new_empty((bsz, m, n) if save_attn else (0,))
    return q.new_empty((bsz, m, c)), q.new_empty((bsz, m, c)), attn


@torch.library.custom_op("san_fast::seat_backward", mutates_args=())
def seat_backward_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor,
    grad_rec_q: torch.Tensor, grad_rec_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, d_gamma, d_weight, _, s, _, _, _ = launch_grad(
        MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=grad_rec_q, grad_rec_t=grad_rec_t,
    )
    d_gamma, d_weight = combine_through_values(d_gamma, d_weight, s, gamma, weight)
    return dq, d_gamma, d_weight


@seat_backward_op.register_fake
def _(q, gamma, weight, attn, grad_rec_q, grad_rec_t):
    acc = loss_dtype(q)
    return torch.empty_like(q), gamma.new_empty(gamma.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc)


@torch.library.custom_op("san_fast::seat_labels", mutates_args=())
def seat_labels_op(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return launch_labels(q, gamma)


@seat_labels_op.register_fake
def _(q, gamma):
    return q.new_empty(q.shape[:2], dtype=torch.int64)


@torch.library.custom_op("san_fast::seat_forward_folded", mutates_args=())
def seat_forward_folded_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
    logit_bias: torch.Tensor, save_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_forward(q, gamma, weight, bias, save_attn=save_attn, values=values, logit_bias=logit_bias)


@seat_forward_folded_op.register_fake
def _(q, gamma, weight, values, bias, logit_bias, save_attn):
    return _forward_fake(q, gamma, weight, bias, save_attn)


@torch.library.custom_op("san_fast::seat_backward_folded", mutates_args=())
def seat_backward_folded_op(
    q: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, logit_bias: torch.Tensor,
    attn: torch.Tensor, grad_rec_q: torch.Tensor, grad_rec_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, d_gamma, d_weight, _, s, _, _, d_lb = launch_grad(
        MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=grad_rec_q, grad_rec_t=grad_rec_t,
        values=values, logit_bias=logit_bias,
    )
    # Views of one workspace: custom-op outputs may not alias each other, and at B = 1 (a DDP
    # rank's share, say) each view is already contiguous, so only a copy separates them.
    return dq, d_gamma.clone(), d_weight, s.clone(), d_lb.clone()


@seat_backward_folded_op.register_fake
def _(q, gamma, weight, values, logit_bias, attn, grad_rec_q, grad_rec_t):
    acc = loss_dtype(q)
    return (torch.empty_like(q), gamma.new_empty(gamma.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc),
            values.new_empty(values.shape, dtype=acc), logit_bias.new_empty(logit_bias.shape, dtype=acc))


@torch.library.custom_op("san_fast::seat_labels_folded", mutates_args=())
def seat_labels_folded_op(q: torch.Tensor, gamma: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    return launch_labels(q, gamma, logit_bias=logit_bias)


@seat_labels_folded_op.register_fake
def _(q, gamma, logit_bias):
    return q.new_empty(q.shape[:2], dtype=torch.int64)


def _no_zero_grads(ctx) -> None:
    """Undefined output gradients reach the backward as None instead of zeros. By default
    autograd fills one with zeros for every output the loss does not use, the non-differentiable
    ones included: a (B,M,N) buffer for the attention, and in the fused loss a Q-sized one for
    dq_pre (then a memset of it), for nothing."""
    ctx.set_materialize_grads(False)


def _rows_grad_sum(grad_rec_q: torch.Tensor, grad_rec_t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The bias's gradient (C,) in `acc`: both (B,M,C) gradients summed without a copy of either."""
    return grad_rec_q.sum((0, 1), dtype=acc) + grad_rec_t.sum((0, 1), dtype=acc)


def _bias_grad(ctx, grad_rec_q, grad_rec_t, acc, index):
    if ctx.bias_dtype is None or not ctx.needs_input_grad[index]:
        return None
    return _rows_grad_sum(grad_rec_q, grad_rec_t, acc).to(ctx.bias_dtype)


def _rec_grads(ctx, q, c, grad_rec_q, grad_rec_t):
    if not ctx.save_attn:
        raise RuntimeError("seat_forward ran with save_attn=False, so it kept nothing to differentiate with; "
                           "call it with save_attn=True (san_fast.ops.seat_reconstruct does) to backpropagate")
    shape = (q.shape[0], q.shape[1], c)
    return _zeros_if_none(grad_rec_q, shape, q), _zeros_if_none(grad_rec_t, shape, q)


class SeatReconstructFunction(torch.autograd.Function):
    """(q rows, gamma, W, bias, save_attn) -> (rec_q, rec_t, attn); attn is saved for the backward."""

    @staticmethod
    def forward(q, gamma, weight, bias, save_attn):
        return torch.ops.san_fast.seat_forward(q, gamma, weight, bias, save_attn)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, gamma, weight, bias, save_attn = inputs
        ctx.save_for_backward(q, gamma, weight, output[2])
        _no_zero_grads(ctx)
        ctx.save_attn = save_attn
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_rec_q, grad_rec_t, _grad_attn):
        q, gamma, weight, attn = ctx.saved_tensors
        grad_rec_q, grad_rec_t = _rec_grads(ctx, q, weight.shape[0], grad_rec_q, grad_rec_t)
        dq, d_gamma, d_weight = torch.ops.san_fast.seat_backward(q, gamma, weight, attn, grad_rec_q, grad_rec_t)
        d_bias = _bias_grad(ctx, grad_rec_q, grad_rec_t, d_gamma.dtype, 3)
        return dq, d_gamma.to(gamma.dtype), d_weight.to(weight.dtype), d_bias, None


class SeatFoldedFunction(torch.autograd.Function):
    """(q rows, gamma, W, V, bias, logit bias, save_attn) -> (rec_q, rec_t, attn) with
    rec_q = q W^T + bias, rec_t = softmax(tau (q gamma^T + lb)) V + bias; every input
    differentiable (V and lb included), the attention saved for the backward."""

    @staticmethod
    def forward(q, gamma, weight, values, bias, logit_bias, save_attn):
        return torch.ops.san_fast.seat_forward_folded(q, gamma, weight, values, bias, logit_bias, save_attn)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, gamma, weight, values, bias, logit_bias, save_attn = inputs
        ctx.save_for_backward(q, gamma, weight, values, logit_bias, output[2])
        _no_zero_grads(ctx)
        ctx.save_attn = save_attn
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, grad_rec_q, grad_rec_t, _grad_attn):
        q, gamma, weight, values, logit_bias, attn = ctx.saved_tensors
        grad_rec_q, grad_rec_t = _rec_grads(ctx, q, weight.shape[0], grad_rec_q, grad_rec_t)
        dq, d_gamma, d_weight, d_values, d_lb = torch.ops.san_fast.seat_backward_folded(
            q, gamma, weight, values, logit_bias, attn, grad_rec_q, grad_rec_t)
        d_bias = _bias_grad(ctx, grad_rec_q, grad_rec_t, d_gamma.dtype, 4)
        return (dq, d_gamma.to(gamma.dtype), d_weight.to(weight.dtype), d_values.to(values.dtype), d_bias,
                d_lb.to(logit_bias.dtype), None)


class SeatFusedLossFunction(torch.autograd.Function):
    """(q rows, gamma, W, bias, x rows, target_rec_q, h_rec, h_con[, V, lb, relay]) -> (L_rec, L_con, saved...).
    `relay`: the relay design's launch (seat_plan.loss_design) instead of the fused one.

    With V (B,N,C) and lb (B,N) given (the BatchNorm fold) the op is SeatFoldedFunction's
    followed by the losses, and V and lb get their own gradients. Eager only (san_fast.ops
    routes torch.compile to the two-pass Functions). Only the first two outputs are losses; then
    come the scaled residuals 2 (rec_q - x) / K and 2 (rec_t - target) / K (K = B M C) and the
    precomputed gradients the backward scales.

    The first backward through the graph scales dq_pre in place and returns it: no second
    dQ-sized buffer, no host sync. dq_pre is then gone, so a later backward through the same
    graph (retain_graph: gradients of each loss in turn, gradcheck) recomputes dq exactly with
    the two-pass kernels (one more forward and backward over Q); the host counts the calls."""

    @staticmethod
    def forward(q, gamma, weight, bias, x, target_rec_q, h_rec, h_con, values=None, logit_bias=None, relay=False):
        rec_q, rec_t, dq, d_gamma, d_weight, d_weight_u, d_values, d_lb = seat_fused_loss(
            q, gamma, weight, bias, x, target_rec_q, h_rec, h_con, values=values, logit_bias=logit_bias, relay=relay,
        )
        # The losses and the backward need only the residuals: formed in place in the kernel's own
        # (B,M,C) accumulation-dtype buffers and reduced by a norm, so neither makes a temporary
        # of that size (each 4.7% of Q's bytes at P = 128, where this design runs).
        k = rec_q.numel()
        res_con = rec_t.sub_(rec_q if target_rec_q else x)
        res_rec = rec_q.sub_(x)
        l_rec = torch.linalg.vector_norm(res_rec).square() / k
        l_con = torch.linalg.vector_norm(res_con).square() / k
        res_rec.mul_(2.0 / k)
        res_con.mul_(2.0 / k)
        return l_rec, l_con, res_rec, res_con, dq, d_gamma, d_weight, d_weight_u, d_values, d_lb

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, gamma, weight, bias, x, target_rec_q, h_rec, h_con, values, logit_bias = (*inputs, None, None)[:10]
        _, _, res_rec, res_con, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u, d_values_pre, d_lb_pre = output
        ctx.save_for_backward(q, gamma, weight, res_rec, res_con, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u,
                              values, logit_bias, d_values_pre, d_lb_pre)
        ctx.mark_non_differentiable(*[t for t in output[2:] if t is not None])
        _no_zero_grads(ctx)
        ctx.target_rec_q = target_rec_q
        ctx.h_rec, ctx.h_con = h_rec, h_con
        ctx.dtypes = (gamma.dtype, weight.dtype, None if bias is None else bias.dtype, x.dtype)
        ctx.backward_calls = 0

    @staticmethod
    def backward(ctx, grad_rec, grad_con, *_unused):
        (q, gamma, weight, u, w_res, dq_pre, d_gamma_pre, d_weight_pre, d_weight_u,
         values, logit_bias, d_values_pre, d_lb_pre) = ctx.saved_tensors
        gamma_dtype, weight_dtype, bias_dtype, x_dtype = ctx.dtypes
        ctx.backward_calls += 1
        acc = u.dtype
        grad_rec = u.new_zeros(()) if grad_rec is None else grad_rec.to(acc)
        grad_con = u.new_zeros(()) if grad_con is None else grad_con.to(acc)
        # Upstream (g_rec, g_con) against the hint (h_rec, h_con): see kernels/seat_fused_loss.py.
        a = grad_con / ctx.h_con
        b = grad_rec - a * ctx.h_rec
        needs = ctx.needs_input_grad
        dq = d_gamma = d_weight = d_bias = dx = None
        if needs[0] and ctx.backward_calls == 1:
            # In place, decided on the device: no host sync, no second dQ-sized buffer.
            dq = rescale_dq_(dq_pre, u, weight, torch.stack([a, b]))
        elif needs[0]:
            grad_rec_t = grad_con * w_res
            grad_rec_q = grad_rec * u - (grad_rec_t if ctx.target_rec_q else 0.0)
            dq = _exact_dq(q, gamma, weight, values, logit_bias, grad_rec_q.to(q.dtype), grad_rec_t.to(q.dtype))
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
        d_values = (a * d_values_pre).to(values.dtype) if values is not None and needs[8] else None
        d_lb = (a * d_lb_pre).to(logit_bias.dtype) if logit_bias is not None and needs[9] else None
        return dq, d_gamma, d_weight, d_bias, dx, None, None, None, d_values, d_lb, None


def _exact_dq(q, gamma, weight, values, logit_bias, grad_rec_q, grad_rec_t) -> torch.Tensor:
    """dq by the two-pass kernels (forward saving the attention, then the backward)."""
    if values is None:
        _, _, attn = torch.ops.san_fast.seat_forward(q, gamma, weight, None, True)
        return torch.ops.san_fast.seat_backward(q, gamma, weight, attn, grad_rec_q, grad_rec_t)[0]
    _, _, attn = torch.ops.san_fast.seat_forward_folded(q, gamma, weight, values, None, logit_bias, True)
    return torch.ops.san_fast.seat_backward_folded(q, gamma, weight, values, logit_bias, attn, grad_rec_q,
                                                   grad_rec_t)[0]


# The forward op is differentiable on its own too (e.g. for torch.export users), with the same
# formulas as the autograd.Function the public functions go through.
torch.library.register_autograd(
    "san_fast::seat_forward", SeatReconstructFunction.backward, setup_context=SeatReconstructFunction.setup_context
)

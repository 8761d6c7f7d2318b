"""No SEAT backward allocates a buffer the loss never asked for.

By default autograd hands a custom Function's backward a zeros tensor for every output whose
gradient is undefined, non-differentiable outputs included: the saved attention (B,M,N), and in
the fused loss dq_pre, a Q-sized buffer (and a memset over it). The Functions switch that off
(ctx.set_materialize_grads(False)); these tests watch the allocations of a forward and backward
with the profiler's memory events (CPU, the Triton interpreter) and fail on any zero-filled
buffer of the attention's size or more, and check the gradients still match the reference when a
loss term is left out (its gradient then arrives as None).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from san_fast import ops
from san_fast.kernels.channel_moments import channel_moments_reference
from san_fast.kernels.seat_bn_fold import BatchStats

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the profiler's CPU memory events: CPU only")

B, P, H, W, N, C = 2, 48, 9, 10, 6, 3
ZERO_FILLS = ("aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::full", "aten::fill_", "aten::zero_")


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, P, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(B, N, P, generator=gen)
    weight = torch.randn(C, P, 1, 1, generator=gen) / P ** 0.5
    bias = torch.randn(C, generator=gen)
    x = torch.randn(B, C, H, W, generator=gen).to(dtype)
    return [t.requires_grad_() for t in (q, gamma, weight, bias)], x


def _stats(q):
    bn_w = torch.rand(P, requires_grad=True)
    bn_b = torch.randn(P, requires_grad=True)
    mean, var = channel_moments_reference(q.detach())
    return BatchStats(mean, var, bn_w, bn_b, 1e-5)


def _case(name, params, x):
    q, gamma, weight, bias = params
    if name == "reconstruct":
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton")
        return rec_q.square().sum() + rec_t.sum()
    if name == "reconstruct_rec_q_only":
        rec_q, _ = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton")
        return rec_q.square().sum()
    if name == "folded":
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton",
                                            affine=(torch.rand(P) + 0.5, torch.randn(P)))
        return rec_q.square().sum() + rec_t.sum()
    if name == "batchnorm":
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton", affine=_stats(q))
        return rec_q.square().sum() + rec_t.sum()
    _, design, terms = name.split(":")
    l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton", design=design)
    return sum(t for t, key in ((l_rec, "rec"), (l_con, "con")) if key in terms.split("+"))


CASES = ["reconstruct", "reconstruct_rec_q_only", "folded", "batchnorm",
         "loss:fused:rec+con", "loss:fused:rec", "loss:fused:con", "loss:relay:rec+con", "loss:relay:con",
         "loss:two_pass:rec+con"]


def _zero_fills(name: str) -> list[tuple[str, int]]:
    params, x = _inputs()
    loss = _case(name, params, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(loss, params[:1])
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.name in ZERO_FILLS and e.cpu_memory_usage > 0]


@pytest.mark.parametrize("name", CASES)
def test_backward_fills_no_buffer_with_zeros(name):
    attention_bytes = B * H * W * N * 4
    big = [(op, nbytes) for op, nbytes in _zero_fills(name) if nbytes >= attention_bytes]
    assert not big, f"{name}: zero-filled buffers of the attention's size or more in the backward: {big}"


def test_the_watch_sees_a_materialized_zeros():
    """The check above can fail: a Function that leaves grads materialized is caught."""

    class Materialized(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q * 2, torch.empty(B * H * W, N)

        @staticmethod
        def backward(ctx, grad, _grad_attn):
            return grad * 2

    q = torch.randn(B, P, requires_grad=True)
    out, _ = Materialized.apply(q)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.autograd.grad(out.sum(), q)
    fills = [e.cpu_memory_usage for e in prof.events() if e.name in ZERO_FILLS and e.cpu_memory_usage > 0]
    assert any(n >= B * H * W * N * 4 for n in fills)


@pytest.mark.parametrize("design", ["fused", "relay", "two_pass"])
@pytest.mark.parametrize("term", ["rec", "con"])
def test_one_loss_term_gradients_match_reference(design, term):
    """With one loss term unused its gradient arrives as None: the gradients are still exact."""
    params, x = _inputs()
    l_rec, l_con = ops.seat_reconstruct_loss(*params, x, impl="triton", design=design)
    got = torch.autograd.grad(l_rec if term == "rec" else l_con, params, allow_unused=True)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    r_rec, r_con = ops.seat_reconstruct_loss(*ref_params, x.double(), impl="torch")
    want = torch.autograd.grad(r_rec if term == "rec" else r_con, ref_params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None or not w.abs().max() > 0:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert g is not None and torch.isfinite(g).all()
        rel = (g.double() - w).abs().max() / w.abs().max()
        assert rel < 1e-4, rel

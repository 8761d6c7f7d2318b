"""The split BatchNorm backward (kernels/seat_bn_split.py): the gradient kernel's two new passes,
the Function against BatchNorm then the float64 reference, the ops' routing of BatchStats, the
SAN model on the split path against the unfused one, and compiled code that hands the dq pass's
output straight to the convolution's backward (no elementwise pass over Q after it).

Shapes are odd on purpose (M = 35 rows, ragged for every block; N = 5; P = 40, not a multiple
of 16). fp32 and fp16 run in the Triton interpreter on the CPU; bf16 only on a GPU (marked gpu).
Outputs are poisoned (NaN) before each launch, so an element left unwritten fails.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from san_fast import ops
from san_fast.kernels import seat_bn_split
from san_fast.kernels.seat_backward import MODE_GRADS, launch_grad
from san_fast.kernels.seat_bn_fold import BatchStats
from san_fast.kernels.seat_forward import seat_forward
from san_fast.kernels.seat_reference import losses, seat_reconstruct_loss_reference
from san_fast.model.sync_batchnorm import batch_stats
from test_seat_bn_fold import leaves
from test_seat_configs import rel_err

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NAN = float("nan")
B, P, H, W, N, C = 2, 40, 5, 7, 5, 3
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _grad_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = H * W
    q = torch.randn(B, m, P, generator=gen).to(DEVICE, dtype)
    gamma = torch.randn(B, N, P, generator=gen).to(DEVICE)
    weight = (torch.randn(C, P, generator=gen) / math.sqrt(P)).to(DEVICE)
    values, lb = torch.randn(B, N, C, generator=gen).to(DEVICE), torch.randn(B, N, generator=gen).to(DEVICE)
    _, _, attn = seat_forward(q, gamma, weight, None, save_attn=True, values=values, logit_bias=lb)
    grads = [torch.randn(B, m, C, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    return q, gamma, weight, dict(attn=attn, grad_rec_q=grads[0], grad_rec_t=grads[1], values=values, logit_bias=lb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sums_pass_equals_the_full_kernel_and_writes_no_dq(dtype):
    q, gamma, weight, kw = _grad_inputs(dtype)
    full = launch_grad(MODE_GRADS, q, gamma, weight, None, **kw)
    sums = launch_grad(MODE_GRADS, q, gamma, weight, None, with_dq=False, workspace_fill=NAN, **kw)
    assert sums[0] is None
    for i, name in ((1, "dGamma"), (2, "dW"), (4, "S"), (7, "d logit bias")):
        assert not torch.isnan(sums[i]).any(), name
        assert torch.equal(sums[i], full[i]), name  # the same sums, in the same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dq_affine_pass_adds_alpha_and_beta_q(dtype):
    q, gamma, weight, kw = _grad_inputs(dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    alpha, beta = torch.randn(P, generator=gen).to(DEVICE), torch.randn(P, generator=gen).to(DEVICE)
    full = launch_grad(MODE_GRADS, q, gamma, weight, None, **kw)[0]
    out = launch_grad(MODE_GRADS, q, gamma, weight, None, dq_affine=(alpha, beta), dq=torch.full_like(q, NAN), **kw)
    assert all(t is None for t in out[1:])
    want = full.double() + alpha.double() + beta.double() * q.double()
    assert not torch.isnan(out[0]).any()
    assert rel_err(out[0], want) < TOL[dtype]


def test_pass_arguments_are_checked():
    q, gamma, weight, kw = _grad_inputs(torch.float32)
    with pytest.raises(ValueError, match="cannot go with with_dq=False"):
        launch_grad(MODE_GRADS, q, gamma, weight, None, with_dq=False, dq_affine=(q[0, 0], q[0, 0]), **kw)
    with pytest.raises(ValueError, match=r"alpha must have shape \(40,\)"):
        launch_grad(MODE_GRADS, q, gamma, weight, None, dq_affine=(q[0, 0, :3], q[0, 0]), **kw)


def _leaves(dtype, seed=0, with_bias=True):
    """test_seat_bn_fold's leaves (same shapes), optionally without the conv bias."""
    out = leaves(dtype, seed)
    if not with_bias:
        out[5] = None
    return out


def _rows(t):
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def _loss_and_grads(leaves, split: bool, dtype):
    y, bn_w, bn_b, gamma, weight, bias, x = leaves
    params = [t for t in (y, bn_w, bn_b, gamma, weight, bias) if t is not None]
    if split:
        ts = [t.detach().requires_grad_() for t in params]
        y_, bn_w_, bn_b_, gamma_, weight_, *bias_ = ts
        y_cl = y_.contiguous(memory_format=torch.channels_last)
        var, mean = torch.var_mean(y_cl.detach().float(), dim=(0, 2, 3), correction=0)
        rec_q, rec_t = seat_bn_split.seat_batchnorm(_rows(y_cl), BatchStats(mean, var, bn_w_, bn_b_, 1e-5), gamma_,
                                                    weight_, bias_[0] if bias_ else None)
        l_rec, l_con = losses(rec_q, rec_t, _rows(x), False, torch.float32)
    else:  # BatchNorm writes Q, then the PyTorch reference, all in float64
        ts = [t.detach().double().requires_grad_() for t in params]
        y_, bn_w_, bn_b_, gamma_, weight_, *bias_ = ts
        q = F.batch_norm(y_, None, None, bn_w_, bn_b_, training=True)
        l_rec, l_con = seat_reconstruct_loss_reference(_rows(q), gamma_, weight_, bias_[0] if bias_ else None,
                                                       _rows(x.double()), "image")
    total = 0.7 * l_rec + 1.3 * l_con
    return [total] + list(torch.autograd.grad(total, ts))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_function_matches_batchnorm_then_reference(dtype, with_bias):
    leaves = _leaves(dtype, with_bias=with_bias)
    got = _loss_and_grads(leaves, True, dtype)
    want = _loss_and_grads(leaves, False, dtype)
    names = ["loss", "y", "bn weight", "bn bias", "gamma", "W", "bias"][:len(want)]
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_function_matches_batchnorm_then_reference_bf16_gpu():
    leaves = _leaves(torch.bfloat16)
    for name, g, w in zip(["loss", "y", "bn weight", "bn bias", "gamma", "W", "bias"],
                          _loss_and_grads(leaves, True, torch.bfloat16), _loss_and_grads(leaves, False, None)):
        assert torch.isfinite(g).all() and rel_err(g, w) < 3e-2, (name, rel_err(g, w))


def _stats_of(y, bn_w, bn_b):
    var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3), correction=0)
    return BatchStats(mean, var, bn_w, bn_b, 1e-5)


@pytest.mark.parametrize("design,split", [("two_pass", True), ("fused", False), ("relay", False)])
def test_ops_route_batch_stats(monkeypatch, design, split):
    """Two-pass: the split Function; fused (eager): the given statistics attached to q, the fold's
    (scale, shift) path; torch: the reference on BN(q). All give BatchNorm's gradients."""
    calls = []
    original = seat_bn_split.seat_batchnorm
    monkeypatch.setattr(seat_bn_split, "seat_batchnorm", lambda *a: calls.append(1) or original(*a))
    y, bn_w, bn_b, gamma, weight, bias, x = _leaves(torch.float32)
    results = {}
    for impl in ("triton", "torch"):
        ts = [t.detach().requires_grad_() for t in (y, bn_w, bn_b, gamma, weight, bias)]
        kw = dict(design=design) if impl == "triton" else {}
        out = ops.seat_reconstruct_loss(ts[0], *ts[3:], x, impl=impl, affine=_stats_of(*ts[:3]), **kw)
        results[impl] = [out[0] + out[1]] + list(torch.autograd.grad(out[0] + out[1], ts))
    assert len(calls) == int(split)
    for name, g, w in zip(["loss", "y", "bn weight", "bn bias", "gamma", "W", "bias"], *results.values()):
        assert rel_err(g, w) < 1e-4, name


def test_auto_design_weighs_the_statistics_backward(monkeypatch):
    """design='auto' with a BatchStats affine asks the planner with bn_stats (the two-pass design
    carrying the statistics' backward against the one-pass designs plus it), then runs what it
    answers: the split Function for two_pass, the relay kernel otherwise."""
    from san_fast.kernels import seat_plan

    split_calls, asked = [], []
    original = seat_bn_split.seat_batchnorm
    monkeypatch.setattr(seat_bn_split, "seat_batchnorm", lambda *a: split_calls.append(1) or original(*a))
    y, bn_w, bn_b, gamma, weight, bias, x = _leaves(torch.float32)
    want = ops.seat_reconstruct_loss(y, gamma, weight, bias, x, impl="torch", affine=_stats_of(y, bn_w, bn_b))
    for answer in ("two_pass", "relay"):
        monkeypatch.setattr(seat_plan, "loss_design", lambda *a: asked.append(a[7:]) or answer)
        got = ops.seat_reconstruct_loss(y.detach().requires_grad_(), gamma, weight, bias, x, impl="triton",
                                        affine=_stats_of(y, bn_w, bn_b))
        assert all(rel_err(g, w) < 1e-4 for g, w in zip(got, want)), answer
    assert asked == [(True,), (True,)] and split_calls == [1]


def test_ops_reconstruct_and_labels_take_batch_stats():
    y, bn_w, bn_b, gamma, weight, bias, _ = _leaves(torch.float32)
    stats = _stats_of(y, bn_w, bn_b)
    q = F.batch_norm(y, None, None, bn_w, bn_b, training=True)
    for impl in ("triton", "torch"):
        got = ops.seat_reconstruct(y, gamma, weight, bias, impl=impl, affine=stats)
        want = ops.seat_reconstruct(q, gamma, weight, bias, impl="torch")
        assert all(rel_err(g, w) < 1e-4 for g, w in zip(got, want))
        assert torch.equal(ops.seat_labels(y, gamma, impl=impl, affine=stats), ops.seat_labels(q, gamma, impl="torch"))
    with pytest.raises(ValueError, match=r"BatchStats var must be \(P,\)=\(40,\)"):
        ops.seat_reconstruct(y, gamma, weight, bias, affine=stats._replace(var=stats.var[:3]))


def test_batch_stats_updates_running_statistics_like_batchnorm2d_and_steps_aside():
    bn, twin = torch.nn.BatchNorm2d(P, momentum=0.3), torch.nn.BatchNorm2d(P, momentum=0.3)
    y = _leaves(torch.float32)[0]
    stats = batch_stats(bn, y)
    twin(y)
    assert torch.allclose(bn.running_mean, twin.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, twin.running_var, rtol=1e-5)
    assert torch.equal(bn.num_batches_tracked, twin.num_batches_tracked)
    assert not stats.mean.requires_grad and stats.weight is bn.weight
    with torch.no_grad():
        assert batch_stats(bn, y) is None  # nothing to differentiate: the fold's (scale, shift) serves
    assert batch_stats(bn.eval(), y) is None


def test_model_on_the_split_path_matches_unfused(monkeypatch):
    from test_seat_bn_fold import twin_models

    calls = []
    original = seat_bn_split.SeatBatchNormFunction.apply
    monkeypatch.setattr(seat_bn_split.SeatBatchNormFunction, "apply", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(ops, "_loss_design", lambda *a, **k: "two_pass")
    unfused, folded = twin_models()
    x = torch.randn(3, 3, 32, 32)
    want, _, _ = unfused.losses(x)
    got, q_got, _ = folded.losses(x)
    assert calls == [1] and isinstance(q_got, ops.FoldedQ)
    want["loss"].backward()
    got["loss"].backward()
    for (name, p_got), p_want in zip(folded.named_parameters(), unfused.parameters()):
        if p_want.grad is not None:
            assert rel_err(p_got.grad, p_want.grad) < 1e-3, name
    for (name, b_got), b_want in zip(folded.named_buffers(), unfused.buffers()):
        assert torch.allclose(b_got.double(), b_want.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(CUDA, reason="the CPU check of inductor's C++ code")
def test_compiled_split_hands_dq_to_the_convolution_backward():
    """In the compiled backward, the dq pass's output is convolution_backward's input as it
    is; with the fold's autograd path (batch_affine) a fused elementwise kernel sits between."""
    from test_seat_compile import FoldedStep, Step, _compiled_step_codes, check_folded_never_writes_q

    class SplitStep(Step):
        def forward(self, x):
            y = self.conv(x)
            l_rec, l_con = ops.seat_reconstruct_loss(y, self.gamma, self.recon.weight, self.recon.bias, x,
                                                     impl="triton", affine=batch_stats(self.bn, y))
            return l_rec + l_con, y.numel()

    def conv_input_producer(codes):
        backward = next(c for c in codes if "san_fast.seat_backward" in c)
        conv_in = re.search(r"aten\.convolution_backward\.default\((?:reinterpret_tensor\()?(buf\d+)", backward).group(1)
        return re.search(rf"assert_size_stride\({conv_in}, .*'torch\.ops\.san_fast\.(\w+)\.default'", backward)

    q_numel, codes = _compiled_step_codes(SplitStep)
    check_folded_never_writes_q(codes, q_numel)
    producer = conv_input_producer(codes)
    assert producer and producer.group(1) == "seat_backward_folded_dq_affine"
    assert "seat_backward_folded.default" not in "".join(codes)
    _, codes = _compiled_step_codes(FoldedStep)
    assert conv_input_producer(codes) is None  # the check tells the two apart


def test_gradcheck_float64():
    """Finite differences through the statistics too: they are recomputed from the perturbed y
    on every call, detached, as the model computes them."""
    gen = torch.Generator().manual_seed(5)
    b, p, h, w, n, c = 1, 16, 2, 3, 3, 2  # small: every element costs two interpreted calls
    y = (torch.randn(b, p, h, w, generator=gen, dtype=torch.float64) * 2 + 1).to(DEVICE).requires_grad_()
    bn_w = (0.5 + torch.rand(p, generator=gen, dtype=torch.float64)).to(DEVICE).requires_grad_()
    bn_b = torch.randn(p, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    gamma = torch.randn(b, n, p, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = (torch.randn(c, p, generator=gen, dtype=torch.float64) / 4).to(DEVICE).requires_grad_()
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    def fn(y, bn_w, bn_b, gamma, weight, bias):
        var, mean = torch.var_mean(y.detach(), dim=(0, 2, 3), correction=0)
        return seat_bn_split.seat_batchnorm(_rows(y), BatchStats(mean, var, bn_w, bn_b, 1e-5), gamma, weight, bias)

    assert torch.autograd.gradcheck(fn, (y, bn_w, bn_b, gamma, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-4)


def _compiled_ddp_rank(rank: int):
    """One of 2 gloo ranks: its image through GlobalBatchNorm's statistics and the split
    backward, eager and compiled (aot_eager: dynamo and AOTAutograd trace the backward, the
    statistics' gradients summed over ranks by the functional collective); returns both."""
    import torch.distributed as dist
    from san_fast.model.sync_batchnorm import GlobalBatchNorm

    dist.init_process_group("gloo")
    try:
        y, bn_w, bn_b, gamma, weight, bias, x = (t[rank:rank + 1] if i in (0, 3, 6) else t
                                                 for i, t in enumerate(leaves(torch.float32, seed=7)))
        bn = GlobalBatchNorm(P)
        with torch.no_grad():
            bn.weight.copy_(bn_w), bn.bias.copy_(bn_b)

        def step(y):
            stats = batch_stats(bn, y)
            l_rec, l_con = ops.seat_reconstruct_loss(y, gamma, weight, bias, x, impl="triton", design="two_pass",
                                                     affine=stats)
            return l_rec + l_con

        out = []
        for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
            y_ = y.clone().requires_grad_()
            bn.weight.grad = None
            fn(y_).backward()
            out.append((y_.grad, bn.weight.grad.clone()))
        return out
    finally:
        dist.destroy_process_group()


def test_compiled_split_under_ddp_matches_eager():
    from spawn_ranks import run_ranks

    for eager, compiled in run_ranks(_compiled_ddp_rank, 2, timeout=240):
        for got, want in zip(compiled, eager):
            assert rel_err(got, want) < 1e-5

"""BatchNorm folded into the SEAT kernels (kernels/seat_bn_fold.py) against the unfused model.

The reference is the existing one applied to Q = BN(y): torch's own batch_norm (training mode,
batch statistics) followed by the plain-PyTorch SEAT op, in float64. Checked: the folded
kernels' raw outputs (logit bias, explicit V, the logit-bias gradient) with poisoned buffers;
forward and every gradient (y, BN weight and bias, gamma, W, bias, x) of the three public ops in
fp32 and fp16 (Triton interpreter) and bf16 (GPU), both loss designs, odd shapes; BN's running
statistics and eval mode against nn.BatchNorm2d; the SAN model folded (Triton) against unfused
(PyTorch): losses, every parameter gradient, running statistics, predictions, the collapse
monitor, state dicts in both directions; and the one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from san_fast import ops
from san_fast.config import Config, ConfigError
from san_fast.kernels.seat_backward import MODE_GRADS, launch_grad
from san_fast.kernels.seat_forward import seat_forward, seat_labels
from san_fast.kernels.seat_fused_loss import seat_fused_loss
from san_fast.kernels.seat_plan import MODE_LOSS_IMAGE, MODE_LOSS_REC_Q
from san_fast.model import SAN
from san_fast.model.sync_batchnorm import batch_affine
from san_fast.train_step import semantic_wins
from test_seat_configs import check, rel_err  # fp32 within 1e-4 of float64; fp16 twice torch's error

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NAN = float("nan")
# Odd on purpose: N not a power of two, M = 35 rows (ragged for every block), P not a multiple of 16.
B, P, H, W, N, C = 2, 40, 5, 7, 5, 3


def leaves(dtype, seed=0, p=P):
    """y (B,P,H,W) in dtype (a conv output, mean and scale far from 0 and 1), BN weight and bias,
    gamma (B,N,P), W, bias (fp32 masters), x (B,C,H,W) in dtype."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(B, p, H, W, generator=gen) * (1 + torch.rand(p, 1, 1, generator=gen) * 3) \
        + torch.randn(p, 1, 1, generator=gen) * 2
    bn_w, bn_b = 0.5 + torch.rand(p, generator=gen), torch.randn(p, generator=gen)
    gamma = torch.randn(B, N, p, generator=gen)
    weight = torch.randn(C, p, generator=gen) / math.sqrt(p)
    bias = torch.randn(C, generator=gen)
    x = torch.randn(B, C, H, W, generator=gen)
    out = [y.to(dtype), bn_w, bn_b, gamma, weight, bias, x.to(dtype)]
    return [t.to(DEVICE) for t in out]


def bn_affine_of(y, bn_w, bn_b):
    var, mean = torch.var_mean(y.to(bn_w.dtype), dim=(0, 2, 3), correction=0)
    scale = bn_w * torch.rsqrt(var + 1e-5)
    return scale, bn_b - mean * scale


def run(op, impl, ts, dtype, upstream):
    """The op and the gradients of every leaf. impl "unfused": torch's batch_norm writes Q and
    the PyTorch reference reads it; "triton": the folded kernels read y."""
    ts = [t.detach().to(dtype if i in (0, 6) else (torch.float64 if dtype == torch.float64 else t.dtype))
          .requires_grad_() for i, t in enumerate(ts)]
    y, bn_w, bn_b, gamma, weight, bias, x = ts
    if impl == "unfused":
        q = F.batch_norm(y.to(bn_w.dtype), None, None, bn_w, bn_b, training=True).to(y.dtype)
        kwargs = dict(impl="torch")
    else:
        q, kwargs = y, dict(impl="triton", affine=bn_affine_of(y, bn_w, bn_b))
    if op == "reconstruct":
        outs = ops.seat_reconstruct(q, gamma, weight, bias, **kwargs)
        total = sum((o.to(u.dtype) * u).sum() for o, u in zip(outs, upstream))
    else:
        design = op.split(":")[1]
        if impl == "triton":
            kwargs["design"] = design
        outs = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, consistency_target="rec_q" if
                                         design == "fused" else "image", loss_weights=(0.7, 1.3), **kwargs)
        total = 0.7 * outs[0] + 1.3 * outs[1]
    grads = torch.autograd.grad(total, ts, allow_unused=True)
    names = ["y", "bn weight", "bn bias", "gamma", "W", "bias", "x"]
    out = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    out.update({f"d {n}": g for n, g in zip(names, grads) if g is not None})
    return out


def compare(op, dtype, seed=0, p=P):
    ts = leaves(dtype, seed, p)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(B, H * W, C, generator=gen).to(DEVICE) for _ in range(2)]
    got = run(op, "triton", ts, dtype, upstream)
    ref = run(op, "unfused", ts, torch.float64, upstream)
    low = run(op, "unfused", ts, dtype, upstream) if dtype != torch.float32 else ref
    expected = {"out0", "out1", "d y", "d bn weight", "d bn bias", "d gamma", "d W", "d bias"}
    assert expected <= set(got), set(got)
    if op != "reconstruct":
        assert "d x" in got
    assert set(got) == set(ref)
    for name in got:
        check(f"{op} {name}", got[name], ref[name], low[name], dtype)


OPS = ["reconstruct", "loss:two_pass", "loss:fused", "loss:relay"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_folded_ops_match_batchnorm_then_reference(op, dtype):
    compare(op, dtype, seed=OPS.index(op))


def test_folded_ops_with_p_a_multiple_of_16():
    compare("loss:fused", torch.float32, seed=7, p=48)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_folded_ops_bf16_gpu(op):
    compare(op, torch.bfloat16, seed=3)


def test_folded_labels_match_batchnorm_then_argmax():
    y, bn_w, bn_b, gamma, *_ = leaves(torch.float32, seed=4)
    scale, shift = bn_affine_of(y, bn_w, bn_b)
    got = ops.seat_labels(y, gamma, impl="triton", affine=(scale, shift))
    q = F.batch_norm(y.double(), None, None, bn_w.double(), bn_b.double(), training=True)
    logits = ops.as_rows(q) @ gamma.double().transpose(1, 2)
    picked = logits.gather(-1, got.unsqueeze(-1)).squeeze(-1)
    assert (picked >= logits.amax(-1) - 1e-4 * logits.abs().amax(-1)).all()
    assert torch.equal(ops.seat_labels(ops.FoldedQ(y, scale, shift), gamma, impl="triton"), got)
    assert torch.equal(ops.seat_labels(y, gamma, impl="torch", affine=(scale, shift)), got)


# --------------------------------------------------------------------------- the kernels' own outputs


def general_reference(q, gamma, weight, values, bias, lb):
    """rec_q = q W^T + bias, rec_t = softmax(tau (q Gamma^T + lb)) V + bias, float64."""
    q, gamma, weight, values, bias, lb = (t.double() for t in (q, gamma, weight, values, bias, lb))
    attn = torch.softmax((q @ gamma.transpose(1, 2) + lb[:, None, :]) / math.sqrt(q.shape[-1]), -1)
    return q @ weight.t() + bias, attn @ values + bias, attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_take_a_logit_bias_and_values_and_return_their_gradients(dtype):
    """Launchers directly, outputs and workspace poisoned with NaN: the forward and the labels
    with lb and V, the gradient kernel's logit-bias column sums (MODE_GRADS and both loss modes)."""
    gen = torch.Generator().manual_seed(11)
    m, p = 35, 40
    q = torch.randn(B, m, p, generator=gen).to(dtype)
    gamma, weight = torch.randn(B, N, p, generator=gen), torch.randn(C, p, generator=gen) / math.sqrt(p)
    values, bias = torch.randn(B, N, C, generator=gen), torch.randn(C, generator=gen)
    lb = torch.randn(B, N, generator=gen) * 3
    x, g_q, g_t = (torch.randn(B, m, C, generator=gen).to(dtype) for _ in range(3))
    q64 = q.double().requires_grad_()
    g64, w64, v64, lb64 = (t.double().requires_grad_() for t in (gamma.to(dtype), weight.to(dtype), values, lb))
    rec_q, rec_t, attn = general_reference(q64, g64, w64, v64, bias, lb64)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    poisoned = tuple(torch.full(s, NAN, dtype=dtype) for s in ((B, m, C), (B, m, C), (B, m, N)))
    got = seat_forward(q, gamma, weight, bias, save_attn=True, out=poisoned, values=values, logit_bias=lb)
    for name, g, r in zip(("rec_q", "rec_t", "attn"), got, (rec_q, rec_t, attn)):
        assert torch.isfinite(g).all() and rel_err(g, r.detach()) < tol, name
    labels = seat_labels(q, gamma, out=torch.full((B, m), -1, dtype=torch.int64), logit_bias=lb)
    assert torch.equal(labels, attn.argmax(-1)) or rel_err(attn.gather(-1, labels[..., None]),
                                                          attn.amax(-1, keepdim=True)) < tol
    d_q, d_g, d_w, d_v, d_lb = torch.autograd.grad((rec_q, rec_t), (q64, g64, w64, v64, lb64),
                                                   (g_q.double(), g_t.double()), retain_graph=True)
    dq, dg, dw, _, s, _, _, dlb = launch_grad(MODE_GRADS, q, gamma, weight, None, attn=got[2], grad_rec_q=g_q,
                                              grad_rec_t=g_t, values=values, logit_bias=lb,
                                              dq=torch.full_like(q, NAN), workspace_fill=NAN)
    for name, g, r in zip(("dq", "dgamma", "dW", "dV", "dlb"), (dq, dg, dw, s, dlb), (d_q, d_g, d_w, d_v, d_lb)):
        assert torch.isfinite(g).all() and rel_err(g, r) < 10 * tol, name
    for mode in (MODE_LOSS_IMAGE, MODE_LOSS_REC_Q):
        out = seat_fused_loss(q, gamma, weight, bias, x, mode == MODE_LOSS_REC_Q, 1.0, 1.0, values=values,
                              logit_bias=lb, dq=torch.full_like(q, NAN), workspace_fill=NAN)
        target = rec_q if mode == MODE_LOSS_REC_Q else x.double()
        l_rec, l_con = (rec_q - x.double()).pow(2).mean(), (rec_t - target).pow(2).mean()
        want = torch.autograd.grad(l_rec + l_con, (q64, g64, v64, lb64), retain_graph=True)
        for name, g, r in zip(("dq", "dgamma", "dV", "dlb"), (out[2], out[3], out[6], out[7]), want):
            assert torch.isfinite(g).all() and rel_err(g, r) < 10 * tol, f"mode {mode} {name}"


# --------------------------------------------------------------------------- BatchNorm's statistics


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm2d_and_eval_uses_them(momentum):
    torch.manual_seed(0)
    ours, theirs = torch.nn.BatchNorm2d(P, momentum=momentum), torch.nn.BatchNorm2d(P, momentum=momentum)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(0.5, 2, P))
            bn.bias.copy_(torch.linspace(-1, 1, P))
    for step in range(3):
        y = torch.randn(3, P, 4, 6) * (step + 1) + step
        scale, shift = batch_affine(ours, y)
        want = theirs(y)
        got = y * scale.view(1, P, 1, 1) + shift.view(1, P, 1, 1)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).double(), getattr(theirs, name).double(), rtol=1e-6), name
    ours.eval(), theirs.eval()
    y = torch.randn(2, P, 3, 3) * 4
    scale, shift = batch_affine(ours, y)
    assert torch.allclose(y * scale.view(1, P, 1, 1) + shift.view(1, P, 1, 1), theirs(y), rtol=1e-5, atol=1e-5)
    assert int(ours.num_batches_tracked) == 3  # evaluation leaves the statistics alone
    with pytest.raises(ValueError, match=r"expected y \(B,40,H,W\)"):
        batch_affine(ours, torch.randn(2, P + 1, 3, 3))


# --------------------------------------------------------------------------- the model


def tiny(**overrides) -> Config:
    base = dict(crop_size=32, embed_dim=24, vit_dim=16, vit_heads=2, vit_depth=1, synthetic_classes=5,
                device="cpu")
    return Config(**{**base, **overrides}).validate()


def twin_models(encoder="conv3x3", **overrides):
    torch.manual_seed(0)
    unfused = SAN(tiny(seat_impl="torch", encoder=encoder, **overrides))
    folded = SAN(tiny(seat_impl="triton", fold_bn="on", encoder=encoder, **overrides))
    folded.load_state_dict(unfused.state_dict())
    return unfused, folded


@pytest.mark.parametrize("encoder,target", [("conv3x3", "image"), ("resnet18", "rec_q")])
def test_model_folded_matches_unfused_losses_gradients_statistics(encoder, target):
    unfused, folded = twin_models(encoder, consistency_target=target)
    assert folded.folds_bn(torch.device("cpu")) and not unfused.folds_bn(torch.device("cpu"))
    side = 16 if encoder == "resnet18" else 32  # the ResNet trunk is the slow part under 2 cores
    x = torch.randn(3, 3, side, side)
    want, q_want, g_want = unfused.losses(x)
    got, q_got, g_got = folded.losses(x)
    assert isinstance(q_got, ops.FoldedQ) and not isinstance(q_want, ops.FoldedQ)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-6), key
    want["loss"].backward()
    got["loss"].backward()
    for (name, p_got), p_want in zip(folded.named_parameters(), unfused.parameters()):
        if p_want.grad is None:
            assert p_got.grad is None, name
            continue
        assert rel_err(p_got.grad, p_want.grad) < 1e-3, name
    for (name, b_got), b_want in zip(folded.named_buffers(), unfused.buffers()):
        assert torch.allclose(b_got.double(), b_want.double(), rtol=1e-5, atol=1e-6), name
    # The collapse monitor on the folded Q counts what it counts on the written Q.
    assert torch.equal(semantic_wins(q_got, g_got, 5, "triton"), semantic_wins(q_want, g_want, 5, "torch"))


def test_model_folded_predicts_like_unfused_in_eval_and_state_dicts_load_both_ways():
    unfused, folded = twin_models()
    for _ in range(2):  # set the running statistics
        x = torch.randn(4, 3, 32, 32)
        unfused.losses(x)
        folded.losses(x)
    unfused.eval(), folded.eval()
    x = torch.randn(2, 3, 32, 32)
    labels, finite = folded.predict(x, return_finite=True)
    assert bool(finite) and torch.equal(labels, unfused.predict(x))
    for src, dst_cfg in ((folded, dict(seat_impl="torch")), (unfused, dict(seat_impl="triton", fold_bn="on"))):
        dst = SAN(tiny(**dst_cfg))
        dst.load_state_dict(src.state_dict(), strict=True)
        assert dst.state_dict().keys() == src.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


def test_fold_bn_auto_follows_the_seat_impl_and_on_refuses_what_cannot_fold():
    cpu = torch.device("cpu")
    assert SAN(tiny(seat_impl="triton")).folds_bn(cpu)
    assert not SAN(tiny(seat_impl="triton", fold_bn="off")).folds_bn(cpu)
    assert not SAN(tiny(seat_impl="torch")).folds_bn(cpu)
    with pytest.raises(ConfigError, match="--fold-bn on .* needs --seat-impl triton or auto"):
        tiny(seat_impl="torch", fold_bn="on")
    with pytest.raises(ConfigError, match="--no-reconstruction"):
        tiny(seat_impl="triton", fold_bn="on", reconstruction=False)
    with pytest.raises(ConfigError, match="--fold-bn 'sometimes'"):
        tiny(fold_bn="sometimes")
    model = SAN(tiny(seat_impl="triton", fold_bn="on"))
    model.seat_impl = "torch"  # as san_fast.load may set it for another device
    with pytest.raises(ValueError, match="fold_bn='on' needs the Triton SEAT op"):
        model.losses(torch.randn(2, 3, 32, 32))
    assert model.predict(torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)  # predicts unfused there


def test_bad_affine_is_a_one_line_error():
    y, bn_w, bn_b, gamma, weight, bias, x = leaves(torch.float32)
    scale, shift = bn_affine_of(y, bn_w, bn_b)
    cases = [((scale[:-1], shift), r"affine scale must be \(P,\)=\(40,\)"),
             ((scale, shift.long()), "affine shift must be float16"),
             ((scale,), "a pair"),
             ((scale.to("meta"), shift), "on q's device")]
    for affine, message in cases:
        with pytest.raises((ValueError, TypeError), match=message) as info:
            ops.seat_reconstruct_loss(y, gamma, weight, bias, x, impl="triton", affine=affine)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="carries its affine"):
        ops.seat_labels(ops.FoldedQ(y, scale, shift), gamma, affine=(scale, shift))


# --------------------------------------------------------------------------- DDP


def _ddp_rank(rank: int, split: bool, design: str):
    """One of 2 gloo ranks: its half of the batch through GlobalBatchNorm's fold and the folded
    Triton loss (`split`: given the global statistics as BatchStats, the split BatchNorm
    backward's path, kernels/seat_bn_split.py, or with the fused design the fold's path with the
    statistics attached); returns its gradients and the running statistics."""
    import torch.distributed as dist
    from san_fast.model.sync_batchnorm import GlobalBatchNorm, batch_stats

    dist.init_process_group("gloo")
    try:
        ts = leaves(torch.float32, seed=5)
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        y, bn_w, bn_b, gamma, weight, bias, x = (t[half] if i in (0, 3, 6) else t for i, t in enumerate(ts))
        y = y.clone().requires_grad_()
        bn = GlobalBatchNorm(P)
        with torch.no_grad():
            bn.weight.copy_(bn_w), bn.bias.copy_(bn_b)
        affine = batch_stats(bn, y) if split else batch_affine(bn, y)
        assert not split or affine.across_ranks
        l_rec, l_con = ops.seat_reconstruct_loss(y, gamma, weight, bias, x, impl="triton", affine=affine,
                                                 design=design)
        (l_rec + l_con).backward()
        return y.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("split,design", [(False, "auto"), (True, "two_pass"), (True, "fused")],
                         ids=["fold", "split", "split-stats-fused-design"])
def test_ddp_two_ranks_fold_with_global_statistics(split, design):
    """2 gloo processes, one image each: global statistics (as SyncBatchNorm), so each rank's
    dy is its half of the one-process gradient of both ranks' losses, BN's parameter gradients
    sum to it (DDP's all-reduce), and the running statistics are the whole batch's."""
    from spawn_ranks import run_ranks

    ranks = run_ranks(_ddp_rank, 2, split, design, timeout=180)
    y, bn_w, bn_b, gamma, weight, bias, x = [t.clone().requires_grad_(i in (0, 1, 2)) for i, t in
                                             enumerate(leaves(torch.float32, seed=5))]
    bn = torch.nn.BatchNorm2d(P)
    with torch.no_grad():
        bn.weight.copy_(bn_w), bn.bias.copy_(bn_b)
    q = bn(y)
    total = 0
    for r in range(2):
        half = slice(r * B // 2, (r + 1) * B // 2)
        total = total + sum(ops.seat_reconstruct_loss(q[half], gamma[half], weight, bias, x[half], impl="torch"))
    total.backward()
    assert rel_err(torch.cat([r[0] for r in ranks]), y.grad) < 1e-4
    assert rel_err(ranks[0][1] + ranks[1][1], bn.weight.grad) < 1e-4
    assert rel_err(ranks[0][2] + ranks[1][2], bn.bias.grad) < 1e-4
    for r in ranks:
        assert torch.allclose(r[3], bn.running_mean, rtol=1e-5, atol=1e-6)
        assert torch.allclose(r[4], bn.running_var, rtol=1e-5, atol=1e-6)


def _moments_reference(y):
    yd = y.detach().double().requires_grad_()
    var, mean = torch.var_mean(yd, dim=(0, 2, 3), correction=0)
    return yd, mean, var


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_channel_moments_against_float64(dtype):
    """The statistics op batch_affine uses: mean and biased variance in fp32 (fp64 for float64)
    from y in its own dtype, and its backward (the gradient reaches y in y's dtype)."""
    check_moments(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the statistics kernel, kernels/channel_moments.py)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channel_moments_cuda_path_gpu(dtype):
    check_moments(dtype)


def check_moments(dtype):
    from san_fast.model.sync_batchnorm import channel_moments

    gen = torch.Generator().manual_seed(5)
    y = (3.0 + 2.0 * torch.randn(2, 6, 5, 7, generator=gen)).to(DEVICE, dtype)
    y = y.contiguous(memory_format=torch.channels_last).requires_grad_()
    mean, var = channel_moments(y, 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == acc
    yd, ref_mean, ref_var = _moments_reference(y)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(mean, ref_mean) < tol and rel_err(var, ref_var) < tol
    gm, gv = torch.randn(6, generator=gen).to(DEVICE, acc), torch.randn(6, generator=gen).to(DEVICE, acc)
    grad = torch.autograd.grad((mean * gm).sum() + (var * gv).sum(), y)[0]
    ref = torch.autograd.grad((ref_mean * gm.double()).sum() + (ref_var * gv.double()).sum(), yd)[0]
    assert grad.dtype == dtype
    # The gradient is rounded to y's dtype once: a few of its ulps.
    assert rel_err(grad, ref) < {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3,
                                 torch.bfloat16: 1.6e-2}[dtype]


def test_channel_moments_gradcheck_and_opcheck():
    from san_fast.model.sync_batchnorm import channel_moments

    y = torch.randn(3, 4, 2, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_moments(t, 1e-5), (y,))
    torch.library.opcheck(channel_moments, (torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True), 1e-5))

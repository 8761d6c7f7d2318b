"""The fused loss's relay design (seat_grad_kernel's PRODUCERS): producer CTAs compute each row
block's forward and hand it to the run's gradient CTAs through a flag per row block.

CPU (Triton interpreter): every relay tile and config of the GPU lists (seat_plan.py), launched
directly, for N in every bucket, against the float64 reference, with dq, rec_q, rec_t and the
workspace poisoned with NaN. The interpreter runs programs one after another in ticket order,
so each run's producers finish before its gradient CTAs start; the shapes still put every
split axis to work: K = 2 or 3 ranges with one or two producers, T = 2-3 runs crossing image
boundaries, ragged M and P. GPU (marked gpu): every config in bf16, and the paper shape.
"""

from __future__ import annotations

import pytest
import torch
from san_fast.kernels import seat_common, seat_plan
from san_fast.kernels.seat_plan import MODE_LOSS_IMAGE, MODE_LOSS_REC_Q
from test_seat_configs import H100, NS, SMALL, SMALL_GPU, _distinct, _gpu, check, inputs, reference_loss, run_grad

RELAY_MODES = (MODE_LOSS_IMAGE, MODE_LOSS_REC_Q)


def relay_cases(on_gpu=False):
    """Every relay tile with target x; with target rec_q (the same code but for the residuals)
    the first tile per N. On a GPU, to keep its compiles few within the check's test stage,
    the first tile per N, and target rec_q at N = 27 only. Under the interpreter one config
    per distinct BLOCK_P / BLOCK_PD."""
    for mode in RELAY_MODES:
        for n in NS if mode == MODE_LOSS_IMAGE or not on_gpu else (27,):
            bn = seat_common.block_n(n)
            tiles = seat_plan.grad_tiles(mode, n, SMALL["C"], relay=True)
            for tile in tiles if mode == MODE_LOSS_IMAGE and not on_gpu else tiles[:1]:
                configs = seat_plan.grad_configs(mode, bn, tile[1], interpreter=False, relay=True)
                for cfg in _distinct(configs, ("BLOCK_P", "BLOCK_PD"), on_gpu):
                    label = f"mode{mode}-N{n}-M{tile[0]}-P2{tile[1]}-{seat_common.config_label(cfg)}"
                    yield pytest.param(mode, n, tile, cfg, id=label)


@pytest.mark.parametrize("mode,n,tile,cfg", list(relay_cases()))
def test_every_relay_config(mode, n, tile, cfg):
    dtype = torch.float32 if (n + mode) % 2 else torch.float16
    run_grad(mode, n, tile, cfg, dtype, seed=n + 7 * mode, relay=True)


# (B, M, P, N, p_range, runs): two producers per run (K = 3), M ragged for BLOCK_M = 64, P
# ragged for the range; one image per run; more runs than row blocks of an image.
AWKWARD = {
    "K3-two-producers": (2, 150, 80, 27, 32, 3),
    "N100-ragged": (3, 70, 48, 100, 16, 2),
    "one-run-per-image": (2, 128, 64, 6, 32, 2),
    "T5-short-runs": (1, 330, 64, 27, 32, 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(AWKWARD))
def test_relay_awkward_shapes(name, dtype):
    B, M, P, N, p_range, runs = AWKWARD[name]
    tile = seat_plan.INTERPRETER_GRAD_TILE
    shape = dict(B=B, M=M, P=P, C=3, runs=runs, p_range=p_range)
    cfg = seat_plan.grad_configs(MODE_LOSS_IMAGE, seat_common.block_n(N), tile[1], relay=True)[0]
    run_grad(MODE_LOSS_IMAGE, N, tile, cfg, dtype, shape=shape, seed=len(name), relay=True)


def test_relay_without_the_rec_loss_in_the_hint():
    """h_rec = 0: the rec loss's dW still comes from u^T q (U_SUMS), through the relayed rows."""
    tile = seat_plan.INTERPRETER_GRAD_TILE
    cfg = seat_plan.grad_configs(MODE_LOSS_IMAGE, 32, tile[1], relay=True)[0]
    run_grad(MODE_LOSS_IMAGE, 27, tile, cfg, torch.float32, seed=11, hints=(0.0, 1.3), relay=True)


def test_relay_plan_shape():
    """Producers per run: K / 2 rounded up, or up to K where that makes a run's CTAs divide the
    resident slots; the grid counts them, one wave of the slots."""
    plan = seat_plan.grad_plan(MODE_LOSS_IMAGE, 16, 128 * 128, 1024, 27, 3, torch.bfloat16, H100,
                               interpreter=False, relay=True)
    slots = H100.sms * seat_plan.ctas_per_sm("relay", plan.block_n)
    assert plan.relay and plan.producers == seat_plan.relay_producers(plan.k, slots) == -(-plan.k // 2)
    assert plan.grid == (plan.k + plan.producers, plan.ctas_per_range) and plan.ctas <= slots
    assert seat_plan.relay_producers(16, 108) == 11 and seat_plan.relay_producers(16, 101) == 8
    with pytest.raises(ValueError, match="loss mode"):
        seat_plan.grad_kind(seat_plan.MODE_GRADS, relay=True)


def test_relay_flags_and_buffers_are_fresh_each_call():
    """Two calls in a row give the same bits: the flags and the ticket counter start at zero
    each time (a stale ticket would hand the roles out wrong)."""
    B, M, P, N, C = 2, 70, 48, 27, 3
    q, gamma, weight, bias, x, *_ = inputs(B, M, P, N, C, torch.float32, seed=5)
    from san_fast.kernels.seat_fused_loss import seat_fused_loss

    first = seat_fused_loss(q, gamma, weight, bias, x, False, 1.0, 1.0, relay=True)
    second = seat_fused_loss(q, gamma, weight, bias, x, False, 1.0, 1.0, relay=True)
    for a, b in zip(first, second):
        assert a is None and b is None or torch.equal(a, b)


@_gpu
@pytest.mark.parametrize("mode,n,tile,cfg", list(relay_cases(on_gpu=True)))
def test_every_relay_config_gpu(mode, n, tile, cfg):
    run_grad(mode, n, tile, cfg, torch.bfloat16, shape=SMALL_GPU, seed=n + mode, relay=True)


@_gpu
@pytest.mark.parametrize("mode", RELAY_MODES)
def test_relay_paper_shape_gpu(mode):
    """The planned relay launch at the paper shape (B=16, 128x128, P=1024, N=27, bf16) against
    float64 on the GPU: every producer and gradient CTA resident at once, flags for real."""
    from san_fast.kernels.seat_fused_loss import seat_fused_loss

    B, M, P, N, C = 16, 128 * 128, 1024, 27, 3
    dtype = torch.bfloat16
    q, gamma, weight, bias, x, *_ = inputs(B, M, P, N, C, dtype, seed=2)
    target_rec_q = mode == MODE_LOSS_REC_Q
    got = seat_fused_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0, relay=True)
    refs = reference_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0, torch.float64)
    lows = reference_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0, dtype)
    for name, g, r, low in zip(("rec_q", "rec_t", "dq", "dgamma", "dweight", "dweight_u"), got, refs, lows):
        check(name, g, r, low, dtype)



@pytest.mark.parametrize("forced", ["relay", "fused", "two_pass"])
def test_environment_names_the_auto_design(monkeypatch, forced):
    """SAN_FAST_LOSS_DESIGN overrides the model's pick for design="auto" (eager), and the op
    then runs that design: the relay and fused designs through the one-launch Function, relay
    flagged."""
    from san_fast import ops
    from san_fast.kernels import seat_autograd

    calls = []
    original = seat_autograd.seat_fused_loss
    monkeypatch.setattr(seat_autograd, "seat_fused_loss",
                        lambda *a, **kw: calls.append(kw["relay"]) or original(*a, **kw))
    monkeypatch.setenv(ops.LOSS_DESIGN_ENV, forced)
    q, gamma, weight, bias, x, *_ = inputs(2, 40, 48, 5, 3, torch.float32, seed=8)
    leaves = [t.requires_grad_() for t in (q, gamma, weight, bias)]
    l_rec, l_con = ops.seat_reconstruct_loss(*leaves, x, impl="triton")
    (l_rec + l_con).backward()
    assert calls == ([] if forced == "two_pass" else [forced == "relay"])
    refs = [t.detach().double().requires_grad_() for t in leaves]
    r_rec, r_con = ops.seat_reconstruct_loss(*refs, x.double(), impl="torch")
    (r_rec + r_con).backward()
    for got, want in zip(leaves, refs):
        assert ((got.grad.double() - want.grad).norm() / want.grad.norm()).item() < 1e-4


def test_environment_design_must_be_known(monkeypatch):
    from san_fast import ops

    monkeypatch.setenv(ops.LOSS_DESIGN_ENV, "three_pass")
    q, gamma, weight, bias, x, *_ = inputs(1, 16, 32, 5, 3, torch.float32, seed=9)
    with pytest.raises(ValueError, match="SAN_FAST_LOSS_DESIGN='three_pass'"):
        ops.seat_reconstruct_loss(q.requires_grad_(), gamma, weight, bias, x, impl="triton")

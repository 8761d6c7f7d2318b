"""Every config of every SEAT kernel, launched directly (the autotuner bypassed), against a
float64 PyTorch reference.

CPU (Triton interpreter): each config of the GPU lists (seat_plan.py) for the forward, the labels
and the gradient kernel in its three modes, for N in {2, 27, 64, 100, 256} (every N bucket), at
a shape that puts every split axis to work: M = 40 rows (ragged for every BLOCK_M), P = 48 cut
into a 32-column range and a ragged 16-column one (K = 2), B = 3 images in T = 2 runs that cross
image boundaries (so partial sums go through several workspace slots per image). The interpreter
has no warps or stages, so configs differing only there run once; even-numbered configs run in
fp32, odd ones in fp16 (both dtypes on every kernel and bucket). A sample of awkward shapes (NCHW
strides, P = 80 with a range exactly the tile, C = 8, T = 3, N = 256; the fused loss's wide tile at
P = 300, M = 150) in both dtypes.

GPU (marked gpu): every config in bf16, the N = 27 bucket's first config in fp16 and fp32, and
one paper-shape check (B=16, 128x128, P=1024, N=27, bf16) per kernel: about 55 compiles (the
paper-shape checks reuse the small shapes' variants).
Outputs and workspaces are poisoned with NaN before each launch.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from san_fast.gpu_specs import GPUS
from san_fast.kernels import seat_common, seat_plan
from san_fast.kernels.seat_backward import combine_through_values, launch_grad
from san_fast.kernels.seat_forward import seat_forward, seat_labels
from san_fast.kernels.seat_fused_loss import rescale_dq_, seat_fused_loss
from san_fast.kernels.seat_plan import LOSS_MODES, MODE_GRADS, MODE_LOSS_IMAGE, MODE_LOSS_REC_Q
from san_fast.kernels.seat_reference import losses, seat_reconstruct_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NS = (2, 27, 64, 100, 256)
SMALL = dict(B=3, M=40, P=48, C=3, runs=2, p_range=32)
# On a GPU M = 48, a multiple of 16 like the paper shape's, so both share compiled variants.
SMALL_GPU = {**SMALL, "M": 48}
LOW_FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3}
NAN = float("nan")
H100 = GPUS["H100"]


def _gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(fn))


def rel_err(out, ref) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name, out, ref64, low, dtype):
    """fp32 within 1e-4 of float64; fp16/bf16 within twice PyTorch's own error in that dtype."""
    assert out.shape == ref64.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref64)
    bound = 1e-4 if dtype == torch.float32 else 2 * rel_err(low, ref64) + LOW_FLOOR[dtype]
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


def inputs(B, M, P, N, C, dtype, seed, layout="rows"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "nchw":  # (B,P,H,W) read as rows: P strided by M
        q = torch.randn(B, P, M, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(B, M, P, generator=gen)
    gamma = torch.randn(B, N, P, generator=gen)
    weight = torch.randn(C, P, generator=gen) / math.sqrt(P)
    bias = torch.randn(C, generator=gen)
    x = torch.randn(B, M, C, generator=gen)
    grads = torch.randn(B, M, C, generator=gen), torch.randn(B, M, C, generator=gen)
    return [t.to(DEVICE) for t in (q.to(dtype), gamma, weight, bias, x.to(dtype), grads[0].to(dtype),
                                   grads[1].to(dtype))]


def _cast(ts, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in ts]


def reference_forward(q, gamma, weight, bias, dtype):
    qq, g, w, b = _cast((q, gamma, weight, bias), dtype)
    rec_q, rec_t = seat_reconstruct_reference(qq, g, w, b)
    attn = torch.softmax(qq @ g.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
    return rec_q.detach(), rec_t.detach(), attn.detach()


def reference_grads(q, gamma, weight, grq, grt, dtype):
    qq, g, w = _cast((q, gamma, weight), dtype)
    rec_q, rec_t = seat_reconstruct_reference(qq, g, w, None)
    return torch.autograd.grad((rec_q, rec_t), (qq, g, w), (grq.to(dtype), grt.to(dtype)))


def reference_loss(q, gamma, weight, bias, x, target_rec_q, h_rec, h_con, dtype):
    qq, g, w, b = _cast((q, gamma, weight, bias), dtype)
    rec_q, rec_t = seat_reconstruct_reference(qq, g, w, b)
    l_rec, l_con = losses(rec_q, rec_t, x, target_rec_q, torch.float64 if dtype == torch.float64 else torch.float32)
    dq, dg, dw = torch.autograd.grad(h_rec * l_rec + h_con * l_con, (qq, g, w), retain_graph=True)
    dwu = torch.autograd.grad(l_rec, w)[0]
    return rec_q.detach(), rec_t.detach(), dq, dg, dw, dwu


def _distinct(configs, keys, on_gpu):
    """All configs on a GPU; under the interpreter one per distinct block sizes."""
    if on_gpu:
        return list(configs)
    seen, out = set(), []
    for cfg in configs:
        key = tuple(cfg.kwargs.get(k) for k in keys)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def forward_cases(on_gpu=False):
    for n in NS:
        configs = seat_plan.forward_configs(seat_common.block_n(n), interpreter=False)
        for i, cfg in enumerate(_distinct(configs, ("BLOCK_M", "BLOCK_P"), on_gpu)):
            yield pytest.param(n, cfg, id=f"N{n}-{seat_common.config_label(cfg)}")


def grad_cases(on_gpu=False):
    for mode in (MODE_GRADS, MODE_LOSS_IMAGE, MODE_LOSS_REC_Q):
        kind = seat_plan.grad_kind(mode)
        for n in NS:
            bn = seat_common.block_n(n)
            for block_m, block_p2 in seat_plan.grad_tiles(mode, n, SMALL["C"]):
                configs = seat_plan.grad_configs(mode, bn, block_p2, interpreter=False)
                keys = ("BLOCK_P", "BLOCK_PD") if kind == "loss" else ("BLOCK_PD",)
                for cfg in _distinct(configs, keys, on_gpu):
                    label = f"mode{mode}-N{n}-M{block_m}-P2{block_p2}-{seat_common.config_label(cfg)}"
                    yield pytest.param(mode, n, (block_m, block_p2), cfg, id=label)


def run_forward(n, cfg, dtype, shape=SMALL, seed=0, layout="rows"):
    B, M, P, C = shape["B"], shape["M"], shape["P"], shape["C"]
    q, gamma, weight, bias, *_ = inputs(B, M, P, n, C, dtype, seed, layout)
    out = tuple(torch.full(s, NAN, device=DEVICE, dtype=dtype) for s in ((B, M, C), (B, M, C), (B, M, n)))
    got = seat_forward(q, gamma, weight, bias, save_attn=True, out=out, config=cfg)
    refs = reference_forward(q, gamma, weight, bias, torch.float64)
    lows = reference_forward(q, gamma, weight, bias, dtype) if dtype != torch.float32 else refs
    for name, g, r, low in zip(("rec_q", "rec_t", "attn"), got, refs, lows):
        check(name, g, r, low, dtype)
    labels = seat_labels(q, gamma, out=torch.full((B, M), -1, device=DEVICE, dtype=torch.int64), config=cfg)
    logits = q.double() @ gamma.to(dtype).double().transpose(1, 2)
    picked = logits.gather(-1, labels.clamp(0, n - 1).unsqueeze(-1)).squeeze(-1)
    tol = (1e-5 if dtype == torch.float32 else 3e-2) * logits.abs().amax(-1)
    assert ((labels >= 0) & (labels < n)).all() and (logits.amax(-1) - picked <= tol).all()


def run_grad(mode, n, tile, cfg, dtype, shape=SMALL, seed=0, layout="rows", hints=(0.7, 1.3), relay=False):
    B, M, P, C = shape["B"], shape["M"], shape["P"], shape["C"]
    q, gamma, weight, bias, x, grq, grt = inputs(B, M, P, n, C, dtype, seed, layout)
    plan = seat_plan.grad_plan(mode, B, M, P, n, C, dtype, H100, block_m=tile[0], block_p2=tile[1],
                               p_range=min(shape["p_range"], tile[1]), ctas_per_range=shape["runs"],
                               interpreter=False, relay=relay)
    assert plan.k > 1 and plan.ctas_per_range == shape["runs"] and plan.relay == relay, plan
    poisoned = dict(plan=plan, config=cfg, dq=torch.full_like(q, NAN), workspace_fill=NAN)
    if mode == MODE_GRADS:
        attn = reference_forward(q, gamma, weight, None, torch.float64)[2].to(dtype)
        dq, dg, dw, dwu, s, _, _, _ = launch_grad(mode, q, gamma, weight, None, attn=attn, grad_rec_q=grq,
                                                grad_rec_t=grt, **poisoned)
        assert dwu is None
        rows = dict(attn=attn, grad_rec_q=grq, grad_rec_t=grt)
        _check_split_passes(q, gamma, weight, rows, plan, cfg, (dq, dg, dw, s), dtype)
        if plan.split:
            _check_one_pass(q, gamma, weight, rows, plan, cfg, (dq, dg, dw, s), dtype)
        dg, dw = combine_through_values(dg, dw, s, gamma, weight)
        got = (dq, dg, dw)
        refs = reference_grads(q, gamma, weight, grq, grt, torch.float64)
        lows = reference_grads(q, gamma, weight, grq, grt, dtype) if dtype != torch.float32 else refs
        names = ("dq", "dgamma", "dweight")
    else:
        target_rec_q = mode == MODE_LOSS_REC_Q
        got = seat_fused_loss(q, gamma, weight, bias, x, target_rec_q, *hints, **poisoned)
        refs = reference_loss(q, gamma, weight, bias, x, target_rec_q, *hints, torch.float64)
        lows = reference_loss(q, gamma, weight, bias, x, target_rec_q, *hints, dtype) \
            if dtype != torch.float32 else refs
        names = ("rec_q", "rec_t", "dq", "dgamma", "dweight", "dweight_u")
    for name, g, r, low in zip(names, got, refs, lows):
        check(name, g, r, low, dtype)


def _check_one_pass(q, gamma, weight, rows, plan, cfg, split, dtype):
    """Where the planner splits the backward (seat_plan.splits_backward), the whole kernel on the
    same grid and tiles gives what the two passes gave."""
    whole = dataclasses.replace(plan, split=False)
    got = launch_grad(MODE_GRADS, q, gamma, weight, None, plan=whole, config=cfg, dq=torch.full_like(q, NAN),
                      workspace_fill=NAN, **rows)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for name, a, b in zip(("dq", "dgamma", "dweight", "S"), (got[0], got[1], got[2], got[4]), split):
        assert not torch.isnan(a).any() and rel_err(a, b) < tol, name


def _check_split_passes(q, gamma, weight, rows, plan, cfg, full, dtype):
    """The split BatchNorm backward's passes (kernels/seat_bn_split.py) with the same plan and
    config: the sums pass gives the full kernel's sums exactly and writes no dq; the dq pass
    writes dq + alpha + beta q into a poisoned buffer and sums nothing."""
    p = q.shape[-1]
    sums = launch_grad(MODE_GRADS, q, gamma, weight, None, plan=plan, config=cfg, with_dq=False,
                       workspace_fill=NAN, **rows)
    assert sums[0] is None
    for name, got, want in zip(("dgamma", "dweight", "S"), (sums[1], sums[2], sums[4]), full[1:]):
        assert torch.equal(got, want), name
    gen = torch.Generator().manual_seed(p)
    alpha, beta = (torch.randn(p, generator=gen).to(DEVICE) for _ in range(2))
    dy = launch_grad(MODE_GRADS, q, gamma, weight, None, plan=plan, config=cfg, dq=torch.full_like(q, NAN),
                     dq_affine=(alpha, beta), **rows)[0]
    want = full[0].double() + alpha.double() + beta.double() * q.double()
    assert not torch.isnan(dy).any() and rel_err(dy, want) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("n,cfg", list(forward_cases()))
def test_every_forward_config(n, cfg):
    index = [c for c in seat_plan.forward_configs(seat_common.block_n(n), interpreter=False)].index(cfg)
    run_forward(n, cfg, torch.float32 if index % 2 == 0 else torch.float16, seed=n)


@pytest.mark.parametrize("mode,n,tile,cfg", list(grad_cases()))
def test_every_grad_config(mode, n, tile, cfg):
    index = (NS.index(n) + mode) % 2
    run_grad(mode, n, tile, cfg, torch.float32 if index == 0 else torch.float16, seed=n + mode)


def test_grad_cases_run_both_dw_layouts():
    """The cases above run dW both ways in the grads mode and in each loss mode, the packed way
    in fp32 and in fp16: packed into dGamma's padding columns (PACK_W: N + W_ROWS C <= BLOCK_N
    <= 64) and in its own accumulator, so neither path goes untested when NS or C change."""
    seen = set()
    for case in grad_cases():
        mode, n, _, _ = case.values
        w_rows = 2 if mode == MODE_LOSS_REC_Q else 1  # target x: u^T q alone (seat_grad_kernel's U_SUMS)
        packed = n + w_rows * SMALL["C"] <= seat_common.block_n(n) <= 64
        dtype = torch.float32 if (NS.index(n) + mode) % 2 == 0 else torch.float16
        seen.add((mode, packed, dtype))
    for mode in (MODE_GRADS, MODE_LOSS_IMAGE, MODE_LOSS_REC_Q):
        assert {p for m, p, _ in seen if m == mode} == {True, False}, mode
    assert {d for _, p, d in seen if p} == {torch.float32, torch.float16}


AWKWARD = {
    # P = 80 with the range exactly the (64-wide) tile: ranges [0,64), [64,80).
    "p80_full_range_t3": dict(B=2, M=150, P=80, C=3, runs=3, p_range=64),
    # C = 8 fills both halves of the fused loss's 16 packed columns.
    "c8": dict(B=2, M=70, P=48, C=8, runs=2, p_range=32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(AWKWARD))
@pytest.mark.parametrize("mode", [MODE_GRADS, MODE_LOSS_REC_Q])
def test_awkward_shapes(mode, name, dtype):
    n = 256 if name == "c8" else 27
    cfg = seat_plan.grad_configs(mode, seat_common.block_n(n), 64, interpreter=False)[0]
    run_grad(mode, n, (32, 64), cfg, dtype, shape=AWKWARD[name], seed=hash(name) % 997)


# (tile, P, range): ragged ranges (a full one and a short last one), then the 512-wide tile as
# the planner runs it, every range full (EVEN_P: no column masks).
WIDE_CASES = {"64x256 ragged": ((64, 256), 300, 256), "32x512 ragged": ((32, 512), 700, 512),
              "32x512 even": ((32, 512), 1024, 512)}


# Every case in fp32 and fp16; h_rec = 0 once per tile (the interpreter takes ~10 s a case).
WIDE_RUNS = [(case, dtype, (0.7, 1.3)) for case in WIDE_CASES for dtype in (torch.float32, torch.float16)] + \
    [("64x256 ragged", torch.float16, (0.0, 1.3)), ("32x512 even", torch.float32, (0.0, 1.3))]


@pytest.mark.parametrize("case,dtype,hints", WIDE_RUNS)
def test_wide_loss_tiles(case, dtype, hints):
    """The fused loss's wide tiles (target x, dW packed), each with its own config: M = 150
    ragged, T = 3 runs across two images; the 512-wide one runs step 2 in row halves and dq's
    sub-tiles in a loop (WIDE_RANGE). h_rec = 0 (no rec loss in the hint) still gives the rec
    loss's dW, from u^T q."""
    tile, p, width = WIDE_CASES[case]
    shape = dict(B=2, M=150, P=p, C=3, runs=3, p_range=width)
    plan = seat_plan.grad_plan(MODE_LOSS_IMAGE, 2, 150, p, 27, 3, dtype, H100, block_m=tile[0], block_p2=tile[1],
                               p_range=width, ctas_per_range=3, interpreter=False)
    assert (plan.even_p, plan.wide_range) == (case.endswith("even"), tile[1] == 512), plan
    cfg = seat_plan.grad_configs(MODE_LOSS_IMAGE, 32, tile[1], interpreter=False)[0]
    assert cfg.kwargs["BLOCK_P"] == seat_plan.WIDE_LOSS_TILES[tile][0]
    run_grad(MODE_LOSS_IMAGE, 27, tile, cfg, dtype, shape=shape, seed=300, hints=hints)


@pytest.mark.parametrize("mode", [MODE_GRADS, MODE_LOSS_IMAGE])
def test_nchw_q_with_strided_p(mode):
    """q (B,P,H,W) in NCHW read as rows: P is the strided axis of every Q and dQ tile."""
    cfg = seat_plan.grad_configs(mode, 32, 64, interpreter=False)[0]
    run_grad(mode, 5, (16, 64), cfg, torch.float32, layout="nchw")
    run_forward(5, seat_plan.forward_configs(32, interpreter=False)[-1], torch.float32, layout="nchw")


def test_rescale_kernel_matches_torch():
    gen = torch.Generator().manual_seed(5)
    dq0 = torch.randn(3, 40, 48, generator=gen).to(DEVICE).half()
    u, w = torch.randn(3, 40, 3, generator=gen).to(DEVICE), torch.randn(3, 48, generator=gen).to(DEVICE)
    dq = dq0.clone()
    rescale_dq_(dq, u, w, torch.tensor([0.25, -3.0], device=DEVICE))
    ref = 0.25 * dq0.double() - 3.0 * (u.double() @ w.double())
    assert rel_err(dq, ref) < 2e-3


# --------------------------------------------------------------------------- GPU


@_gpu
@pytest.mark.parametrize("n,cfg", list(forward_cases(on_gpu=True)))
def test_every_forward_config_gpu(n, cfg):
    configs = seat_plan.forward_configs(seat_common.block_n(n), interpreter=False)
    dtypes = [torch.bfloat16] + ([torch.float16, torch.float32] if cfg is configs[0] and n == 27 else [])
    for dtype in dtypes:
        run_forward(n, cfg, dtype, shape=SMALL_GPU, seed=n)


@_gpu
@pytest.mark.parametrize("mode,n,tile,cfg", list(grad_cases(on_gpu=True)))
def test_every_grad_config_gpu(mode, n, tile, cfg):
    first = seat_plan.grad_configs(mode, seat_common.block_n(n), tile[1], interpreter=False)[0]
    others = cfg is first and n == 27 and mode != MODE_LOSS_REC_Q  # the loss modes share their code
    for dtype in [torch.bfloat16] + ([torch.float16, torch.float32] if others else []):
        run_grad(mode, n, tile, cfg, dtype, shape=SMALL_GPU, seed=n + mode)


PAPER = dict(B=16, M=128 * 128, P=1024, C=3, N=27)


@_gpu
@pytest.mark.parametrize("kernel", ["forward", MODE_GRADS, MODE_LOSS_IMAGE, MODE_LOSS_REC_Q])
def test_paper_shape_gpu(kernel):
    """The planned launch at the paper shape (autotuned), against float64 on the GPU."""
    B, M, P, C, N = (PAPER[k] for k in ("B", "M", "P", "C", "N"))
    dtype = torch.bfloat16
    q, gamma, weight, bias, x, grq, grt = inputs(B, M, P, N, C, dtype, seed=1)
    if kernel == "forward":
        got = seat_forward(q, gamma, weight, bias, save_attn=True)
        refs = reference_forward(q, gamma, weight, bias, torch.float64)
        lows = reference_forward(q, gamma, weight, bias, dtype)
        names = ("rec_q", "rec_t", "attn")
    elif kernel == MODE_GRADS:
        attn = seat_forward(q, gamma, weight, None, save_attn=True)[2]
        dq, dg, dw, _, s, _, _, _ = launch_grad(kernel, q, gamma, weight, None, attn=attn, grad_rec_q=grq,
                                              grad_rec_t=grt)
        got = (dq, *combine_through_values(dg, dw, s, gamma, weight))
        refs = reference_grads(q, gamma, weight, grq, grt, torch.float64)
        lows = reference_grads(q, gamma, weight, grq, grt, dtype)
        names = ("dq", "dgamma", "dweight")
    else:
        target_rec_q = kernel == MODE_LOSS_REC_Q
        assert kernel in LOSS_MODES
        got = seat_fused_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0)
        refs = reference_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0, torch.float64)
        lows = reference_loss(q, gamma, weight, bias, x, target_rec_q, 1.0, 1.0, dtype)
        names = ("rec_q", "rec_t", "dq", "dgamma", "dweight", "dweight_u")
    for name, g, r, low in zip(names, got, refs, lows):
        check(name, g, r, low, dtype)


@_gpu
def test_int64_offsets_gpu():
    """NCHW q with M*P > 2^31 elements: p0 * stride_p and the tile offsets need 64 bits (at
    exactly 2^31 the last offset, 2^31 - 1, still fits in 32)."""
    B, P, side, N, C = 1, 520, 2048, 6, 3
    q = torch.randn(B, P, side * side, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    assert q.shape[1] * q.shape[2] > 2**31 and seat_common.wide_offsets(q)
    gamma = torch.randn(B, N, P, device=DEVICE)
    weight = torch.randn(C, P, device=DEVICE) / math.sqrt(P)
    rec_q, _, attn = seat_forward(q, gamma, weight, None, save_attn=True)
    rows = torch.arange(0, side * side, 4099, device=DEVICE)
    ref = q[0, rows].float() @ weight.to(torch.bfloat16).float().t()
    assert rel_err(rec_q[0, rows], ref) < 1e-2
    ref_attn = torch.softmax(q[0, rows].float() @ gamma[0].to(torch.bfloat16).float().t() / math.sqrt(P), -1)
    assert rel_err(attn[0, rows], ref_attn) < 1e-2
    g = torch.randn(B, side * side, C, device=DEVICE, dtype=torch.bfloat16)
    dq = launch_grad(MODE_GRADS, q, gamma, weight, None, attn=attn, grad_rec_q=g, grad_rec_t=torch.zeros_like(g))[0]
    ref_dq = g[0, rows].float() @ weight.to(torch.bfloat16).float()
    assert rel_err(dq[0, rows], ref_dq) < 1e-2


@_gpu
def test_launches_go_to_q_device_gpu():
    """Launches run on q's device even when another device is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, gamma, weight, bias, *_ = inputs(2, 40, 48, 5, 3, torch.float32, seed=3)
    q1, g1, w1 = (t.to("cuda:1") for t in (q, gamma, weight))
    with torch.cuda.device(0):
        rec_q, _, _ = seat_forward(q1, g1, w1, None)
    assert rec_q.device == q1.device
    assert rel_err(rec_q.cpu(), (q1.double() @ w1.double().t()).cpu()) < 1e-4

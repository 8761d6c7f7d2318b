"""SEAT op: Triton kernels against a float64 PyTorch reference.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by the
root conftest.py): fp32, fp16 and fp64 there; bf16 and the inductor backend only on CUDA.
Error measure: ||out - ref|| / ||ref|| against the float64 reference. fp32 must be within
1e-4; fp16/bf16 within 2x the error of the same PyTorch reference run in that precision
(plus a small floor).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from san_fast.gpu_specs import GPUS
from san_fast.kernels import seat_plan
from san_fast.kernels.seat_backward import MODE_GRADS, launch_grad
from san_fast.kernels.seat_forward import seat_forward, seat_labels
from san_fast.kernels.seat_fused_loss import rescale_dq_, seat_fused_loss

from san_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_skip = pytest.mark.skipif(not CUDA, reason="needs CUDA (bf16 and inductor are not testable in the interpreter)")


def gpu(fn):
    return pytest.mark.gpu(_skip(fn))

LOW_PRECISION = {torch.float16, torch.bfloat16}
FP32_TOL = 1e-4
LOW_FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

# (B, spatial, layout, P, N, C, bias): spatial is M for "rows" or (H, W) for 4-D q.
CASES = {
    "n2_c1_rows": (2, 150, "rows", 80, 2, 1, True),
    "n5_c3_channels_last_nobias": (1, (9, 11), "channels_last", 48, 5, 3, False),
    "n27_c8_rows": (2, 70, "rows", 48, 27, 8, True),
    "n100_c3_nchw": (1, (5, 13), "nchw", 80, 100, 3, True),
    "n256_c3_rows": (1, 40, "rows", 48, 256, 3, True),
}


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 10_000


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(case, dtype, seed, param_dtype=torch.float32):
    bsz, spatial, layout, p, n, c, with_bias = case
    gen = torch.Generator().manual_seed(seed)
    if layout == "rows":
        q = torch.randn(bsz, spatial, p, generator=gen)
    else:
        q = torch.randn(bsz, p, *spatial, generator=gen)
    q = q.to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        q = q.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(bsz, n, p, generator=gen).to(DEVICE, param_dtype)
    weight = (torch.randn(c, p, 1, 1, generator=gen) / math.sqrt(p)).to(DEVICE, param_dtype)
    bias = torch.randn(c, generator=gen).to(DEVICE, param_dtype) if with_bias else None
    return q, gamma, weight, bias


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def rows_of(q):
    return q if q.dim() == 3 else q.flatten(2).transpose(1, 2)


def run_reconstruct(inputs, grads, impl, dtype=None):
    """Outputs and gradients [rec_q, rec_t, dq, dgamma, dweight, dbias] of one impl."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    q, gamma, weight, bias = (leaf(cast(t)) for t in inputs)
    rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl=impl)
    torch.autograd.backward((rec_q, rec_t), tuple(cast(g) for g in grads))
    return [rec_q, rec_t, q.grad, gamma.grad, weight.grad, None if bias is None else bias.grad]


def check_against_reference(outs, refs, lows, dtype, names):
    for name, out, ref, low in zip(names, outs, refs, lows):
        if ref is None:
            assert out is None, name
            continue
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        err = rel_err(out, ref)
        if dtype in LOW_PRECISION:
            bound = 2.0 * rel_err(low, ref) + LOW_FLOOR[dtype]
        else:
            bound = FP32_TOL if dtype == torch.float32 else 1e-10
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"


RECON_NAMES = ("rec_q", "rec_t", "dq", "dgamma", "dweight", "dbias")


def _reconstruct_check(case, dtype, seed):
    inputs = make_inputs(case, dtype, seed)
    bsz, m = inputs[0].shape[0], rows_of(inputs[0]).shape[1]
    c = inputs[2].shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    grads = tuple(torch.randn(bsz, m, c, generator=gen).to(DEVICE, dtype) for _ in range(2))
    outs = run_reconstruct(inputs, grads, "triton")
    assert outs[0].dtype == dtype and outs[2].dtype == dtype and outs[3].dtype == torch.float32
    q = inputs[0]
    layout = [st for st, size in zip(q.stride(), q.shape) if size > 1]
    assert [st for st, size in zip(outs[2].stride(), q.shape) if size > 1] == layout, "dq must keep q's layout"
    refs = run_reconstruct(inputs, grads, "torch", dtype=torch.float64)
    lows = run_reconstruct(inputs, grads, "torch") if dtype in LOW_PRECISION else refs
    check_against_reference(outs, refs, lows, dtype, RECON_NAMES)


@pytest.mark.parametrize("name", list(CASES))
def test_reconstruct_fp32(name):
    _reconstruct_check(CASES[name], torch.float32, seed=seed_of(name))


@pytest.mark.parametrize("name", ["n2_c1_rows", "n5_c3_channels_last_nobias", "n27_c8_rows", "n256_c3_rows"])
def test_reconstruct_fp16(name):
    _reconstruct_check(CASES[name], torch.float16, seed=seed_of(name, 16))


@gpu
@pytest.mark.parametrize("name", ["n27_c8_rows", "n256_c3_rows"])  # every bucket: test_seat_configs.py
def test_reconstruct_bf16(name):
    _reconstruct_check(CASES[name], torch.bfloat16, seed=seed_of(name, 'bf16'))


def run_loss(inputs, x, target, impl, weights, hint, dtype=None, design="auto"):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    q, gamma, weight, bias = (leaf(cast(t)) for t in inputs)
    xs = leaf(cast(x))
    extra = {"design": design} if impl == "triton" else {}
    l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, xs, target, impl=impl, loss_weights=hint,
                                             **extra)
    (weights[0] * l_rec + weights[1] * l_con).backward()
    return [l_rec, l_con, q.grad, gamma.grad, weight.grad, None if bias is None else bias.grad, xs.grad]


LOSS_NAMES = ("l_rec", "l_con", "dq", "dgamma", "dweight", "dbias", "dx")


@pytest.mark.parametrize("target", ["image", "rec_q"])
@pytest.mark.parametrize(
    "name,dtype,weights,hint,design",
    [
        ("n5_c3_channels_last_nobias", torch.float32, (1.0, 1.0), (1.0, 1.0), "fused"),  # rescale skipped
        ("n27_c8_rows", torch.float32, (0.5, 2.0), (1.0, 1.0), "fused"),  # rescale pass
        ("n100_c3_nchw", torch.float32, (3.0, 0.0), (3.0, 0.5), "fused"),  # rescale pass, g_con = 0
        # A hint without the rec loss: target x recovers its dW from u^T q, not from dW / h_rec.
        ("n27_c8_rows", torch.float32, (2.0, 1.0), (0.0, 1.0), "fused"),
        ("n27_c8_rows", torch.float32, (0.5, 2.0), (1.0, 1.0), "two_pass"),
        ("n27_c8_rows", torch.float32, (0.5, 2.0), (1.0, 1.0), "relay"),  # rescale pass
        ("n100_c3_nchw", torch.float16, (1.0, 1.0), (1.0, 1.0), "relay"),  # rescale skipped
        ("n2_c1_rows", torch.float16, (1.0, 0.25), (1.0, 0.25), "fused"),
        ("n256_c3_rows", torch.float16, (1.0, 1.0), (1.0, 1.0), "auto"),
        ("n5_c3_channels_last_nobias", torch.float16, (2.0, 1.0), (1.0, 1.0), "two_pass"),
    ],
)
def test_reconstruct_loss(name, dtype, weights, hint, design, target):
    case = CASES[name]
    inputs = make_inputs(case, dtype, seed=seed_of(name, target))
    q = inputs[0]
    c = inputs[2].shape[0]
    gen = torch.Generator().manual_seed(3)
    shape = (q.shape[0], c, *q.shape[2:]) if q.dim() == 4 else (q.shape[0], q.shape[1], c)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    outs = run_loss(inputs, x, target, "triton", weights, hint, design=design)
    assert outs[0].dtype == torch.float32 and outs[0].dim() == 0
    refs = run_loss(inputs, x, target, "torch", weights, hint, dtype=torch.float64)
    lows = run_loss(inputs, x, target, "torch", weights, hint) if dtype in LOW_PRECISION else refs
    check_against_reference(outs, refs, lows, dtype, LOSS_NAMES)


@gpu
@pytest.mark.parametrize("target", ["image", "rec_q"])
def test_reconstruct_loss_bf16(target):
    inputs = make_inputs(CASES["n27_c8_rows"], torch.bfloat16, seed=5)
    q = inputs[0]
    x = torch.randn(q.shape[0], q.shape[1], inputs[2].shape[0], device=DEVICE, dtype=torch.bfloat16)
    outs = run_loss(inputs, x, target, "triton", (1.0, 1.0), (1.0, 1.0))
    refs = run_loss(inputs, x, target, "torch", (1.0, 1.0), (1.0, 1.0), dtype=torch.float64)
    lows = run_loss(inputs, x, target, "torch", (1.0, 1.0), (1.0, 1.0))
    check_against_reference(outs, refs, lows, torch.bfloat16, LOSS_NAMES)


def test_loss_without_grad_matches():
    inputs = make_inputs(CASES["n27_c8_rows"], torch.float32, seed=21)
    x = torch.randn(2, 70, 8, device=DEVICE)
    with torch.no_grad():
        got = ops.seat_reconstruct_loss(*inputs, x, impl="triton")
        ref = ops.seat_reconstruct_loss(*(t.double() for t in inputs), x.double(), impl="torch")
    for g, r in zip(got, ref):
        assert rel_err(g, r) < FP32_TOL


@pytest.mark.parametrize("design", ["fused", "relay", "two_pass"])
def test_loss_backward_twice_with_retain_graph(design):
    """Backwards through the same graph with other upstream gradients (one loss alone, then
    both, as gradient balancing does) stay exact: the fused loss rescales in place the first
    time and recomputes dq after that."""
    inputs = make_inputs(CASES["n5_c3_channels_last_nobias"], torch.float32, seed=4)
    q, gamma, weight, _ = (leaf(t) for t in inputs)
    x = torch.randn(1, 3, 9, 11, device=DEVICE)
    l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, None, x, impl="triton", design=design)
    refs = tuple(leaf(t.double()) for t in (q, gamma, weight))
    r_rec, r_con = ops.seat_reconstruct_loss(*refs, None, x.double(), impl="torch")
    for w_rec, w_con in ((2.0, 0.0), (1.0, 1.0), (0.0, 3.0), (1.0, 1.0)):
        got = torch.autograd.grad(w_rec * l_rec + w_con * l_con, (q, gamma, weight), retain_graph=True)
        want = torch.autograd.grad(w_rec * r_rec + w_con * r_con, refs, retain_graph=True)
        for g, r in zip(got, want):
            assert rel_err(g, r) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [2, 5, 27, 100, 256])
def test_labels(n, dtype):
    case = (2, (7, 9), "channels_last", 48, n, 3, False)
    q, gamma, _, _ = make_inputs(case, dtype, seed=n)
    labels = ops.seat_labels(q, gamma, impl="triton")
    assert labels.dtype == torch.int64 and labels.shape == (2, 63)
    logits = rows_of(q).double() @ gamma.to(q.dtype).double().transpose(1, 2)
    best = logits.max(-1).values
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # Disagreement with the float64 argmax only where the top two are within rounding.
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * logits.abs().amax(-1)
    assert (best - picked <= tol).all()
    assert (labels == logits.argmax(-1)).float().mean() > 0.95


@gpu
def test_labels_bf16():
    q, gamma, _, _ = make_inputs(CASES["n27_c8_rows"], torch.bfloat16, seed=2)
    labels = ops.seat_labels(q, gamma, impl="triton")
    logits = q.double() @ gamma.to(torch.bfloat16).double().transpose(1, 2)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert (logits.max(-1).values - picked <= 5e-2 * logits.abs().amax(-1)).all()


def test_gradcheck_float64():
    """float64 runs the real kernels with float64 accumulation, so finite differences apply."""
    gen = torch.Generator().manual_seed(0)

    def make(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(DEVICE).requires_grad_()

    q, gamma, weight, bias, x = make(1, 5, 16), make(1, 3, 16), make(2, 16, scale=0.25), make(2), make(1, 5, 2)
    assert torch.autograd.gradcheck(lambda *a: ops.seat_reconstruct(*a, impl="triton"), (q, gamma, weight, bias))
    assert torch.autograd.gradcheck(
        lambda *a: ops.seat_reconstruct_loss(*a, consistency_target="rec_q", impl="triton"),
        (q, gamma, weight, bias, x),
    )


def test_torch_compile_fullgraph():
    """On CPU the aot_eager backend keeps this fast (the ops are opaque custom ops under the
    interpreter); on CUDA the default inductor backend (test_seat_compile.py reads its code)."""
    inputs = make_inputs(CASES["n5_c3_channels_last_nobias"], torch.float32, seed=9)
    x = torch.randn(1, 3, 9, 11, device=DEVICE)

    def step(q, gamma, weight, x):
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, None, impl="triton")
        l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, None, x, impl="triton")
        return rec_q.square().mean() + rec_t.mean() + l_rec + 0.5 * l_con

    backend = "inductor" if CUDA else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    results = []
    for fn in (compiled, step):
        q, gamma, weight = (leaf(t) for t in inputs[:3])
        out = fn(q, gamma, weight, x)
        out.backward()
        results.append([out, q.grad, gamma.grad, weight.grad])
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-5


def test_registered_autograd_on_the_op():
    inputs = make_inputs(CASES["n27_c8_rows"], torch.float32, seed=13)
    q, gamma, weight, bias = (leaf(t) for t in inputs)
    rec_q, rec_t, _ = torch.ops.san_fast.seat_forward(q, gamma, weight.flatten(1), bias, True)
    (rec_q.sum() + 2 * rec_t.sum()).backward()
    got = [q.grad, gamma.grad, weight.grad, bias.grad]
    ones = torch.ones(2, 70, 8, device=DEVICE)
    refs = run_reconstruct(inputs, (ones, 2 * ones), "torch", dtype=torch.float64)[2:]
    for g, r in zip(got, refs):
        assert rel_err(g, r) < FP32_TOL


def _plan(mode, q, gamma, weight, **pin):
    bsz, m, p = q.shape
    return seat_plan.grad_plan(mode, bsz, m, p, gamma.shape[1], weight.shape[0], q.dtype, GPUS["H100"], **pin)


def test_backward_is_deterministic_and_independent_of_grid():
    inputs = make_inputs(CASES["n2_c1_rows"], torch.float32, seed=17)
    q, gamma, weight, _ = inputs
    w2 = weight.flatten(1)
    _, _, attn = seat_forward(q, gamma, w2, None, save_attn=True)
    g = torch.randn(2, 150, 1, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    runs = [
        launch_grad(MODE_GRADS, q, gamma, w2, None, attn=attn, grad_rec_q=g, grad_rec_t=g,
                    plan=_plan(MODE_GRADS, q, gamma, w2, ctas_per_range=t, p_range=pr))
        for t, pr in ((1, 80), (2, 48), (2, 48), (3, 32))
    ]
    for a, b in zip(runs[1][:5], runs[2][:5]):
        assert a is None or torch.equal(a, b)
    # Other grids sum the per-run partials in another order, so they agree only to fp32
    # rounding; a wrong split would be off by whole partials.
    for run in (runs[0], runs[3]):
        for a, b in zip(run[:5], runs[1][:5]):
            assert a is None or rel_err(a, b) < 1e-5


def test_chosen_configs_name_what_ran():
    from san_fast.kernels import seat_common

    inputs = make_inputs(CASES["n256_c3_rows"], torch.float32, seed=3)
    q, gamma, weight, bias = inputs
    seat_forward(q, gamma, weight.flatten(1), bias)
    picks = seat_common.chosen_configs(("forward",))
    forward = {k: v for k, v in picks.items() if k.startswith("forward N<=256")}
    assert forward, picks
    assert all(v.startswith("M=") and ",w=" in v and ",s=" in v for v in forward.values())
    assert not seat_common.chosen_configs(("no such kind",))


def test_launchers_write_every_element():
    """Outputs and workspaces pre-filled with NaN: any element the kernels skip stays NaN."""
    nan = float("nan")
    q, gamma, weight, bias = make_inputs(CASES["n27_c8_rows"], torch.float32, seed=23)
    w2 = weight.flatten(1)
    bsz, m, _ = q.shape
    c, n = w2.shape[0], gamma.shape[1]
    out = tuple(torch.full(s, nan, device=DEVICE) for s in ((bsz, m, c), (bsz, m, c), (bsz, m, n)))
    rec_q, rec_t, attn = seat_forward(q, gamma, w2, bias, save_attn=True, out=out)
    assert all(torch.isfinite(t).all() for t in (rec_q, rec_t, attn))
    g = torch.randn(bsz, m, c, device=DEVICE)
    for runs in (1, 3):
        res = launch_grad(
            MODE_GRADS, q, gamma, w2, None, attn=attn, grad_rec_q=g, grad_rec_t=g,
            plan=_plan(MODE_GRADS, q, gamma, w2, ctas_per_range=runs, p_range=32),
            dq=torch.full_like(q, nan), workspace_fill=nan,
        )
        assert all(torch.isfinite(t).all() for t in res if t is not None)
        for target_rec_q in (False, True):
            mode = 2 if target_rec_q else 1
            fused = seat_fused_loss(
                q, gamma, w2, bias, g, target_rec_q, 1.0, 1.0,
                plan=_plan(mode, q, gamma, w2, ctas_per_range=runs, p_range=32),
                dq=torch.full_like(q, nan), workspace_fill=nan,
            )
            assert all(torch.isfinite(t).all() for t in fused if t is not None)
    labels = seat_labels(q, gamma, out=torch.full((bsz, m), -1, device=DEVICE, dtype=torch.int64))
    assert ((labels >= 0) & (labels < gamma.shape[1])).all()


def test_rescale_in_place():
    """rescale_dq_: dq <- a dq + b uW in place; (1, 0) leaves every bit as it was."""
    gen = torch.Generator().manual_seed(31)
    bsz, m, p, c = 2, 70, 48, 3
    dq0 = torch.randn(bsz, m, p, generator=gen).to(DEVICE)
    u = torch.randn(bsz, m, c, generator=gen).to(DEVICE)
    w = torch.randn(c, p, generator=gen).to(DEVICE)
    for a, b in ((1.0, 0.0), (0.5, 2.0), (0.0, -1.0), (1.0, 0.5)):
        dq = dq0.clone()
        out = rescale_dq_(dq, u, w, torch.tensor([a, b], device=DEVICE))
        assert out.data_ptr() == dq.data_ptr()
        if (a, b) == (1.0, 0.0):
            assert torch.equal(dq, dq0)
        assert torch.allclose(dq, a * dq0 + b * (u @ w), rtol=1e-5, atol=1e-5), (a, b)


def test_gamma_broadcast_and_auto_impl():
    q, gamma, weight, bias = make_inputs(CASES["n27_c8_rows"], torch.float32, seed=29)
    shared = gamma[:1]
    got = ops.seat_reconstruct(q, shared, weight, bias, impl="triton")
    ref = ops.seat_reconstruct(q, shared.expand(2, -1, -1), weight, bias, impl="torch")
    for g, r in zip(got, ref):
        assert rel_err(g, r) < FP32_TOL
    assert ops.resolve_impl("auto", DEVICE) == ("triton" if CUDA else "torch")
    for g, r in zip(ops.seat_reconstruct(q, gamma, weight, bias), ops.seat_reconstruct_reference(q, gamma, weight, bias)):
        assert rel_err(g, r) < FP32_TOL


def test_auto_runs_the_reference_above_the_measured_n(monkeypatch):
    """impl='auto' on an sm80+ GPU: the kernels up to AUTO_TRITON_MAX_N semantics, the PyTorch
    reference above (measured faster there); a named impl is kept at any N."""
    monkeypatch.setattr(ops, "_HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    assert ops.resolve_impl("auto", cuda) == "triton"
    assert ops.resolve_impl("auto", cuda, 27) == "triton"
    assert ops.resolve_impl("auto", cuda, ops.AUTO_TRITON_MAX_N) == "triton"
    assert ops.resolve_impl("auto", cuda, ops.AUTO_TRITON_MAX_N + 1) == "torch"
    assert ops.resolve_impl("triton", cuda, 256) == "triton"
    assert ops.resolve_impl("auto", torch.device("cpu"), 27) == "torch"


def _errors_inputs():
    q = torch.randn(1, 20, 32, device=DEVICE)
    return q, torch.randn(1, 4, 32, device=DEVICE), torch.randn(3, 32, device=DEVICE), torch.randn(3, device=DEVICE)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, r"q must be \(B,M,P\)"),
        (lambda a: {**a, "gamma": a["gamma"][0]}, ValueError, r"gamma must be \(B,N,P\)"),
        (lambda a: {**a, "gamma": a["gamma"][..., :16]}, ValueError, "does not match q's P"),
        (lambda a: {**a, "weight": a["weight"][:, :16]}, ValueError, "input channels"),
        (lambda a: {**a, "weight": a["weight"][None]}, ValueError, "weight must be"),
        (lambda a: {**a, "gamma": a["gamma"][:, :1]}, ValueError, r"N \(gamma.shape\[1\]\) must be in 2..256"),
        (lambda a: {**a, "gamma": torch.randn(1, 257, 32, device=DEVICE)}, ValueError, "2..256"),
        (lambda a: {**a, "weight": torch.randn(9, 32, device=DEVICE), "bias": None}, ValueError, r"C .* 1..8"),
        (lambda a: {**a, "bias": a["bias"][:2]}, ValueError, "bias must be"),
        (lambda a: {**a, "gamma": torch.randn(2, 4, 32, device=DEVICE)}, ValueError, "batch"),
        (
            lambda a: {"q": a["q"][..., :8], "gamma": a["gamma"][..., :8], "weight": a["weight"][:, :8], "bias": None},
            ValueError,
            "P must be at least 16",
        ),
        (lambda a: {**a, "q": a["q"].to(torch.int32)}, TypeError, "q must be float16"),
        (lambda a: {**a, "weight": a["weight"].to(torch.int64)}, TypeError, "weight must be float16"),
        (lambda a: {**a, "gamma": [1.0]}, TypeError, "gamma must be a torch.Tensor"),
        (lambda a: {**a, "impl": "cuda"}, ValueError, "expected 'auto', 'triton' or 'torch'"),
    ],
)
def test_clear_errors(change, error, match):
    q, gamma, weight, bias = _errors_inputs()
    args = change({"q": q, "gamma": gamma, "weight": weight, "bias": bias})
    impl = args.pop("impl", "triton")
    with pytest.raises(error, match=match):
        ops.seat_reconstruct(args["q"], args["gamma"], args["weight"], args["bias"], impl=impl)


def test_clear_errors_loss_and_devices():
    q, gamma, weight, bias = _errors_inputs()
    with pytest.raises(ValueError, match="x must be"):
        ops.seat_reconstruct_loss(q, gamma, weight, bias, torch.randn(1, 20, 2, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="consistency_target"):
        ops.seat_reconstruct_loss(q, gamma, weight, bias, torch.randn(1, 20, 3, device=DEVICE), "theta")
    with pytest.raises(ValueError, match="loss_weights"):
        ops.seat_reconstruct_loss(q, gamma, weight, bias, torch.randn(1, 20, 3, device=DEVICE), loss_weights=(1, 0))
    with pytest.raises(ValueError, match="N .* must be in 2..256"):
        ops.seat_labels(q, gamma[:, :1], impl="triton")
    if CUDA:
        with pytest.raises(ValueError, match="one device"):
            ops.seat_reconstruct(q, gamma.cpu(), weight, bias, impl="triton")
    else:
        meta = torch.randn(3, 32, device="meta")
        with pytest.raises(ValueError, match="one device"):
            ops.seat_reconstruct(q, gamma, meta, None, impl="triton")
    with pytest.raises(ValueError, match="design="):
        ops.seat_reconstruct_loss(q, gamma, weight, bias, torch.randn(1, 20, 3, device=DEVICE), design="one_pass")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("empty", ["batch", "pixels"])
def test_empty_batch_or_no_pixels_is_a_clear_error(empty, impl):
    """Issue 9: not a NaN loss (the mean of nothing) nor an empty grid launch."""
    if empty == "batch":
        q, gamma, x = torch.randn(0, 32, 4, 4), torch.randn(1, 5, 32), torch.randn(0, 3, 4, 4)
        match = "empty batch"
    else:
        q, gamma, x = torch.randn(2, 32, 0, 4), torch.randn(2, 5, 32), torch.randn(2, 3, 0, 4)
        match = "no pixels"
    q, gamma, x = q.to(DEVICE), gamma.to(DEVICE), x.to(DEVICE)
    weight = torch.randn(3, 32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        ops.seat_reconstruct(q, gamma, weight, None, impl=impl)
    with pytest.raises(ValueError, match=match):
        ops.seat_reconstruct_loss(q, gamma, weight, None, x, impl=impl)
    with pytest.raises(ValueError, match=match):
        ops.seat_labels(q, gamma, impl=impl)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, g, w, a: seat_forward(q, g, torch.randn(9, 48, device=DEVICE), None), r"C in 1..8"),
        (lambda q, g, w, a: seat_forward(q[:, :, :8], g[:, :, :8], w[:, :8], None), "P >= 16"),
        (lambda q, g, w, a: seat_labels(q[:0], g[:0]), "at least one image"),
        (lambda q, g, w, a: seat_forward(q, g[:, :1], w, None), r"N in 2..256"),
        (lambda q, g, w, a: launch_grad(MODE_GRADS, q, g, w, None, attn=a, grad_rec_q=a, grad_rec_t=a),
         r"grad_rec_q must have shape \(2, 20, 3\)"),
        (lambda q, g, w, a: launch_grad(MODE_GRADS, q, g, w, None, attn=a.transpose(1, 2).contiguous()
                                        .transpose(1, 2), grad_rec_q=a[..., :3], grad_rec_t=a[..., :3]),
         "contiguous"),
        (lambda q, g, w, a: launch_grad(1, q, g, w, None), "target image x"),
        (lambda q, g, w, a: seat_fused_loss(q, g, torch.randn(9, 48, device=DEVICE), None, a, False, 1.0, 1.0), r"C in 1..8"),
    ],
)
def test_launchers_check_their_preconditions(call, match):
    """Direct callers of the launchers get the same clear errors as san_fast.ops' users."""
    q, g, w = torch.randn(2, 20, 48), torch.randn(2, 5, 48), torch.randn(3, 48)
    a = torch.softmax(torch.randn(2, 20, 5), -1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q.to(DEVICE), g.to(DEVICE), w.to(DEVICE), a.to(DEVICE))

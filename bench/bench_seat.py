"""SEAT + reconstruction: fused Triton op against PyTorch ways of computing the same thing.

Variants: `triton` (san_fast.ops, impl="triton"), `eager` (the plain PyTorch reference),
`compiled` (torch.compile of the reference; GPU only), `sdpa` (Theta through
F.scaled_dot_product_attention with gamma as key and value, then the 1x1 conv as a linear).
Each as forward (`fwd`) and forward+backward (`fwdbwd`), plus the losses L_rec + L_con with
their backward (`loss`; Triton's fused-loss kernel against the reference losses).

benchmark.extra_info: ms (median), GB/s over the minimum bytes the op must move, that as a
fraction of the session's measured copy bandwidth, the peak memory allocated beyond the
inputs (CUDA only; None on CPU), and for the Triton variant the autotuners' picks (look their
registers and spills up with `python -m san_fast.kernels.compile_report`).

On a GPU: the paper shape (B=16, 128x128, P=1024, N=27, bf16) with every variant, and sweeps
over HW and N for the Triton op and eager. On the CPU the Triton kernels run in the
interpreter, so one tiny fp32 shape only: the numbers there say nothing about speed, the run
checks that the benchmark code works.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from san_fast import ops
from san_fast.kernels import seat_common

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def shape(bsz, hw, p, n, c, dtype):
    return {"B": bsz, "M": hw, "P": p, "N": n, "C": c, "dtype": dtype}


if CUDA:
    PAPER = shape(16, 128 * 128, 1024, 27, 3, torch.bfloat16)
    SHAPES = {"paper": PAPER}
    for side in (32, 64, 256):
        SHAPES[f"hw{side}x{side}"] = {**PAPER, "M": side * side}
    for n in (6, 100, 256):
        SHAPES[f"n{n}"] = {**PAPER, "N": n}
    ALL_VARIANTS = ("triton", "eager", "compiled", "sdpa")
    SWEEP_VARIANTS = ("triton", "eager")
    ROUNDS, WARMUP = 20, 3
else:
    SHAPES = {"tiny": shape(1, 16 * 16, 64, 6, 3, torch.float32)}
    ALL_VARIANTS = ("triton", "eager", "sdpa")
    SWEEP_VARIANTS = ALL_VARIANTS
    ROUNDS, WARMUP = 3, 1

MODES = ("fwd", "fwdbwd", "loss")
TUNED_KINDS = {"fwd": ("forward",), "fwdbwd": ("forward", "backward"), "loss": ("loss",)}


def _cases():
    for shape_name in SHAPES:
        variants = ALL_VARIANTS if shape_name in ("paper", "tiny") else SWEEP_VARIANTS
        for variant in variants:
            for mode in MODES:
                if variant == "sdpa" and mode == "loss":
                    continue
                yield pytest.param(shape_name, variant, mode, id=f"{shape_name}-{variant}-{mode}")


def min_bytes(s: dict, mode: str) -> int:
    """Bytes the op cannot avoid moving.

    fwd:    read Q (B*M*P*e) + read gamma (B*N*P*4) + W (C*P*4) + write rec_q, rec_t (2*B*M*C*e)
    fwdbwd: fwd + read grads of rec_q, rec_t (2*B*M*C*e) + write dQ (B*M*P*e)
            + write dgamma (B*N*P*4) + dW (C*P*4)
    loss:   read Q + x (B*M*C*e) + gamma + W, write dQ + dgamma + dW (Q read once in total)
    with e = Q's element size; gamma and W are fp32 master weights.
    """
    e = torch.finfo(s["dtype"]).bits // 8
    bsz, m, p, n, c = s["B"], s["M"], s["P"], s["N"], s["C"]
    q, small_in, outs = bsz * m * p * e, bsz * n * p * 4 + c * p * 4, 2 * bsz * m * c * e
    if mode == "fwd":
        return q + small_in + outs
    if mode == "fwdbwd":
        return q + small_in + outs + outs + q + small_in
    return q + bsz * m * c * e + small_in + q + small_in


def make_inputs(s: dict):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bsz, m, p, n, c = s["B"], s["M"], s["P"], s["N"], s["C"]
    side = int(m ** 0.5)
    q = torch.randn(bsz, p, side, side, device=DEVICE, generator=gen).to(s["dtype"])
    q = q.contiguous(memory_format=torch.channels_last).requires_grad_()
    gamma = torch.randn(bsz, n, p, device=DEVICE, generator=gen).requires_grad_()
    weight = (torch.randn(c, p, 1, 1, device=DEVICE, generator=gen) / p ** 0.5).requires_grad_()
    bias = torch.randn(c, device=DEVICE, generator=gen).requires_grad_()
    x = torch.randn(bsz, c, side, side, device=DEVICE, generator=gen).to(s["dtype"])
    grads = tuple(torch.randn(bsz, m, c, device=DEVICE, generator=gen).to(s["dtype"]) for _ in range(2))
    return q, gamma, weight, bias, x, grads


def sdpa_reconstruct(q, gamma, weight, bias):
    rows = q.flatten(2).transpose(1, 2)
    g = gamma.to(rows.dtype).unsqueeze(1)
    theta = F.scaled_dot_product_attention(rows.unsqueeze(1), g, g).squeeze(1)
    w = weight.flatten(1).to(rows.dtype)
    b = bias.to(rows.dtype)
    return F.linear(rows, w, b), F.linear(theta, w, b)


@functools.cache
def compiled_reference():
    return torch.compile(ops.seat_reconstruct_reference)


@functools.cache
def compiled_reference_loss():
    return torch.compile(ops.seat_reconstruct_loss_reference)


def reconstruct_fn(variant: str):
    if variant == "triton":
        return functools.partial(ops.seat_reconstruct, impl="triton")
    if variant == "eager":
        return ops.seat_reconstruct_reference
    if variant == "compiled":
        return compiled_reference()
    return sdpa_reconstruct


def loss_fn(variant: str):
    if variant == "triton":
        return functools.partial(ops.seat_reconstruct_loss, impl="triton")
    if variant == "eager":
        return ops.seat_reconstruct_loss_reference
    return compiled_reference_loss()


def build(variant: str, mode: str, inputs):
    q, gamma, weight, bias, x, grads = inputs
    params = (q, gamma, weight, bias)
    if mode == "fwd":
        op = reconstruct_fn(variant)

        def run():
            with torch.no_grad():
                return op(q, gamma, weight, bias)

    elif mode == "fwdbwd":
        op = reconstruct_fn(variant)

        def run():
            outs = op(q, gamma, weight, bias)
            return torch.autograd.grad(outs, params, grads)

    else:
        op = loss_fn(variant)

        def run():
            l_rec, l_con = op(q, gamma, weight, bias, x)
            return torch.autograd.grad(l_rec + l_con, params)

    return run


def synced(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


def extra_peak_bytes(fn):
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@pytest.mark.parametrize("shape_name,variant,mode", list(_cases()))
def test_seat(benchmark, copy_bandwidth, shape_name, variant, mode):
    s = SHAPES[shape_name]
    inputs = make_inputs(s)
    run = synced(build(variant, mode, inputs))
    run()  # autotuning / compilation outside the timed rounds
    extra = extra_peak_bytes(run)
    benchmark.group = f"{shape_name}-{mode}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    seconds = benchmark.stats.stats.median
    nbytes = min_bytes(s, mode)
    q_bytes = s["B"] * s["M"] * s["P"] * (torch.finfo(s["dtype"]).bits // 8)
    benchmark.extra_info.update(
        {
            "shape": {k: (str(v) if k == "dtype" else v) for k, v in s.items()},
            "variant": variant,
            "mode": mode,
            "ms": seconds * 1e3,
            "min_bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9,
            "copy_gb_per_s": copy_bandwidth / 1e9,
            "fraction_of_copy_bw": nbytes / seconds / copy_bandwidth,
            "extra_peak_mb": None if extra is None else extra / 2**20,
            # dQ is an output the backward cannot avoid; what is left is the op's own overhead.
            "extra_peak_beyond_dq_vs_q": (
                None if extra is None else (extra - (q_bytes if mode != "fwd" else 0)) / q_bytes
            ),
            "autotuned": seat_common.chosen_configs(TUNED_KINDS[mode]) if variant == "triton" else None,
        }
    )

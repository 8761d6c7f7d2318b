"""SEAT + reconstruction benchmarks under pytest-benchmark: `pytest bench/ --benchmark-only`.

The cases and the measurement are bench/seat_measure.py's (the GPU check runs the same code
without pytest, under its time budget). pytest-benchmark's own statistics time each call on the
host, synchronised with the device; the honest device figures are in `extra_info`: `ms` (median
of CUDA-event timings with L2 flushed before each run), floor and modeled bytes, GB/s over
each, fraction of the measured copy bandwidth, extra peak memory over Q, and the H100 targets
beside the paper-shape Triton rows.

On a GPU: the paper shape (B=16, 128x128, P=1024, N=27, bf16) with every variant, then the
sweeps (N, HW, B) for the Triton op and eager. On the CPU the Triton kernels run in the
interpreter, so one tiny fp32 shape only: the numbers there say nothing about speed, the run
checks that the benchmark code works.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.seat_measure import PAPER, TINY, build, cases, measure_case, sweep_shapes

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = {"paper": PAPER, **sweep_shapes()} if CUDA else {"tiny": TINY}
ROUNDS = 5 if CUDA else 2


@functools.lru_cache(maxsize=1)  # one shape's inputs alive at a time (Q is 0.5 GiB on a GPU)
def inputs_for(shape_name: str):
    from bench.seat_measure import make_inputs

    return make_inputs(SHAPES[shape_name], DEVICE)


def synced(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="session")
def gpu_spec():
    if not CUDA:
        return "H100"
    from san_fast.gpu_specs import spec_for_device

    return spec_for_device(DEVICE)


@pytest.mark.parametrize(
    "shape_name,variant,mode",
    [pytest.param(n, v, m, id=f"{n}-{v}-{m}") for n in SHAPES for v, m in cases(n, DEVICE)],
)
def test_seat(benchmark, copy_bandwidth, gpu_spec, shape_name, variant, mode):
    inputs = inputs_for(shape_name)
    row = measure_case(shape_name, SHAPES[shape_name], variant, mode, inputs, DEVICE, copy_bandwidth, gpu_spec)
    benchmark.group = f"{shape_name}-{mode}"
    benchmark.pedantic(synced(build(variant, mode, inputs)), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(row)

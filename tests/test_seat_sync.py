"""No SEAT op reads a device value on the host, in its forward or its backward, eager or compiled.

CPU: the Tensor methods that copy a value to the host (.item(), .tolist(), bool(), float(), int(),
.cpu(), .numpy()) are patched to raise when san_fast's own code calls them, while every op runs
forward and backward (the fused loss with its in-place rescale and a second backward through the
same graph included). The Triton interpreter itself copies tensors to numpy: calls from outside
san_fast pass through. GPU (marked gpu): the same ops under torch.cuda.set_sync_debug_mode("error"),
after a warm-up call that autotunes and compiles (both of which synchronize on purpose).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from san_fast.kernels import seat_plan

from san_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OURS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules["san_fast"], seat_plan))
_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def host_reads_forbidden():
    """Patch the host-reading Tensor methods to raise when called from san_fast's files."""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def guard(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(_OURS):
                raise AssertionError(f"host sync: Tensor.{name} called from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 32, 6, 7, generator=gen).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(2, 5, 32, generator=gen).to(DEVICE)
    weight = (torch.randn(3, 32, 1, 1, generator=gen) / 6).to(DEVICE)
    bias = torch.randn(3, generator=gen).to(DEVICE)
    x = torch.randn(2, 3, 6, 7, generator=gen).to(DEVICE, dtype)
    return [t.requires_grad_() for t in (q, gamma, weight, bias)] + [x]


def every_op(dtype=torch.float32, inputs=None):
    """Forward and backward of each op, as a training step would run them (on `inputs`, made
    beforehand where making them would be the synchronisation a check sees)."""
    q, gamma, weight, bias, x = inputs if inputs is not None else _inputs(dtype=dtype)
    rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton")
    torch.autograd.backward((rec_q, rec_t), (torch.ones_like(rec_q), torch.ones_like(rec_t)))
    for design in ("fused", "relay", "two_pass"):
        l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton", design=design)
        # Upstream gradients other than the hint: the fused loss rescales dQ in place, then
        # recomputes it for the second backward through the same graph.
        torch.autograd.grad(2.0 * l_rec + 0.5 * l_con, (q, gamma, weight, bias), retain_graph=True)
        torch.autograd.grad(l_rec + l_con, (q, gamma, weight, bias))
    # BatchNorm folded with its statistics' backward in the dq pass (kernels/seat_bn_split.py).
    var, mean = torch.var_mean(q.detach().float(), dim=(0, 2, 3), correction=0)
    bn_w = torch.ones_like(mean).requires_grad_()
    bn_b = torch.zeros_like(mean).requires_grad_()
    stats = ops.BatchStats(mean, var, bn_w, bn_b, 1e-5)
    l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton", design="two_pass",
                                             affine=stats)
    torch.autograd.grad(l_rec + l_con, (q, gamma, weight, bias, bn_w, bn_b))
    with torch.no_grad():
        ops.seat_labels(q, gamma, impl="triton")
        ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton")


def test_guard_catches_a_host_read_from_san_fast():
    """The guard is real: code in a san_fast file that reads a value fails under it; the same
    read elsewhere passes."""
    namespace: dict = {}
    exec(compile("def positive(t):\n    return bool(t.sum() > 0)\n", ops.__file__, "exec"), namespace)
    t = torch.ones(2, device=DEVICE)
    with host_reads_forbidden():
        with pytest.raises(AssertionError, match="host sync: Tensor.__bool__"):
            namespace["positive"](t)
        assert bool(t.sum() > 0)


@pytest.mark.skipif(CUDA, reason="the CPU check; CUDA runs test_no_sync_on_gpu")
def test_no_host_read_eager():
    with host_reads_forbidden():
        every_op()


@pytest.mark.skipif(CUDA, reason="the CPU check; CUDA runs test_no_sync_on_gpu")
def test_no_host_read_compiled():
    """Compiled (aot_eager: the ops are opaque custom ops), forward and backward."""
    def step(q, gamma, weight, bias, x):
        rec_q, rec_t = ops.seat_reconstruct(q, gamma, weight, bias, impl="triton")
        l_rec, l_con = ops.seat_reconstruct_loss(q, gamma, weight, bias, x, impl="triton")
        return rec_q.mean() + rec_t.square().mean() + l_rec + 0.5 * l_con

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(*_inputs(1)).backward()  # trace outside the guard (dynamo reads guards' values)
    with host_reads_forbidden():
        compiled(*_inputs(2)).backward()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_no_sync_on_gpu(dtype):
    every_op(dtype)  # warm-up: autotuning and compiling synchronize on purpose
    inputs = _inputs(seed=1, dtype=dtype)  # copied from the host: a synchronisation of the test's own
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        every_op(dtype, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")

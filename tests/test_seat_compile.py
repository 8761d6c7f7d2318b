"""torch.compile keeps Q where its producer wrote it: no copy of q around the SEAT ops.

The ops are opaque torch.library.custom_op's on every device (kernels/seat_autograd.py), so
inductor neither analyses the Triton kernels' mutations (the analysis that, on torch 2.11 +
triton 3.6, falls back to "every input mutated" and clones q: pytorch issues 170049, 173795)
nor needs to copy anything for them. Checked on inductor's generated code: the q given to
seat_forward is a view of the buffer its producer (BatchNorm) wrote, no other buffer of Q's size
is allocated in the forward, and seat_backward reads the saved Q (a graph input of the backward).
CPU: a model-shaped step (conv, BatchNorm, the SEAT losses), inductor's C++ backend, also with BatchNorm
folded into the ops (then no buffer of Q's size exists in the forward at all). GPU (marked
gpu): the SAN model's own loss.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from san_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def _buffers(code: str) -> dict[str, int]:
    """Buffers allocated in a generated `call`, by name: their number of elements."""
    out = {}
    for name, size in re.findall(r"(buf\d+) = empty_strided_\w+\(\(([^)]*)\)", code):
        dims = [int(d) for d in size.replace(" ", "").split(",") if d]
        out[name] = math.prod(dims)
    return out


def _q_argument(code: str, op: str) -> str:
    """The buffer (or graph input) a san_fast op gets as q."""
    match = re.search(rf"torch\.ops\.san_fast\.{op}\.default\((?:reinterpret_tensor\()?(\w+)", code)
    assert match, f"{op} is not called in this graph"
    return match.group(1)


def _graph_inputs(code: str) -> set[str]:
    match = re.search(r"\n\s+(.*?) = args\n", code)
    return {name.strip() for name in match.group(1).split(",")} if match else set()


def check_no_copy_of_q(codes: list[str], q_numel: int, suffix: str = "") -> None:
    """`suffix` "_folded": the BatchNorm-folded ops, whose q is the conv output y."""
    forward = next(c for c in codes if f"san_fast.seat_forward{suffix}.default" in c)
    backward = next(c for c in codes if f"san_fast.seat_backward{suffix}.default" in c)
    q_buf = _q_argument(forward, f"seat_forward{suffix}")
    q_sized = [name for name, numel in _buffers(forward).items() if numel == q_numel]
    assert q_sized == [q_buf], f"buffers of Q's size in the forward: {q_sized}, q passed as {q_buf}"
    writers = [line for line in forward.splitlines() if re.search(rf"\b{q_buf}\b", line) and "(" in line
               and "empty_strided" not in line and "san_fast" not in line and "reinterpret" not in line]
    assert len(writers) == 1, f"{q_buf} written by {writers}"  # its producer, once
    q_saved = _q_argument(backward, f"seat_backward{suffix}")
    assert q_saved in _graph_inputs(backward), f"seat_backward reads {q_saved}, not a saved tensor"


def check_folded_never_writes_q(codes: list[str], q_numel: int) -> None:
    """BatchNorm folded into the ops: they read the conv output y, and the forward allocates no
    other buffer of Q's size (BatchNorm's output is never written); the backward (the fold's,
    or the split one's two passes: kernels/seat_bn_split.py) reads saved y."""
    forward = next(c for c in codes if "san_fast.seat_forward_folded.default" in c)
    backward = next(c for c in codes if "san_fast.seat_backward_folded" in c)
    assert "san_fast.seat_forward.default" not in forward
    y_buf = _q_argument(forward, "seat_forward_folded")
    q_sized = [name for name, numel in _buffers(forward).items() if numel == q_numel and name != y_buf]
    assert not q_sized, f"buffers of Q's size in the folded forward besides y ({y_buf}): {q_sized}"
    ops_called = set(re.findall(r"san_fast\.(seat_backward_folded\w*)\.default", backward))
    assert ops_called in ({"seat_backward_folded"},
                          {"seat_backward_folded_sums", "seat_backward_folded_dq_affine"}), ops_called
    for op in ops_called:
        y_saved = _q_argument(backward, op)
        assert y_saved in _graph_inputs(backward), f"{op} reads {y_saved}, not a saved tensor"


class Step(torch.nn.Module):
    """The model's shape around SEAT: Q = BN(conv(x)) in channels-last, the two losses and the
    reconstruction, then a scalar loss."""

    def __init__(self, p=32, n=5, c=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, p, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(p)
        self.gamma = torch.nn.Parameter(torch.randn(1, n, p))
        self.recon = torch.nn.Conv2d(p, c, 1)

    def forward(self, x):
        q = self.bn(self.conv(x))
        l_rec, l_con = ops.seat_reconstruct_loss(q, self.gamma, self.recon.weight, self.recon.bias, x,
                                                 impl="triton")
        rec_q, rec_t = ops.seat_reconstruct(q, self.gamma, self.recon.weight, self.recon.bias, impl="triton")
        return l_rec + l_con + rec_t.square().mean(), q.numel()


class FoldedStep(Step):
    """Step with BatchNorm applied inside the SEAT ops (kernels/seat_bn_fold.py)."""

    def forward(self, x):
        from san_fast.model.sync_batchnorm import batch_affine

        y = self.conv(x)
        affine = batch_affine(self.bn, y)
        l_rec, l_con = ops.seat_reconstruct_loss(y, self.gamma, self.recon.weight, self.recon.bias, x,
                                                 impl="triton", affine=affine)
        rec_q, rec_t = ops.seat_reconstruct(y, self.gamma, self.recon.weight, self.recon.bias, impl="triton",
                                            affine=affine)
        return l_rec + l_con + rec_t.square().mean(), y.numel()


def _compiled_step_codes(cls=Step):
    torch.manual_seed(0)
    step = cls().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(step, fullgraph=True)

    def run():
        loss, q_numel = compiled(x)
        loss.backward()
        return q_numel

    return run_and_get_code(run)


@pytest.mark.skipif(CUDA, reason="the CPU check; CUDA runs test_compiled_model_loss_does_not_copy_q_gpu")
def test_compiled_step_does_not_copy_q():
    q_numel, codes = _compiled_step_codes()
    check_no_copy_of_q(codes, q_numel)
    # The check is real: the same code with a copy of q spliced in before the op fails it.
    forward = next(i for i, c in enumerate(codes) if "san_fast.seat_forward" in c)
    q_buf = _q_argument(codes[forward], "seat_forward")
    shape = re.search(rf"{q_buf} = (empty_strided_\w+\([^\n]*)", codes[forward]).group(1)
    copied = codes[forward].replace(
        "        # Topologically Sorted Source Nodes: [", f"        buf999 = {shape}\n        copy_kernel({q_buf}, buf999)\n"
        "        # Topologically Sorted Source Nodes: [", 1)
    copied = copied.replace(f"seat_forward.default(reinterpret_tensor({q_buf},", "seat_forward.default("
                            "reinterpret_tensor(buf999,")
    with pytest.raises(AssertionError, match="buffers of Q's size"):
        check_no_copy_of_q([copied if i == forward else c for i, c in enumerate(codes)], q_numel)


@pytest.mark.skipif(CUDA, reason="the CPU check; CUDA runs test_compiled_model_loss_does_not_copy_q_gpu")
def test_compiled_folded_step_never_writes_q_and_matches_eager():
    q_numel, codes = _compiled_step_codes(FoldedStep)
    check_folded_never_writes_q(codes, q_numel)
    torch.manual_seed(0)
    eager, twin = FoldedStep(), FoldedStep()
    twin.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for model in (eager, torch.compile(twin, fullgraph=True)):
        model(x)[0].backward()
    assert torch.allclose(twin.bn.running_var, eager.bn.running_var, rtol=1e-5)
    for (name, got), want in zip(twin.named_parameters(), eager.parameters()):
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fold_bn", ["off", "on"])
def test_compiled_model_loss_does_not_copy_q_gpu(fold_bn):
    from san_fast.config import Config
    from san_fast.model import SAN

    torch.manual_seed(0)
    cfg = Config(crop_size=32, embed_dim=64, vit_dim=32, vit_heads=2, vit_depth=1, synthetic_classes=5,
                 seat_impl="triton", device="cuda", fold_bn=fold_bn).validate()
    model = SAN(cfg).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model.losses, fullgraph=True)

    def run():
        out, q, _ = compiled(x)
        out["loss"].backward()
        return q.y.numel() if isinstance(q, ops.FoldedQ) else q.numel()

    q_numel, codes = run_and_get_code(run)
    if fold_bn == "on":
        check_folded_never_writes_q(codes, q_numel)
    else:
        check_no_copy_of_q(codes, q_numel)

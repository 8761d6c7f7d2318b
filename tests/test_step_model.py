"""The training-step model (bench/step_model.py): FLOPs and bytes of a tiny step against hand
counts, the fusion assumptions (compile, Adam, BatchNorm folded), the CLI and its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import step_cost
from bench import step_model as sm

ROOT = Path(__file__).resolve().parents[1]
B, SIDE, P = 2, 16, 32
TINY = ["--preset", "cpu", "--crop-size", str(SIDE), "--embed-dim", str(P), "--vit-dim", "32", "--vit-heads", "2",
        "--vit-depth", "1", "--patch-size", "8", "--batch-size", str(B), "--num-semantics", "4"]
Q_FP32 = B * SIDE * SIDE * P * 4  # Q in fp32
VECTORS = 64 * P * 4  # slack for the per-channel vectors a norm reads and writes (weights, statistics)


def traced(flags, adam="foreach", bn_folded=False, monitor_grad="off", bn_split=None):
    cfg = sm.config_for(TINY + flags)
    settings = sm.resolve_settings(cfg, "H100", adam, bn_folded, monitor_grad, bn_split)
    return sm.trace_step(cfg, settings), settings


def kernel_bytes(trace, settings, phase, names):
    return [k.bytes for k in step_cost.kernels(trace, settings) if k.phase == phase and k.names == names]


def test_flops_match_hand_counts():
    trace, _ = traced(["--amp", "off", "--seat-impl", "torch"])
    convs = [op.flops for op in trace.ops if op.part == "encoder" and op.name == "convolution"]
    # Conv3x3 3 -> P/2 and conv1x1 P/2 -> P at full resolution: 2 * outputs * inputs per output.
    assert convs == [2 * B * SIDE * SIDE * (P // 2) * 3 * 9, 2 * B * SIDE * SIDE * P * (P // 2)]
    tokens, width = (SIDE // 8) ** 2, 32
    qkv = [op.flops for op in trace.ops if op.phase == "fwd" and op.name == "addmm"
           and op.flops == 2 * B * tokens * width * 3 * width]
    assert len(qkv) == 1  # one ViT block
    assert sum(op.flops for op in trace.ops) == trace.flop_counter_total > 0


def test_eager_bytes_match_hand_counts():
    trace, settings = traced(["--amp", "off", "--seat-impl", "torch"])
    half = Q_FP32 // 2
    # conv1x1: read its input (P/2 channels) and weight, write h (P channels); no bias.
    assert kernel_bytes(trace, settings, "fwd", ["convolution"])[1] == half + P * (P // 2) * 4 + Q_FP32
    # BatchNorm in eager: a statistics pass reading x, then a pass reading x and writing y.
    stats = kernel_bytes(trace, settings, "fwd", ["native_batch_norm:stats"])
    applies = kernel_bytes(trace, settings, "fwd", ["native_batch_norm:apply"])
    assert stats == [half, Q_FP32]
    assert [abs(got - want) <= VECTORS for got, want in zip(applies, [2 * half, 2 * Q_FP32])] == [True, True]


def test_compile_fuses_batchnorm_with_gelu():
    trace, settings = traced(["--amp", "off", "--seat-impl", "torch", "--compile"])
    fused = kernel_bytes(trace, settings, "fwd", ["native_batch_norm:apply", "gelu"])
    # One pass: read the conv3x3 output, write GELU's output only (BN1's is recomputed in the
    # backward, see the partitioner test below).
    assert len(fused) == 1 and abs(fused[0] - Q_FP32) <= VECTORS
    # GELU's backward and BN1's two sums: read dh and the conv3x3 output, never BN1's output,
    # and write GELU's input gradient for BN1's elementwise pass.
    backward = kernel_bytes(trace, settings, "bwd", ["gelu_backward", "native_batch_norm_backward:sums"])
    assert len(backward) == 1 and abs(backward[0] - 3 * Q_FP32 // 2) <= VECTORS
    eager_trace, eager_settings = traced(["--amp", "off", "--seat-impl", "torch"])
    # Eager's GELU backward of the encoder (the largest; the ViT's are smaller): dh, BN1 out, dx.
    eager_backward = max(kernel_bytes(eager_trace, eager_settings, "bwd", ["gelu_backward"]))
    assert eager_backward == 3 * Q_FP32 // 2
    total = sum(k.bytes for k in step_cost.kernels(trace, settings))
    assert total < sum(k.bytes for k in step_cost.kernels(eager_trace, eager_settings))
    assert step_cost.activation_bytes(trace, settings) == \
        step_cost.activation_bytes(eager_trace, eager_settings) - Q_FP32 // 2


def _saved_by_partition(partition, head) -> list:
    """numel of each tensor the compiled forward of the pixel encoder followed by `head` saves
    for its backward under `partition` (AOTAutograd with Inductor's decompositions, the graphs
    run uncompiled)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from san_fast.model.encoders import PixelPerceptron

    sizes = []

    def forward_compiler(gm, _inputs):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        sizes.extend(a.meta["val"].numel() for a in output.args[0] if "val" in getattr(a, "meta", {}))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=partition, decompositions=select_decomp_table())
    torch.manual_seed(0)
    encoder, tokens = PixelPerceptron(16), torch.randn(16, 4, requires_grad=True)
    torch._dynamo.reset()
    step = torch.compile(lambda x: head(encoder(x), tokens).square().mean(), backend=backend, fullgraph=True)
    step(torch.randn(2, 3, 8, 8)).backward()
    torch._dynamo.reset()
    return sizes


@pytest.mark.parametrize("head,q_saved", [(lambda q, _: q, 1), (lambda q, t: q.flatten(2).transpose(1, 2) @ t, 2)],
                         ids=["elementwise", "matmul"])
def test_the_compiled_partition_recomputes_batchnorm_outputs(head, q_saved):
    """The step model's --compile rule for saved tensors, checked against the partitioner
    Inductor uses. Of the three (B, P/2, H, W) tensors (conv3x3 output, BN1 output, GELU
    output) the backward keeps the conv output and GELU's (conv1x1's weight gradient reads it)
    and recomputes BN1's. Of the two (B, P, H, W) ones (conv1x1 output, Q = BN2 output), Q is
    recomputed when only element-wise backward ops read it, kept when a matmul's backward does.
    The default partition, saving what the backward reads as eager does, keeps them all."""
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

    half, full = 2 * 8 * 8 * 8, 2 * 16 * 8 * 8
    min_cut = _saved_by_partition(min_cut_rematerialization_partition, head)
    assert (min_cut.count(half), min_cut.count(full)) == (2, q_saved)
    default = _saved_by_partition(default_partition, head)
    assert (default.count(half), default.count(full)) == (3, 2)


@pytest.mark.parametrize("adam,per_param", [("foreach", 72), ("fused", 28)])
def test_adam_bytes_per_parameter(adam, per_param):
    trace, settings = traced(["--amp", "off"], adam=adam)
    moved = sum(k.bytes for k in step_cost.kernels(trace, settings) if k.part == "optimizer")
    assert per_param <= moved / trace.params <= per_param + 1  # + the step counters


def test_bn_folding_removes_the_normalise_pass_and_the_backward_sums():
    flags = ["--amp", "off", "--seat-impl", "triton", "--compile"]
    plain, s_plain = traced(flags)
    folded, s_folded = traced(flags, bn_folded=True, bn_split=False)
    saved = (sum(k.bytes for k in step_cost.kernels(plain, s_plain))
             - sum(k.bytes for k in step_cost.kernels(folded, s_folded)))
    # Forward: read h, write Q; backward: read dQ and h for the two sums.
    assert abs(saved - 4 * Q_FP32) <= VECTORS
    with pytest.raises(ValueError, match="fused"):
        traced(["--seat-impl", "torch"], bn_folded=True)


def test_split_batchnorm_backward_removes_the_elementwise_pass():
    flags = ["--amp", "off", "--seat-impl", "triton", "--compile"]
    folded, s_folded = traced(flags, bn_folded=True, bn_split=False)
    split, s_split = traced(flags, bn_folded=True)  # the default where the fold runs two-pass
    assert s_split.bn_split and s_split.seat_two_pass
    removed = (sum(k.bytes for k in step_cost.kernels(folded, s_folded))
               - sum(k.bytes for k in step_cost.kernels(split, s_split)))
    from san_fast.kernels import traffic

    cfg = sm.config_for(TINY + flags)
    shape = (B, SIDE * SIDE, P, cfg.semantics(), 3)
    extra = [traffic.op_traffic("fused_loss", *shape, torch.float32, gpu="H100", folded=True, split_bn=s,
                                design="two_pass").total_bytes for s in (False, True)]
    # The elementwise pass (read dq and y, write dy) goes; the SEAT op reads y once more.
    assert abs(removed - (3 * Q_FP32 - (extra[1] - extra[0]))) <= VECTORS
    assert step_cost.activation_bytes(split, s_split) == step_cost.activation_bytes(folded, s_folded)
    with pytest.raises(ValueError, match="bn-split"):
        traced(flags, bn_split=True)  # nothing folded: nothing to split


def test_bn_folded_default_follows_fold_bn_and_the_seat_cost_counts_the_fold():
    def folded(flags, gpu="H100"):
        return sm.resolve_settings(sm.config_for(TINY + flags), gpu, "fused", None).bn_folded

    assert folded([]) and folded(["--fold-bn", "on"])  # auto: the fused SEAT op runs on an H100
    assert not folded(["--fold-bn", "off"]) and not folded(["--seat-impl", "torch"])
    assert not folded([], gpu="V100")  # no fused SEAT op there: nothing to fold into
    flags = ["--seat-impl", "triton", "--amp", "off"]
    seat = {f: [k for k in step_cost.kernels(*traced(flags, bn_folded=f)) if k.part == "seat"] for f in (0, 1)}
    from san_fast.kernels import traffic

    cfg = sm.config_for(TINY + flags)
    shape = (B, SIDE * SIDE, P, cfg.semantics(), 3)
    want = [traffic.op_traffic("fused_loss", *shape, torch.float32, gpu="H100", folded=bool(f)).total_bytes
            for f in (0, 1)]
    assert want[1] > want[0]  # the fold's operand ops and logit bias, in the SEAT op's cost
    assert sum(k.bytes for k in seat[1]) - sum(k.bytes for k in seat[0]) == want[1] - want[0]


def test_cli_writes_a_table_per_gpu(tmp_path, capsys):
    out = tmp_path / "model.json"
    assert sm.main(TINY + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["gpus"]) == {"H100", "A100", "V100"}
    for name, table in result["gpus"].items():
        assert table["total_ms"] == pytest.approx(sum(r["floor_ms"] for r in table["rows"]))
        assert table["total_ms"] > 0 and table["activation_gb_per_image"] > 0
        assert {"part", "category", "gflop", "gb", "floor_ms"} <= set(table["rows"][0])
    assert result["gpus"]["V100"]["settings"]["amp"] == "float16"  # no bf16 on sm70: fp16 + GradScaler
    assert not result["gpus"]["V100"]["settings"]["seat_fused"]
    assert "H100 (H100 SXM): floor" in capsys.readouterr().out


def test_script_runs_from_anywhere(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_model.py"), *TINY, "--gpu", "A100",
                           "--adam", "fused"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "A100" in proc.stdout and "fused Adam" in proc.stdout


def test_an_encoder_the_fold_cannot_be_modeled_for_is_modeled_unfolded_with_a_note():
    """The ResNet encoder's BatchNorm runs at 1/8 resolution before the upsampling: its output is
    not the SEAT op's Q. By default the model says so and models the step unfolded; asked for
    the fold explicitly, it refuses."""
    flags = TINY + ["--encoder", "resnet18", "--crop-size", "32", "--compile", "--seat-impl", "triton"]
    table = sm.model_step(flags, ["H100"])["gpus"]["H100"]
    assert "fold not modeled" in table["note"] and not table["settings"]["bn_folded"]
    with pytest.raises(ValueError, match="no BatchNorm produces the Q"):
        sm.model_step(flags, ["H100"], bn_folded=True)

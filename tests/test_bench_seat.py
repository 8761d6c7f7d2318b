"""The SEAT benchmark's bookkeeping (bench/seat_measure.py): cases, floors from the traffic
model, GB/s, memory over Q, and the targets beside the paper-shape rows."""

import os

import pytest
import torch

from bench import seat_measure as sm
from san_fast.gpu_specs import GPUS
from san_fast.kernels import traffic


def test_cases_cover_every_variant_at_the_paper_shape_only():
    gpu = torch.device("cuda")
    paper = sm.cases("paper", gpu)
    assert ("compiled", "loss") in paper and ("sdpa", "fwdbwd") in paper and ("triton", "labels") in paper
    assert ("sdpa", "loss") not in paper  # SDPA has no fused loss
    assert set(sm.cases("n256", gpu)) == {(v, m) for v in ("triton", "eager") for m in ("fwd", "fwdbwd", "loss")}
    assert all(v != "compiled" for v, _ in sm.cases("tiny", torch.device("cpu")))
    # BatchNorm's backward inside the SEAT kernels against the relay with it as its own pass, the
    # fold's autograd path and torch.
    assert [v for v, m in paper if m == "bnloss"] == ["triton", "relay", "fold", "eager"]
    assert paper[-3:] == [("compiled", m) for m in ("fwd", "fwdbwd", "loss")]  # compiles last
    # The loss's designs side by side: the launcher's choice, then each forced.
    at = paper.index(("triton", "loss"))
    assert paper[at:at + 3] == [("triton", "loss"), ("fused", "loss"), ("relay", "loss")]
    assert [v for v, _ in paper].count("relay") == 2 and ("relay", "loss") in sm.cases("tiny", torch.device("cpu"))
    fig = sm.traffic_figures(sm.PAPER, "bnloss", "triton", "H100")
    assert fig["modeled_bytes"] > sm.traffic_figures(sm.PAPER, "loss", "triton", "H100")["modeled_bytes"]
    # the relay with the statistics' pass moves more than the split two-pass (the launcher's pick)
    assert sm.traffic_figures(sm.PAPER, "bnloss", "relay", "H100")["modeled_bytes"] > fig["modeled_bytes"]


def test_floors_come_from_the_traffic_model():
    s = sm.PAPER
    fig = sm.traffic_figures(s, "fwdbwd", "triton", "H100")
    assert fig["floor_bytes"] == traffic.floor_bytes("forward_backward", s.B, s.M, s.P, s.N, s.C, s.dtype)
    assert fig["floor_bytes"] >= 3 * s.q_bytes()  # forward+backward: Q read twice, dQ written once
    assert fig["modeled_bytes"] >= fig["floor_bytes"]
    assert sm.traffic_figures(s, "fwd", "eager", "H100")["modeled_bytes"] is None  # the model is of our kernels


def test_figures_and_targets():
    s = sm.PAPER
    q = s.q_bytes()
    out = sm.figures(s, "loss", 0.5, {"floor_bytes": 2 * q, "modeled_bytes": 3 * q}, 3e12, extra=q + q // 50)
    assert out["gbps_floor"] == pytest.approx(2 * q / 0.5e-3 / 1e9)
    assert out["of_copy_bw_floor"] == pytest.approx(2 * q / 0.5e-3 / 3e12)
    assert out["extra_beyond_outputs_of_q"] == pytest.approx(0.02, abs=1e-3)  # dQ itself is not "extra"
    met = sm.target_fields("paper", "triton", "loss", 0.44, 0.02)
    assert met == {"target_ms": 0.45, "target_met": True, "target_met_graph": None, "target_extra_of_q": 0.05,
                   "extra_met": True}
    assert sm.target_fields("paper", "triton", "fwd", 0.30, None)["target_met"] is False
    # Bound by the host by events, within the target replayed from a CUDA graph:
    graphed = sm.target_fields("paper", "triton", "fwd", 0.69, None, graph=0.21)
    assert graphed["target_met"] is False and graphed["target_met_graph"] is True
    assert sm.target_fields("n6", "triton", "fwd", 0.1, None) == {}


def test_graph_replay_is_cuda_only_and_a_capture_failure_is_a_figure_not_a_stop(monkeypatch):
    """graph_ms times CUDA-graph replays on a GPU and gives None elsewhere; a case whose
    capture fails keeps its other figures and says why in graph_error."""
    from bench import timing

    assert timing.graph_ms(lambda: None, torch.device("cpu")) is None
    assert sm._graphed(lambda: None, torch.device("cpu"), 10) == {"graph_ms": None}

    def refused(fn, device, rep_ms):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(sm, "graph_ms", refused)
    got = sm._graphed(lambda: None, torch.device("cpu"), 10)
    assert got == {"graph_ms": None, "graph_error": "RuntimeError: operation not permitted when stream is capturing"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replay_times_a_captured_op_on_the_gpu():
    from bench.timing import graph_ms

    q = torch.randn(2, 64, 64, device="cuda")
    timing = graph_ms(lambda: q * 2 + 1, q.device, warmup_ms=2, rep_ms=5)
    assert timing["ms"] > 0 and timing["runs"] >= 1


@pytest.mark.parametrize("design", ["fused", "relay"])
def test_forced_design_rows_run_and_model_their_design(design):
    """The `fused` and `relay` rows run ops.seat_reconstruct_loss with that design, and carry
    the traffic model's bytes for it (not the launcher's choice) and the paper shape's targets."""
    s = sm.PAPER
    op = sm.loss_fn(design)
    assert op.keywords == {"impl": "triton", "design": design}
    want = traffic.op_traffic("fused_loss", s.B, s.M, s.P, s.N, s.C, s.dtype, gpu="H100", design=design)
    assert sm.traffic_figures(s, "loss", design, "H100")["modeled_bytes"] == int(want.total_bytes)
    assert sm.target_fields("paper", design, "loss", 0.4, 0.01)["target_met"] is True
    assert design in sm.TRITON_VARIANTS and design in sm.VARIANTS


def test_the_relay_and_fused_rows_differ_in_modeled_bytes():
    """Each forced row models its own design, not one for both: the relay design's producers
    write the attention that its gradient CTAs read back, traffic the fused design has not."""
    figs = {d: sm.traffic_figures(sm.PAPER, "loss", d, "H100")["modeled_bytes"] for d in ("fused", "relay")}
    assert figs["fused"] != figs["relay"]


def test_the_whole_row_sits_beside_the_split_where_the_planner_splits(monkeypatch):
    """At N = 64 (seat_plan.SPLIT_BACKWARD_BLOCK_N) the forward+backward runs twice: the planner's
    split and, as `whole`, the whole gradient kernel, each with its own modeled bytes; the
    override is the environment's and is gone after the case."""
    from san_fast.kernels import seat_plan

    cpu = torch.device("cpu")
    n64 = sm.cases("n64", cpu)
    assert n64[n64.index(("triton", "fwdbwd")) + 1] == ("whole", "fwdbwd")
    assert ("whole", "fwdbwd") not in sm.cases("n100", cpu) + sm.cases("paper", cpu)
    s = sm.sweep_shapes()["n64"]
    monkeypatch.delenv(seat_plan.SPLIT_BACKWARD_ENV, raising=False)
    split = sm.traffic_figures(s, "fwdbwd", "triton", "H100")["modeled_bytes"]
    whole = sm.traffic_figures(s, "fwdbwd", "whole", "H100")["modeled_bytes"]
    assert whole < split  # the split re-reads the saved rows
    assert seat_plan.SPLIT_BACKWARD_ENV not in os.environ
    seen = []
    monkeypatch.setattr(sm, "_build", lambda v, m, i: lambda: seen.append(
        seat_plan.grad_plan(seat_plan.MODE_GRADS, s.B, s.M, s.P, s.N, s.C, s.dtype, GPUS["H100"]).split))
    sm.build("whole", "fwdbwd", None)()
    sm.build("triton", "fwdbwd", None)()
    assert seen == [False, True]
    monkeypatch.setenv(seat_plan.SPLIT_BACKWARD_ENV, "sometimes")
    with pytest.raises(ValueError, match="SAN_FAST_SPLIT_BACKWARD='sometimes'"):
        seat_plan.grad_plan(seat_plan.MODE_GRADS, 1, 64, 64, 64, 3, torch.float32, GPUS["H100"])

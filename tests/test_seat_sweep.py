"""The measured tile sweep (bench/seat_sweep.py) on the CPU: its code runs end to end in the
interpreter on a tiny shape (the timings mean nothing there), every row says what it measured,
and the command refuses to report interpreter timings."""

import time
from dataclasses import replace

import pytest
import torch

from bench import seat_sweep
from bench.seat_measure import TINY


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(seat_sweep, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(seat_sweep, "GRAD_TILES", [(64, 64)])
    monkeypatch.setattr(seat_sweep, "WARPS_STAGES", [(4, 1)])
    monkeypatch.setattr(seat_sweep, "FORWARD", [(64, 64, 4, 1)])


def test_sweep_rows_on_a_tiny_shape(on_cpu):
    rows: list = []
    shape = replace(TINY, M=32 * 32)
    seat_sweep.sweep_grad(shape, time.monotonic() + 120, rows)
    seat_sweep.sweep_forward(shape, time.monotonic() + 120, rows)
    grads = [r for r in rows if r["kind"] == "grad"]
    assert grads and all("error" not in r for r in rows), rows
    for r in grads:
        assert r["ms"] > 0 and r["modeled_ms"] > 0 and r["ctas"] == r["k"] * r["t"]
        assert r["iters_per_cta"] == -(-shape.B * (-(-shape.M // r["block_m"])) // r["t"])
    forward = [r for r in rows if r["kind"] == "forward"]
    assert len(forward) == 1 and forward[0]["ms"] > 0 and forward[0]["ms_save_attn"] > 0


def test_the_command_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert seat_sweep.main(["--budget", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_the_planners_tile_is_measured_first(on_cpu, monkeypatch):
    """A short budget on the GPU still measures the tile the planner runs (here the
    interpreter's 64 x 64), whatever its place in the sweep's list."""
    monkeypatch.setattr(seat_sweep, "GRAD_TILES", [(32, 64), (64, 64)])
    rows: list = []
    shape = replace(TINY, M=32 * 32)
    seat_sweep.sweep_grad(shape, time.monotonic() + 120, rows)
    assert [(r["block_m"], r["block_p2"]) for r in rows][:1] == [(64, 64)], rows
    assert {(r["block_m"], r["block_p2"]) for r in rows} == {(32, 64), (64, 64)}


def test_register_caps_run_against_the_same_tile_uncapped(on_cpu, monkeypatch):
    """Each capped tile is timed beside the tile uncapped (once per tile), its grid sized for
    the CTAs the cap lets share an SM: 65536 / (cap x 128 threads)."""
    monkeypatch.setattr(seat_sweep, "REG_CAPS", [(64, 64, 168), (64, 64, 128)])
    rows: list = []
    shape = replace(TINY, M=32 * 32)
    seat_sweep.sweep_caps(shape, time.monotonic() + 120, rows)
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows
    assert [r["maxnreg"] for r in rows] == [None, 168, 128]
    base = rows[0]["t"] // 2  # uncapped: two 4-warp CTAs of up to 255 registers per SM
    assert [r["t"] for r in rows] == [2 * base, 3 * base, 4 * base]
    assert not any(r["chosen_now"] for r in rows[1:])


def test_loss_sweep_times_the_relay_and_fused_tiles_beside_the_two_pass_design(on_cpu, monkeypatch):
    """The loss's three designs: the two-pass design once, the relay design's candidates (here
    two tiles, the planner's first, one config each, each tile as the planner plans it), then
    the fused loss's (here one tile, one config, T and 2T), each with the model's time beside
    the measured one."""
    from san_fast.kernels import seat_plan

    monkeypatch.setattr(seat_sweep, "LOSS_TILES", [(64, 64)])
    monkeypatch.setattr(seat_sweep, "LOSS_CONFIGS", [(64, 64, 4, 1)])
    # N = 6 is bucket 32; the planner's (the interpreter's) 64 x 64 listed second.
    monkeypatch.setitem(seat_plan.GRAD_TILES["relay"], 32, [(64, 128), (64, 64)])
    rows: list = []
    shape = replace(TINY, M=32 * 32)
    seat_sweep.sweep_loss(shape, time.monotonic() + 180, rows)
    assert all("error" not in r and r["ms"] > 0 and r["modeled_ms"] > 0 for r in rows), rows
    assert [r["kind"] for r in rows] == ["loss_two_pass", "loss_relay", "loss_relay", "loss", "loss"]
    relay, fused = rows[1:3], rows[3:]
    assert [(r["block_m"], r["block_p2"]) for r in relay] == [(64, 64), (64, 128)]
    for r in relay:
        assert r["producers"] > 0 and r["ctas"] == (r["k"] + r["producers"]) * r["t"]
        gpu = seat_plan.grad_configs(seat_plan.MODE_LOSS_IMAGE, 16, r["block_p2"], interpreter=False, relay=True)
        # A GPU's config, not the interpreter's: what the sweep measures is what a GPU would run.
        assert [(r["block_p"], r["block_pd"], r["warps"], r["stages"])] == [
            (c.kwargs["BLOCK_P"], c.kwargs["BLOCK_PD"], c.num_warps, c.num_stages) for c in gpu]
    assert fused[1]["t"] == 2 * fused[0]["t"] and fused[0]["ctas"] == fused[0]["k"] * fused[0]["t"]
    assert fused[0]["chosen_now"]  # the interpreter's plan: the 64 x 64 tile, one CTA per (4) SM


def test_loss_sweep_stops_at_its_deadline(on_cpu):
    """A spent budget still times the two-pass design, and no candidate after it."""
    rows: list = []
    seat_sweep.sweep_loss(replace(TINY, M=32 * 32), time.monotonic() - 1, rows)
    assert [r["kind"] for r in rows] == ["loss_two_pass"]


def test_relay_sweep_also_times_k_producers_at_the_paper_shape():
    """On an H100 at the paper shape: every relay tile as planned, then the planner's plan with
    K producers per run (one wave of CTAs), which the model cannot price against K / 2."""
    from san_fast.gpu_specs import GPUS
    from san_fast.kernels import seat_plan

    spec = GPUS["H100"]
    chosen, plans = seat_sweep.relay_plans(seat_sweep.PAPER, spec)
    tiles = seat_plan.grad_tiles(seat_plan.MODE_LOSS_IMAGE, 27, 3, True, relay=True)
    assert plans[0] == chosen and len(plans) == len(tiles) + 1
    extra = plans[-1]
    assert (extra.producers, extra.block_m, extra.k) == (chosen.k, chosen.block_m, chosen.k)
    assert chosen.producers < chosen.k
    assert extra.ctas <= spec.sms * seat_plan.ctas_per_sm("relay", 32) < extra.ctas + 2 * chosen.k


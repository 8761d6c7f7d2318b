"""kernels/channel_moments.py (BatchNorm's per-channel statistics) against its float64 reference.

Odd shapes on purpose: channels not a multiple of the 64-channel tile, rows (B*H*W) not a
multiple of the 128-row tile and split over several programs, channels-last, contiguous and
strided inputs; a large mean over a small spread (what a naive E[y^2] - E[y]^2 loses); every
buffer the launcher allocates poisoned with NaN first; NaN in y must come out as NaN.
fp32 and fp16 run in the Triton interpreter on the CPU, bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from san_fast.kernels import channel_moments as cm

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Both fp32 moments against float64 over y as given in its dtype: fp32 accumulation over a few
# thousand rows.
TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
SHAPES = {
    "ragged": (3, 70, 9, 11),  # 297 rows: three tiles, the last ragged; 70 channels: two blocks
    "one_pixel": (5, 3, 1, 1),  # H = W = 1 (any pixel stride is valid)
    "wide": (2, 130, 16, 17),  # 544 rows over several splits, three channel blocks
}


@pytest.fixture
def poisoned(monkeypatch):
    def empty(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(cm, "_empty", empty)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cm.channel_moments_reference(y.double())


def make_y(shape, dtype, layout: str, seed: int = 0, offset: float = 3.0, spread: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = offset + spread * torch.randn(*shape, generator=gen)
    y = y.to(DEVICE, dtype)
    if layout == "channels_last":
        return y.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: pixels not one stride apart
        wide = torch.zeros(*shape[:3], 2 * shape[3], dtype=dtype, device=DEVICE)
        wide[..., ::2] = y
        return wide[..., ::2]
    if layout == "transposed":  # H and W swapped in memory: the launcher copies it first
        return y.transpose(2, 3).contiguous().transpose(2, 3)
    return y.contiguous()


def check(y: torch.Tensor) -> None:
    mean, var = cm.channel_moments_triton(y)
    ref_mean, ref_var = reference(y)
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == var.shape == (y.shape[1],)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    tol = TOL[y.dtype]
    assert rel_err(mean, ref_mean) < tol, rel_err(mean, ref_mean)
    assert rel_err(var, ref_var) < tol, rel_err(var, ref_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided", "transposed"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_against_float64(poisoned, shape, layout, dtype):
    check(make_y(SHAPES[shape], dtype, layout))


def test_large_mean_small_spread(poisoned):
    """Variance 1e-4 of a mean of 1000: a sum-of-squares formula in fp32 would lose all of it."""
    y = make_y((4, 33, 13, 10), torch.float32, "channels_last", seed=1, offset=1000.0, spread=0.01)
    mean, var = cm.channel_moments_triton(y)
    ref_mean, ref_var = reference(y)
    assert rel_err(mean, ref_mean) < 1e-6
    assert rel_err(var, ref_var) < 1e-5, rel_err(var, ref_var)


def test_nan_in_y_comes_out(poisoned):
    y = make_y((2, 70, 9, 11), torch.float32, "channels_last", seed=2)
    y[1, 5, 3, 4] = float("nan")
    mean, var = cm.channel_moments_triton(y)
    assert torch.isnan(mean[5]) and torch.isnan(var[5])
    others = torch.ones(70, dtype=torch.bool)
    others[5] = False
    ref_mean, ref_var = reference(y)
    assert rel_err(mean[others.to(DEVICE)], ref_mean[others.to(DEVICE)]) < TOL[torch.float32]
    assert rel_err(var[others.to(DEVICE)], ref_var[others.to(DEVICE)]) < TOL[torch.float32]


def test_splits_cover_every_row(poisoned, monkeypatch):
    """More programs than tiles: the launcher trims the splits to the rows it has."""
    monkeypatch.setattr(cm, "INTERPRETER_PROGRAMS", 64)
    monkeypatch.setattr(cm, "PROGRAMS_PER_SM", 64)
    check(make_y((1, 9, 7, 5), torch.float32, "channels_last", seed=3))


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.zeros(2, 3, 4), "as \\(B,C,H,W\\)"),
    (lambda: torch.zeros(2, 3, 4, 4, dtype=torch.int32), "float16, bfloat16 or float32"),
    (lambda: torch.zeros(0, 3, 4, 4), "at least one element"),
])
def test_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cm.channel_moments_triton(bad().to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (bf16 runs on a GPU only)")
@pytest.mark.parametrize("shape", [(2, 130, 16, 17), (16, 1024, 128, 128)], ids=["odd", "paper"])
def test_bf16_gpu(poisoned, shape):
    check(make_y(shape, torch.bfloat16, "channels_last", seed=4))


@pytest.mark.parametrize("rows, channels, programs", [(262144, 1024, 1056), (297, 70, 8), (1, 3, 864), (5000, 1, 7)])
def test_splits_are_whole_tiles_covering_every_row_once(rows, channels, programs):
    splits, per_split = cm.split_rows(rows, channels, programs)
    assert per_split % cm.BLOCK_R == 0
    assert (splits - 1) * per_split < rows <= splits * per_split


def test_modeled_bytes_at_the_paper_shape_are_one_read_of_y_and_small_partials():
    y_bytes = 16 * 1024 * 128 * 128 * 2
    modeled = cm.modeled_bytes((16, 1024, 128, 128), torch.bfloat16, sms=132)
    assert y_bytes < modeled < 1.01 * y_bytes

"""Per-channel mean and biased variance of y (B,C,H,W) over (B,H,W): BatchNorm's statistics.

The folded BatchNorm (seat_bn_fold.py) needs them once per training step, over the encoder's
conv output (0.5 GiB at the paper shape). torch.batch_norm_stats, SyncBatchNorm's Welford
kernel, took 0.68 ms for that on an H100 (bench/results/nvidia-h100-2026-11-26-b, profile):
3.7x one read of y at copy bandwidth. Its channels-last path reduces each channel in its own
thread block, reading y with a stride of C elements; no torch op gives the split reduction
over rows that one read at bandwidth needs, so it is written here.

Every value is taken relative to its channel's first one (a pivot: the subtraction is exact near
the mean), so that a mean far larger than the spread costs no precision in the variance.

Two launches:
1. partial: grid (splits, channel blocks). Each program walks its split's rows in tiles of
   BLOCK_R rows x BLOCK_C channels (contiguous in channels for channels-last y, in rows for
   NCHW), and keeps per channel the mean and the sum of squared deviations (M2) of the rows so
   far, merging each tile's own (mean, M2), from the corrected two-pass rule, by Chan's rule
   (`_merge`): no E[y^2] - E[y]^2 cancellation.
2. combine: one program per channel block merges the splits' partials in order, the same rule.
Fixed split sizes and order: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from san_fast.kernels import seat_common as common

# Tiles: 128 rows x 64 channels (16 KiB of bf16 per load, 64 fp32 registers per thread at 4
# warps); about PROGRAMS_PER_SM programs per SM keep enough loads in flight to hide latency.
BLOCK_R = 128
BLOCK_C = 64
NUM_WARPS = 4
PROGRAMS_PER_SM = 8
COMBINE_BLOCK_C = 128
# Under the interpreter every program runs one after another in numpy: few, large ones.
INTERPRETER_PROGRAMS = 8


@triton.jit
def _merge(mean, m2, seen, part_mean, part_m2, n_part):
    """Chan's rule: (mean, M2) of `seen` values merged with those of `n_part` more."""
    total = seen + n_part
    delta = part_mean - mean
    return mean + delta * (n_part / total), m2 + part_m2 + delta * delta * (seen * n_part / total)


@triton.jit
def _partial_kernel(
    y_ptr, mean_ptr, m2_ptr, rows, channels, hw, rows_per_split, stride_b, stride_hw, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    col_offs = cs.to(tl.int64) * stride_c
    pivot = tl.load(y_ptr + col_offs, mask=c_ok, other=0.0).to(tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, rows)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in tl.range(start, stop, BLOCK_R, num_stages=3):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < stop
        # Row r is pixel r % hw of image r // hw; 64-bit offsets, as y may exceed 2^31 elements.
        row_offs = (r // hw).to(tl.int64) * stride_b + (r % hw).to(tl.int64) * stride_hw
        ok = r_ok[:, None] & c_ok[None, :]
        x = tl.load(y_ptr + row_offs[:, None] + col_offs[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, x - pivot[None, :], 0.0)
        seen = (r0 - start).to(tl.float32)  # every earlier tile of the split was full
        n_tile = tl.minimum(stop - r0, BLOCK_R).to(tl.float32)
        rough = tl.sum(x, axis=0) / n_tile
        dev = tl.where(ok, x - rough[None, :], 0.0)
        # The corrected two-pass rule: the deviations' own sum removes the rounding error of
        # the rough mean (first order), which matters when the mean dwarfs the spread.
        shift = tl.sum(dev, axis=0)
        tile_mean = rough + shift / n_tile
        tile_m2 = tl.sum(dev * dev, axis=0) - shift * shift / n_tile
        mean, m2 = _merge(mean, m2, seen, tile_mean, tile_m2, n_tile)
    out = split * channels + cs
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(m2_ptr + out, m2, mask=c_ok)


@triton.jit
def _combine_kernel(
    y_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, rows, channels, rows_per_split, splits, stride_c,
    BLOCK_C: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < channels
    pivot = tl.load(y_ptr + cs.to(tl.int64) * stride_c, mask=c_ok, other=0.0).to(tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s in range(0, splits):
        seen = (s * rows_per_split).to(tl.float32)  # every earlier split was full
        n_split = tl.minimum(rows - s * rows_per_split, rows_per_split).to(tl.float32)
        s_mean = tl.load(part_mean_ptr + s * channels + cs, mask=c_ok, other=0.0)
        s_m2 = tl.load(part_m2_ptr + s * channels + cs, mask=c_ok, other=0.0)
        mean, m2 = _merge(mean, m2, seen, s_mean, s_m2, n_split)
    tl.store(mean_ptr + cs, pivot + mean, mask=c_ok)
    tl.store(var_ptr + cs, m2 / rows, mask=c_ok)


def channel_moments_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in torch: (mean, biased var) per channel, fp32 (fp64 for fp64 y)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
    return mean, var


def _layout(y: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """y (possibly copied) and its (image, pixel, channel) strides: pixels must be one stride
    apart, as in contiguous and channels-last tensors."""
    _, _, h, w = y.shape
    if y.stride(2) != w * y.stride(3) and h > 1:
        y = y.contiguous(memory_format=torch.channels_last)
    return y, y.stride(0), y.stride(3), y.stride(1)


def _empty(shape: tuple, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher hands the kernels (tests poison them through this)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def split_rows(rows: int, channels: int, programs: int) -> tuple[int, int]:
    """(splits, rows per split) for about `programs` programs in all: whole tiles per split."""
    channel_blocks = triton.cdiv(channels, BLOCK_C)
    splits = max(1, min(triton.cdiv(rows, BLOCK_R), triton.cdiv(programs, channel_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), BLOCK_R) * BLOCK_R
    return triton.cdiv(rows, rows_per_split), rows_per_split


def modeled_bytes(shape: tuple[int, int, int, int], dtype: torch.dtype, sms: int) -> int:
    """HBM bytes of the two launches on a GPU with `sms` SMs: y read once, the fp32 partials
    written and read back, the two outputs written."""
    bsz, channels, h, w = shape
    splits, _ = split_rows(bsz * h * w, channels, PROGRAMS_PER_SM * sms)
    y = bsz * channels * h * w * torch.tensor([], dtype=dtype).element_size()
    return y + 2 * (2 * splits * channels * 4) + 2 * channels * 4


def channel_moments_triton(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel of y (B,C,H,W) over (B,H,W), fp32; y is read once, in its
    own dtype (fp16, bf16 or fp32)."""
    if y.dim() != 4:
        raise ValueError(f"channel_moments takes y as (B,C,H,W), got shape {tuple(y.shape)}")
    if y.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"channel_moments' kernel takes float16, bfloat16 or float32, got {y.dtype}")
    if y.device.type != "cuda" and not common.interpreting():
        raise ValueError(f"channel_moments' kernel runs on a CUDA device (or under TRITON_INTERPRET=1), "
                         f"got y on {y.device}")
    bsz, channels, h, w = y.shape
    rows = bsz * h * w
    if rows < 1 or channels < 1:
        raise ValueError(f"channel_moments needs at least one element per channel, got shape {tuple(y.shape)}")
    y, stride_b, stride_hw, stride_c = _layout(y)
    if common.interpreting():
        programs = INTERPRETER_PROGRAMS
    else:
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(y.device).multi_processor_count
    splits, rows_per_split = split_rows(rows, channels, programs)
    part_mean, part_m2 = _empty((splits, channels), y.device), _empty((splits, channels), y.device)
    mean, var = _empty((channels,), y.device), _empty((channels,), y.device)
    with common.device_guard(y):
        _partial_kernel[(splits, triton.cdiv(channels, BLOCK_C))](
            y, part_mean, part_m2, rows, channels, h * w, rows_per_split, stride_b, stride_hw, stride_c,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
        _combine_kernel[(triton.cdiv(channels, COMBINE_BLOCK_C),)](
            y, part_mean, part_m2, mean, var, rows, channels, rows_per_split, splits, stride_c,
            BLOCK_C=COMBINE_BLOCK_C)
    return mean, var

"""BatchNorm with statistics over the whole global batch under DDP, on every backend.

On CUDA, torch's SyncBatchNorm does this. It refuses CPU tensors, so gloo runs (CPU training,
and the CI test that checks DDP against one process) get GlobalBatchNorm: the same layer,
whose training statistics are all-reduced with a differentiable all-reduce
(torch.distributed.nn.functional.all_reduce; the functional collective under torch.compile), so
the backward pass also sums the statistics' gradients over ranks, as SyncBatchNorm's does. Each
rank's own moments are combined by Chan's rule (_global_stats), which keeps the variance as
accurate as a single process's. Evaluation uses the running statistics, with no communication.

`batch_affine(bn, y)` gives what a BatchNorm layer would apply to y, as a per-channel
(scale, shift), with the layer's statistics rules (global under DDP, running statistics updated
exactly as nn.BatchNorm2d does): the SEAT op then applies it inside its kernels
(kernels/seat_bn_fold.py) instead of the layer writing its output. Its statistics come from
san_fast::channel_moments (y read once, in its own dtype), combined over ranks under DDP.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from san_fast.kernels.channel_moments import channel_moments_triton
from san_fast.kernels.seat_bn_fold import BatchStats, bn_affine, moments_grad
from san_fast.kernels.seat_reference import loss_dtype


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.library.custom_op("san_fast::channel_moments", mutates_args=())
def channel_moments(y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of y (B,C,H,W) over (B,H,W), in fp32 (fp64 for a
    float64 y), read from y in its own dtype: no fp32 copy of y is made or kept for the backward.
    `eps` (BatchNorm's) is part of the op's signature only.

    An opaque op so that inductor cannot fuse the reduction with what batch_affine computes from
    it: that fusion (var_mean, then rsqrt, scale, shift and the running statistics, stored from
    one kernel) made triton 3.6 fail to compile it on an H200 ("operand does not dominate this
    use" in TritonGPURemoveLayoutConversions; bench/results/nvidia-h200-2026-11-26). On CUDA the
    reduction is kernels/channel_moments.py (a split reduction over rows, about one read of y;
    torch.batch_norm_stats, used before, took 3.7x that on an H100). Elsewhere, var_mean in the
    accumulation dtype."""
    if y.is_cuda and y.dtype != torch.float64:
        return channel_moments_triton(y)
    var, mean = torch.var_mean(y.to(loss_dtype(y)), dim=(0, 2, 3), correction=0)
    return mean, var


@channel_moments.register_fake
def _(y, eps):
    return y.new_empty(y.shape[1], dtype=loss_dtype(y)), y.new_empty(y.shape[1], dtype=loss_dtype(y))


def _moments_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[0])


def _moments_backward(ctx, grad_mean, grad_var):
    y, mean = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    # One elementwise pass over y in its own dtype (inductor fuses it under torch.compile).
    return moments_grad(y, mean, grad_mean, grad_var, y.numel() // y.shape[1], 1), None


channel_moments.register_autograd(_moments_backward, setup_context=_moments_setup)


def _global_stats(y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of y over every rank's batch, and the element count,
    from each rank's own moments (channel_moments: y read once in its own dtype, no fp32 copy)
    combined by Chan's rule: mean = sum n_r m_r / n, var = sum n_r (v_r + (m_r - mean)^2) / n, exact
    and with no cancellation. Differentiable; the backward sums over ranks too."""
    from san_fast.distributed import differentiable_all_reduce as all_reduce

    mean_r, var_r = channel_moments(y, eps)
    channels = y.shape[1]
    n_r = torch.full((1,), y.numel() // channels, dtype=mean_r.dtype, device=y.device)
    totals = all_reduce(torch.cat([mean_r * n_r, n_r]))
    count = totals[-1]
    mean = totals[:channels] / count
    var = all_reduce(n_r * (var_r + (mean_r - mean).pow(2))) / count
    return mean, var, count


@torch.no_grad()
def update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                         count) -> None:
    """nn.BatchNorm2d's update from a batch's mean and biased variance over `count` elements
    (a Python number, or a tensor when the count comes from an all-reduce), written as
    inductor's own BatchNorm decomposition writes it: Python-scalar factors, mul_ and add_. A
    count made into a CUDA tensor here would be a host-to-device copy in every step."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative average, as nn.BatchNorm2d with momentum=None
        factor = 1.0 / bn.num_batches_tracked.float()
    else:
        factor = bn.momentum
    if isinstance(count, torch.Tensor):
        unbiased = var * count / (count - 1).clamp_min(1)
    else:
        unbiased = var * (count / max(count - 1, 1))
    for running, batch in ((bn.running_mean, mean), (bn.running_var, unbiased)):
        running.mul_(1 - factor).add_(batch.to(running.dtype) * factor)


def _check_input(caller: str, bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> None:
    if y.dim() != 4 or y.shape[1] != bn.num_features:
        raise ValueError(f"{caller}: expected y (B,{bn.num_features},H,W) for this BatchNorm, got {tuple(y.shape)}")


def _batch_moments(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor):
    """(mean, var, count, across_ranks) of y's batch: every rank's for GlobalBatchNorm and
    SyncBatchNorm under DDP (count a tensor then), else y's own (count a Python number)."""
    if _distributed() and isinstance(bn, (GlobalBatchNorm, nn.SyncBatchNorm)):
        return (*_global_stats(y, bn.eps), True)
    return (*channel_moments(y, bn.eps), y.numel() // y.shape[1], False)


def batch_affine(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), (C,) each, with bn(y) == y * scale + shift per channel, in bn's mode:
    batch statistics in training (over every rank for GlobalBatchNorm and SyncBatchNorm under
    DDP) with the running statistics updated as bn's own forward would, running statistics in
    evaluation. fp32 (fp64 for a float64 y); differentiable in y and bn's parameters."""
    _check_input("batch_affine", bn, y)
    acc = loss_dtype(y)
    if bn.training or bn.running_mean is None:
        mean, var, count, _ = _batch_moments(bn, y)
        if bn.training and bn.track_running_stats:
            update_running_stats(bn, mean.detach(), var.detach(), count)
    else:
        mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
    return bn_affine(mean, var, bn.eps, *((bn.weight, bn.bias) if bn.affine else ()))


def batch_stats(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> Optional[BatchStats]:
    """bn's batch statistics of y, detached, with bn's weight and bias, its running statistics
    updated as its forward would: for the SEAT op's split BatchNorm backward
    (kernels/seat_bn_split.py), which differentiates through the statistics itself. Under DDP,
    GlobalBatchNorm's and SyncBatchNorm's statistics are every rank's (BatchStats.across_ranks).
    None where that does not apply, and batch_affine serves: evaluation, no gradient, no affine
    parameters or running statistics."""
    if not (bn.training and bn.affine and bn.track_running_stats and torch.is_grad_enabled()):
        return None
    _check_input("batch_stats", bn, y)
    with torch.no_grad():
        mean, var, count, across_ranks = _batch_moments(bn, y)
    update_running_stats(bn, mean, var, count)
    return BatchStats(mean, var, bn.weight, bn.bias, bn.eps, count if across_ranks else None, across_ranks)


class GlobalBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) with global batch statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and _distributed()):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm expects (B,C,H,W) input, got shape {tuple(x.shape)}")
        channels = x.shape[1]
        mean, var, count = _global_stats(x, self.eps)
        update_running_stats(self, mean.detach(), var.detach(), count.detach())
        centred = x.to(mean.dtype) - mean.view(1, channels, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            out = centred * (scale * self.weight).view(1, channels, 1, 1) + self.bias.view(1, channels, 1, 1)
        else:
            out = centred * scale.view(1, channels, 1, 1)
        return out.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Every BatchNorm2d in `module` replaced by a GlobalBatchNorm sharing its tensors."""
        if isinstance(module, nn.BatchNorm2d) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats)
            # The very same tensors, as SyncBatchNorm.convert_sync_batchnorm shares them.
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                setattr(new, name, tensor)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global batch statistics for a DDP run: torch's SyncBatchNorm on CUDA, else GlobalBatchNorm."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)

"""BatchNorm with statistics over the whole global batch under DDP, on every backend.

On CUDA, torch's SyncBatchNorm does this. It refuses CPU tensors, so gloo runs (CPU training,
and the CI test that checks DDP against one process) get GlobalBatchNorm: the same layer,
whose training statistics are all-reduced with a differentiable all-reduce
(torch.distributed.nn.functional.all_reduce; the functional collective under torch.compile), so
the backward pass also sums the statistics' gradients over ranks, as SyncBatchNorm's does. Two passes (mean, then the centred sum of squares) keep the variance as
accurate as a single process's. Evaluation uses the running statistics, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) with global batch statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and _distributed()):
            return super().forward(x)
        from san_fast.distributed import differentiable_all_reduce as all_reduce

        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm expects (B,C,H,W) input, got shape {tuple(x.shape)}")
        channels = x.shape[1]
        xf = x.float()
        local_count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        totals = all_reduce(torch.cat([xf.sum(dim=(0, 2, 3)), local_count]))
        count = totals[-1]
        mean = totals[:channels] / count
        centred = xf - mean.view(1, channels, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3))) / count
        self._update_running_stats(mean.detach(), var.detach(), count.detach())
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            out = centred * (scale * self.weight).view(1, channels, 1, 1) + self.bias.view(1, channels, 1, 1)
        else:
            out = centred * scale.view(1, channels, 1, 1)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative average, as nn.BatchNorm2d with momentum=None
            factor = 1.0 / self.num_batches_tracked.float()
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)

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

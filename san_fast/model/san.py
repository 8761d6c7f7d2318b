"""The Semantic Attention Network: pixel-wise encoder, semantic-wise generator, SEAT and the
consistency sustainer, with the paper's Table 4 and 5 ablations as switches of one Config."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from san_fast import ops
from san_fast.config import Config
from san_fast.data import input_channels
from san_fast.model.attention import resolve_backend
from san_fast.model.encoders import build_encoder
from san_fast.model.generator import MultiHeadGenerator, TokenMatcher, global_batch_mean
from san_fast.model.sync_batchnorm import batch_affine, batch_stats
from san_fast.model.variants import build_generator_backbone


class SAN(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        p, n, d = cfg.embed_dim, cfg.semantics(), cfg.vit_width()
        c = input_channels(cfg)  # 3, or 4 for Potsdam's RGB + IR
        self.num_semantics = n
        self.encoder = build_encoder(cfg.encoder, p, c)
        # The semantic-wise generator's backbone (Table 4, "Dec."): ViT, ResNet-18 or UNet tokens.
        self.backbone = build_generator_backbone(cfg, c)
        self.generator = MultiHeadGenerator(d, p, n)
        self.matcher = TokenMatcher(d, n) if cfg.token_matcher else None
        # Consistency sustainer F_G: one 1x1 conv shared by Q and Theta, back to the C input bands.
        self.recon = nn.Conv2d(p, c, kernel_size=1)
        # Evaluation uses a running batch-wise descriptor, like BatchNorm's running stats, so a
        # prediction does not depend on which other images share its batch.
        self.register_buffer("running_g", torch.zeros(d))
        self.register_buffer("running_g_initialised", torch.zeros((), dtype=torch.bool))
        self.momentum = 0.1
        self.seat_impl = cfg.seat_impl

    def attention_shape(self, batch: int, image_size: Optional[int] = None) -> tuple[int, int, int, int]:
        """(batch, tokens, heads, head dim) of the ViT's attention on square images of
        `image_size` (default: the training crops)."""
        side = (image_size or self.cfg.crop_size) // self.cfg.patch_size
        heads = self.cfg.vit_num_heads()
        return batch, side * side, heads, self.cfg.vit_width() // heads

    def set_attention_backend(self, name: str, device: torch.device, batch: Optional[int] = None,
                              dtype: Optional[torch.dtype] = None, image_size: Optional[int] = None) -> str:
        """Resolve `name` for the attention this model will run: per-device `batch` (default the
        configured batch), AMP `dtype` (None: fp32) and images of `image_size`; `auto` times the
        backends at that shape. A CNN generator has no attention: "none"."""
        if self.cfg.generator != "vit":
            return "none"
        shape = self.attention_shape(batch or self.cfg.batch_size, image_size)
        backend = resolve_backend(name, device, shape, dtype or torch.float32)
        self.backbone.set_attention_backend(backend)
        return backend

    def _batch_descriptor(self, g_b: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.running_g.to(g_b.dtype)
        g = global_batch_mean(g_b)
        with torch.no_grad():
            blend = torch.where(self.running_g_initialised, self.momentum, 1.0)
            self.running_g.lerp_(g.detach().float(), blend)
            self.running_g_initialised.fill_(True)
        return g

    def semantics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image batch -> (gamma (B,N,P) fed to SEAT, zeta (N,P) or (B,N,P) for the uniformity)."""
        g_b = self.backbone(x).mean(dim=1)
        zeta = self.generator(self._batch_descriptor(g_b) if self.cfg.batch_wise else g_b)
        gamma = zeta.expand(x.shape[0], -1, -1) if zeta.dim() == 2 else zeta
        if self.matcher is not None:
            gamma = self.matcher(g_b).unsqueeze(-1).to(gamma.dtype) * gamma
        return gamma, zeta

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,C,H,W) normalised -> Q (B,P,H,W), gamma (B,N,P), zeta."""
        q = self.encoder(x)
        gamma, zeta = self.semantics(x)
        return q, gamma, zeta

    def folds_bn(self, device: torch.device, strict: bool = True) -> bool:
        """Whether the encoder's last BatchNorm runs inside the SEAT op here (cfg.fold_bn: auto =
        when the Triton implementation runs; `--seat-impl torch` keeps the unfused reference).
        fold_bn='on' where it cannot fold is an error when `strict`, else unfused: the fold
        changes speed, not results, so a model trained folded still predicts anywhere."""
        mode = getattr(self.cfg, "fold_bn", "auto")
        if mode == "off":
            return False
        ends_in_bn = isinstance(getattr(self.encoder, "final_bn", None), nn.modules.batchnorm._BatchNorm)
        impl = ops.resolve_impl(self.seat_impl, device, self.cfg.semantics())
        triton = impl == "triton"
        if strict and mode == "on" and not (ends_in_bn and triton):
            raise ValueError(f"fold_bn='on' needs the Triton SEAT op (seat_impl {self.seat_impl!r} resolves to "
                             f"{impl!r} on {device}) and an encoder ending in "
                             f"BatchNorm ({self.cfg.encoder}: {ends_in_bn})")
        return ends_in_bn and triton

    def _encode(self, x: torch.Tensor, fold: bool):
        """(Q, None), or folded: (y, (scale, shift)) with Q = y * scale + shift per channel,
        the encoder's last BatchNorm in its current mode (its running statistics updated in
        training, as its forward would); in training with gradients, (y, BatchStats) where the
        statistics come from y itself (ops: the SEAT backward differentiates through them)."""
        if not fold:
            return self.encoder(x), None
        y, y_full = self.encoder.features(x)
        # Statistics of the tensor the SEAT op reads: their backward joins its dq pass.
        stats = batch_stats(self.encoder.final_bn, y) if y is y_full else None
        return y_full, (stats if stats is not None else batch_affine(self.encoder.final_bn, y))

    def losses(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Eq. 9: reconstruction of x from Q and from Theta, plus uniformity of the semantics.

        Returns the loss terms (with their weighted sum as "loss") and Q, gamma, which the
        trainer uses to watch for collapse without a second forward pass. Q and gamma come back
        detached: returned attached, a compiled step's backward would allocate a zero gradient
        the size of Q for them and read it in both BatchNorm backward passes. With the encoder's
        BatchNorm folded into the SEAT op (folds_bn), Q is never written: it comes back as an
        ops.FoldedQ (y, scale, shift), which ops.seat_labels takes as it takes Q.
        """
        q, affine = self._encode(x, self.cfg.reconstruction and self.folds_bn(x.device))
        gamma, zeta = self.semantics(x)
        out: dict[str, torch.Tensor] = {}
        if self.cfg.reconstruction:
            out["rec"], out["con"] = ops.seat_reconstruct_loss(
                q, gamma, self.recon.weight, self.recon.bias, x,
                consistency_target=self.cfg.consistency_target, impl=self.seat_impl, affine=affine,
            )
        else:
            out["align"] = alignment_loss(q, gamma)
        data_terms = sum(out.values())
        out["uni"] = uniformity_loss(zeta)
        out["loss"] = data_terms + self.cfg.uniformity_weight * out["uni"]
        if isinstance(affine, ops.BatchStats):
            affine = affine.affine()
        monitor_q = q.detach() if affine is None else ops.FoldedQ(q.detach(), *(t.detach() for t in affine))
        return out, monitor_q, gamma.detach()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, return_finite: bool = False):
        """x (B,C,H,W) -> cluster ids (B,H,W): argmax of the SEAT attention over N. With
        `return_finite`, also a bool tensor on the device, False when Q or the semantics hold a
        NaN or inf (an argmax of those would still look like a prediction); it costs one more
        read of Q and no host synchronisation."""
        q, affine = self._encode(x, self.folds_bn(x.device, strict=False))
        gamma, _ = self.semantics(x)
        labels = ops.seat_labels(q, gamma, impl=self.seat_impl, affine=affine).view(x.shape[0], *x.shape[-2:])
        if not return_finite:
            return labels
        # min and max propagate NaN, so two finite extremes mean every value is finite.
        q_min, q_max = torch.aminmax(q)
        finite = torch.isfinite(q_min) & torch.isfinite(q_max) & torch.isfinite(gamma).all()
        if affine is not None:
            finite = finite & torch.isfinite(torch.cat(affine)).all()
        return labels, finite

    def segment(self, images, max_side=None, batch_size=8):
        """Cluster ids for images of any size: uint8, uint16 or [0, 1] float; torch (C,H,W) or
        (B,C,H,W), numpy/PIL (H,W[,C]) or (B,H,W,C), or a list of them. Eval mode, no grad.
        See san_fast.inference.segment for the details."""
        from san_fast.inference import segment  # loaded on first use: training never needs it

        return segment(self, images, max_side=max_side, batch_size=batch_size)


def alignment_loss(q: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 5 without reconstruction (Table 5's first row): MSE(softmax(Q S^T/sqrt P) S, Q)."""
    rows = q.permute(0, 2, 3, 1).reshape(q.shape[0], -1, q.shape[1])
    g = gamma.to(rows.dtype)
    theta = torch.softmax(rows @ g.transpose(1, 2) / math.sqrt(rows.shape[-1]), dim=-1) @ g
    return F.mse_loss(theta.float(), rows.float())


def uniformity_loss(zeta: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix of the N semantic embeddings pushed towards the identity."""
    z = F.normalize(zeta.float(), dim=-1)
    sim = z @ z.transpose(-1, -2)
    eye = torch.eye(sim.shape[-1], device=sim.device, dtype=sim.dtype)
    return (sim - eye).pow(2).mean()

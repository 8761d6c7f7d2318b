"""The Semantic Attention Network: pixel-wise encoder, semantic-wise generator, SEAT and the
consistency sustainer, with the paper's Table 4 and 5 ablations as switches of one Config."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from san_fast import ops
from san_fast.config import Config
from san_fast.model.attention import resolve_backend
from san_fast.model.encoders import build_encoder
from san_fast.model.generator import MultiHeadGenerator, TokenMatcher, global_batch_mean
from san_fast.model.vit import ViT


class SAN(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        p, n, d = cfg.embed_dim, cfg.semantics(), cfg.vit_width()
        self.num_semantics = n
        self.encoder = build_encoder(cfg.encoder, p)
        self.vit = ViT(cfg.crop_size, cfg.patch_size, d, cfg.vit_depth, cfg.vit_num_heads())
        self.generator = MultiHeadGenerator(d, p, n)
        self.matcher = TokenMatcher(d, n) if cfg.token_matcher else None
        # Consistency sustainer F_G: one 1x1 conv shared by Q and Theta.
        self.recon = nn.Conv2d(p, 3, kernel_size=1)
        # Evaluation uses a running batch-wise descriptor, like BatchNorm's running stats, so a
        # prediction does not depend on which other images share its batch.
        self.register_buffer("running_g", torch.zeros(d))
        self.register_buffer("running_g_initialised", torch.zeros((), dtype=torch.bool))
        self.momentum = 0.1
        self.seat_impl = cfg.seat_impl

    def set_attention_backend(self, name: str, device: torch.device) -> str:
        backend = resolve_backend(name, device)
        self.vit.set_attention_backend(backend)
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
        g_b = self.vit(x).mean(dim=1)
        zeta = self.generator(self._batch_descriptor(g_b) if self.cfg.batch_wise else g_b)
        gamma = zeta.expand(x.shape[0], -1, -1) if zeta.dim() == 2 else zeta
        if self.matcher is not None:
            gamma = self.matcher(g_b).unsqueeze(-1).to(gamma.dtype) * gamma
        return gamma, zeta

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) normalised -> Q (B,P,H,W), gamma (B,N,P), zeta."""
        q = self.encoder(x)
        gamma, zeta = self.semantics(x)
        return q, gamma, zeta

    def losses(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Eq. 9: reconstruction of x from Q and from Theta, plus uniformity of the semantics.

        Returns the loss terms (with their weighted sum as "loss") and Q, gamma, which the
        trainer uses to watch for collapse without a second forward pass.
        """
        q, gamma, zeta = self(x)
        out: dict[str, torch.Tensor] = {}
        if self.cfg.reconstruction:
            out["rec"], out["con"] = ops.seat_reconstruct_loss(
                q, gamma, self.recon.weight, self.recon.bias, x,
                consistency_target=self.cfg.consistency_target, impl=self.seat_impl,
            )
        else:
            out["align"] = alignment_loss(q, gamma)
        data_terms = sum(out.values())
        out["uni"] = uniformity_loss(zeta)
        out["loss"] = data_terms + self.cfg.uniformity_weight * out["uni"]
        return out, q, gamma

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,3,H,W) -> cluster ids (B,H,W): argmax of the SEAT attention over N."""
        q, gamma, _ = self(x)
        labels = ops.seat_labels(q, gamma, impl=self.seat_impl)
        return labels.view(x.shape[0], *x.shape[-2:])


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

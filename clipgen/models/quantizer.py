"""Quantizers for the image tokenizer: ``quantizer(z) -> (z_q, indices, loss)``, ``indices_to_codes(indices)``.

Two choices, picked by ``VQGANConfig.quantizer``:

* :class:`VectorQuantizer` (VQ, van den Oord et al. 2017, as used by VQGAN, Esser et al. 2021) with the
  ViT-VQGAN recipe of Yu et al. 2021: the encoder output is projected to a low-dimensional space and
  l2-normalised, and so are the codes, so lookup is a cosine match and codebook usage stays high.
  The codebook is an exponential moving average of the vectors assigned to each code (no codebook
  loss), starts from spherical k-means on the first batch, and codes that fall out of use are restarted
  from recent encoder outputs. The loss is the commitment term only: ``beta * ||z - sg(code)||^2``.
* :class:`FSQ` (finite scalar quantization, Mentzer et al. 2023): each of a few channels is bounded
  with tanh and rounded to one of ``L_i`` levels. The codebook is implicit (the product of the levels),
  always fully reachable, and needs no loss at all.

Both use the straight-through estimator and keep their maths in fp32, even under autocast: rounding and
nearest-neighbour search in bf16 would flip codes. Tensors are channels-first: ``z`` is ``[B, C, h, w]``,
``indices`` is ``[B, h, w]`` (int64).
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class Quantized(NamedTuple):
    z_q: torch.Tensor  # [B, C, h, w], the quantized latent (straight-through gradients to z)
    indices: torch.Tensor  # [B, h, w] int64
    loss: torch.Tensor  # scalar: the quantizer's own loss (0 for FSQ)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------------------------- FSQ
class FSQ(nn.Module):
    """Finite scalar quantization: ``len(levels)`` bounded channels, each rounded to ``levels[i]`` values."""

    def __init__(self, dim: int, levels: list[int]):
        super().__init__()
        if any(level < 2 for level in levels):
            raise ValueError(f"every FSQ level must be >= 2, got vqgan.fsq_levels={levels}")
        self.levels_list = list(levels)
        self.codebook_size = math.prod(levels)
        self.in_proj = nn.Conv2d(dim, len(levels), 1)
        self.out_proj = nn.Conv2d(len(levels), dim, 1)
        levels_t = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), dtype=torch.int64), 0)
        # non-persistent: derived from the config, so they never enter a checkpoint
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """tanh squashing to (-L/2, L/2); even levels are shifted by half a step so rounding hits L values."""
        levels = self.levels.view(1, -1, 1, 1)
        eps = 1e-3
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _half_width(self) -> torch.Tensor:
        return (self.levels // 2).view(1, -1, 1, 1)

    def forward(self, z: torch.Tensor) -> Quantized:
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.in_proj(z.float())  # [B, d, h, w], d = len(levels)
            bounded = self._bound(h)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through rounding
            codes = rounded / self._half_width()  # [B, d, h, w] in [-1, 1]
            z_q = self.out_proj(codes)
        return Quantized(z_q, self.codes_to_indices(codes.detach()), z.new_zeros((), dtype=torch.float32))

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes [B, d, h, w] -> indices [B, h, w]: mixed-radix digits, one per channel."""
        digits = torch.round(codes * self._half_width() + self._half_width()).long()  # [B, d, h, w] in [0, L_i)
        return (digits * self.basis.view(1, -1, 1, 1)).sum(dim=1)

    def indices_to_normalised(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, h, w] -> normalised codes [B, d, h, w] in [-1, 1] (inverse of codes_to_indices)."""
        digits = (indices.long().unsqueeze(1) // self.basis.view(1, -1, 1, 1)) % self.levels.long().view(1, -1, 1, 1)
        return (digits.float() - self._half_width()) / self._half_width()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] int -> [B, C, h, w] float32, identical to the ``z_q`` the forward pass returns."""
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.out_proj(self.indices_to_normalised(indices))


# ---------------------------------------------------------------------------------------------- VQ
class VectorQuantizer(nn.Module):
    """l2-normalised low-dimensional VQ with an EMA codebook, k-means init and dead-code restart."""

    def __init__(self, dim: int, codebook_size: int, code_dim: int, beta: float = 0.25, decay: float = 0.99,
                 dead_threshold: float = 0.1, kmeans_iters: int = 10):
        super().__init__()
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.decay, self.dead_threshold, self.kmeans_iters = decay, dead_threshold, kmeans_iters
        self.in_proj = nn.Conv2d(dim, code_dim, 1)
        self.out_proj = nn.Conv2d(code_dim, dim, 1)
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, code_dim), dim=1))
        self.register_buffer("ema_count", torch.zeros(codebook_size))  # EMA of assignments per step
        self.register_buffer("ema_sum", torch.zeros(codebook_size, code_dim))  # EMA of assigned vectors
        self.register_buffer("initialised", torch.zeros(()))  # 1 once k-means has run (saved in checkpoints)

    def forward(self, z: torch.Tensor) -> Quantized:
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.in_proj(z.float())  # [B, d, h, w]
            B, d, hh, ww = h.shape
            flat = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, d), dim=1)  # [N, d], N = B*h*w
            if self.training and not bool(self.initialised):
                self._init_codebook(flat.detach())
            with torch.no_grad():  # max cosine = min l2 on the sphere; lookup needs no gradient
                indices = (flat @ self.codebook.t()).argmax(dim=1)  # [N]
            codes = self.codebook[indices]  # [N, d]
            if self.training:
                self._ema_update(flat.detach(), indices)
            # The commitment term pulls the encoder to its code; the codebook follows by EMA, so no
            # codebook loss (the term taming-transformers weighted by beta by mistake).
            loss = self.beta * F.mse_loss(flat, codes.detach())
            quantized = flat + (codes - flat).detach()  # straight-through estimator
            quantized = quantized.view(B, hh, ww, d).permute(0, 3, 1, 2)
            z_q = self.out_proj(quantized)
        return Quantized(z_q, indices.view(B, hh, ww), loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] int -> [B, C, h, w] float32, identical to the ``z_q`` the forward pass returns."""
        codes = self.codebook[indices.long()].permute(0, 3, 1, 2)  # [B, d, h, w]
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.out_proj(codes)

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        """Spherical k-means on the first batch: every code starts where the data is, so none is born dead."""
        if flat.shape[0] < self.codebook_size:  # too few vectors: repeat them, with a little noise
            flat = flat[torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)]
            flat = F.normalize(flat + 0.01 * torch.randn_like(flat), dim=1)
        centres = flat[torch.randperm(flat.shape[0], device=flat.device)[: self.codebook_size]].clone()
        for _ in range(self.kmeans_iters):
            assign = (flat @ centres.t()).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, flat)
            used = sums.norm(dim=1) > 1e-6
            centres[used] = F.normalize(sums[used], dim=1)
        if _distributed():  # every rank must start from rank 0's codebook
            dist.broadcast(centres, 0)
        share = flat.shape[0] * (dist.get_world_size() if _distributed() else 1) / self.codebook_size
        self.codebook.copy_(centres)
        self.ema_sum.copy_(centres * share)  # as if every code had had its uniform share of vectors
        self.ema_count.fill_(share)
        self.initialised.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # [K]
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)  # [K, d]
        if _distributed():  # statistics of the global batch, so the codebooks of all ranks stay equal
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        live = self.ema_sum.norm(dim=1) > 1e-8
        self.codebook[live] = F.normalize(self.ema_sum[live], dim=1)  # codes are unit vectors: direction only
        self._restart_dead(flat, float(counts.sum()))

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, n_global: float) -> None:
        """Codes whose EMA usage fell below ``dead_threshold`` x their uniform share jump to recent encoder outputs.

        Relative to the uniform share (vectors per step / codebook size), so the same setting means the same
        thing for a 32 px toy batch and a 256 px ImageNet batch.
        """
        dead = self.ema_count < self.dead_threshold * n_global / self.codebook_size
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
        share = n_global / self.codebook_size
        self.codebook[dead] = pick
        self.ema_sum[dead] = pick * share
        self.ema_count[dead] = share  # a grace period before the code can be declared dead again
        if _distributed():  # the dead set is equal on all ranks (global counts); the picks come from rank 0
            for buf in (self.codebook, self.ema_sum, self.ema_count):
                dist.broadcast(buf, 0)


# ------------------------------------------------------------------------------------- usage stats
class CodebookUsage:
    """Codebook health over a rolling window of steps: fraction of codes in use and perplexity."""

    def __init__(self, codebook_size: int, window: int = 100):
        self.codebook_size = codebook_size
        self.counts: deque[torch.Tensor] = deque(maxlen=window)

    def update(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices.reshape(-1).long(), minlength=self.codebook_size)
        if _distributed():
            counts = counts.to(torch.float64)
            dist.all_reduce(counts)
        self.counts.append(counts.cpu().to(torch.float64))

    def stats(self) -> tuple[float, float]:
        """(fraction of codes used at least once, perplexity = exp(entropy of the code histogram))."""
        return codebook_stats(torch.stack(list(self.counts)).sum(0)) if self.counts else (0.0, 0.0)


def codebook_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(usage fraction, perplexity) of a histogram of code counts ``[K]``."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def build_quantizer(cfg, dim: int) -> nn.Module:
    """The quantizer a :class:`~clipgen.config.VQGANConfig` names, acting on ``dim``-channel latents."""
    if cfg.quantizer == "fsq":
        if math.prod(cfg.fsq_levels) != cfg.codebook_size:
            raise ValueError(f"vqgan.codebook_size={cfg.codebook_size} must equal the product of "
                             f"vqgan.fsq_levels {cfg.fsq_levels} = {math.prod(cfg.fsq_levels)}")
        return FSQ(dim, cfg.fsq_levels)
    if cfg.quantizer == "vq":
        return VectorQuantizer(dim, cfg.codebook_size, cfg.code_dim, beta=cfg.beta,
                               decay=cfg.ema_decay,
                               dead_threshold=cfg.dead_code_threshold)
    raise ValueError(f"unknown vqgan.quantizer {cfg.quantizer!r}; choose from ['vq', 'fsq']")

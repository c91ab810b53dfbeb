"""The tokenizer's adversarial loss: PatchGAN, hinge loss, adaptive weight (LPIPS is in ``lpips.py``).

As in VQGAN (Esser et al. 2021, taming-transformers): a PatchGAN discriminator (Isola et al. 2017) scores
overlapping patches real/fake with the hinge loss, and the generator's adversarial term is scaled by the
ratio of gradient norms of the reconstruction and adversarial losses at the decoder's last layer, so
neither term swamps the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gn(channels: int) -> nn.GroupNorm:
    # GroupNorm instead of taming's BatchNorm: no running statistics to drift between real and fake
    # batches or to keep in sync across DDP ranks, and the same behaviour in train and eval mode.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """images [B, 3, H, W] -> patch logits [B, 1, h', w'] (taming's NLayerDiscriminator)."""

    def __init__(self, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution, as in pix2pix
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
                       _gn(width * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def disc_layers_for(image_size: int) -> int:
    """3 stride-2 layers for 128 px and up (70x70 patches at 256 px), 2 for small images."""
    return 3 if image_size >= 128 else 2


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d W|| / ||d adv / d W|| at the decoder's last layer W, clamped to [0, 1e4], no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

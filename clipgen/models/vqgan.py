"""The image tokenizer: a convolutional encoder, a quantizer and a decoder (VQGAN, Esser et al. 2021).

``images [B, 3, H, W] in [-1, 1]`` -> encoder -> ``z [B, C, h, w]`` with ``h = H / f``,
``f = 2 ** (len(channel_mult) - 1)`` -> quantizer (:mod:`clipgen.models.quantizer`) -> ``indices [B, h, w]``
-> decoder -> images. The layout follows taming-transformers: residual blocks (GroupNorm, SiLU, 3x3 convs)
at each resolution, stride-2 convs down, nearest-neighbour + conv up, single-head self-attention at the
resolutions listed in ``attn_resolutions`` (and in the middle block when any are listed).

A trained model lives in a self-describing directory: ``model.safetensors`` + ``config.json``
(:meth:`VQGAN.save_pretrained` / :func:`load_vqgan`). Nothing is unpickled when loading.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipgen.artifacts import atomic_path, write_json_atomic
from clipgen.config import VQGANConfig
from clipgen.models.quantizer import Quantized, build_quantizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "clipgen-vqgan"


def _groups(channels: int) -> int:
    """32 GroupNorm groups as in taming, or fewer when the width does not divide (tiny test models)."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # [B, HW, C] each
        out = F.scaled_dot_product_attention(q, k, v)  # [B, HW, C]
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def _stage(c_in: int, c_out: int, n_blocks: int, attn: bool) -> tuple[nn.ModuleList, int]:
    blocks = nn.ModuleList()
    for _ in range(n_blocks):
        blocks.append(ResBlock(c_in, c_out))
        c_in = c_out
        if attn:
            blocks.append(AttnBlock(c_out))
    return blocks, c_out


def _middle(channels: int, attn: bool) -> nn.Sequential:
    parts = [ResBlock(channels, channels)] + ([AttnBlock(channels), ResBlock(channels, channels)] if attn else [])
    return nn.Sequential(*parts)


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig, image_size: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        use_attn = bool(cfg.attn_resolutions)
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        self.stages, self.downs = nn.ModuleList(), nn.ModuleList()
        c, res = widths[0], image_size
        for i, width in enumerate(widths):
            blocks, c = _stage(c, width, cfg.n_res_blocks, res in cfg.attn_resolutions)
            self.stages.append(blocks)
            last = i == len(widths) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            res = res if last else res // 2
        self.mid = _middle(c, use_attn)
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, c, 3, padding=1)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, c0, H, W]
        for blocks, down in zip(self.stages, self.downs, strict=True):
            for block in blocks:
                h = block(h)
            h = down(h)  # halves H, W except after the last stage
        h = self.mid(h)  # [B, C, h, w]
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig, image_size: int):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        res = image_size // cfg.downsample
        c = widths[-1]
        self.conv_in = nn.Conv2d(c, c, 3, padding=1)
        self.mid = _middle(c, bool(cfg.attn_resolutions))
        self.stages, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            # one block more than the encoder, as in taming: the decoder does the harder half of the job
            blocks, c = _stage(c, width, cfg.n_res_blocks + 1, res in cfg.attn_resolutions)
            self.stages.append(blocks)
            self.ups.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
            res = res * 2 if i > 0 else res
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, C, h, w]
        for blocks, up in zip(self.stages, self.ups, strict=True):
            for block in blocks:
                h = block(h)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # doubles H, W
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is computed at (taming's ``get_last_layer``)."""
        return self.conv_out.weight


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder, built from a :class:`VQGANConfig` for ``image_size`` square images."""

    def __init__(self, cfg: VQGANConfig, image_size: int):
        super().__init__()
        if image_size % cfg.downsample:
            raise ValueError(f"image_size {image_size} must be a multiple of the downsampling factor "
                             f"{cfg.downsample} (2 ** (len(vqgan.channel_mult) - 1))")
        if cfg.n_res_blocks < 1:
            raise ValueError(f"vqgan.n_res_blocks={cfg.n_res_blocks} must be >= 1 (each level needs a block to "
                             "change width); use a smaller base_channels for a lighter model")
        self.cfg, self.image_size = cfg, image_size
        self.encoder = Encoder(cfg, image_size)
        self.quantizer = build_quantizer(cfg, self.encoder.out_channels)
        self.decoder = Decoder(cfg, image_size)
        # channels-last: oneDNN convolutions on CPU run several times faster, and tensor cores prefer it
        self.to(memory_format=torch.channels_last)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.cfg.downsample

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def quantize(self, images: torch.Tensor) -> Quantized:
        """images [B, 3, H, W] -> (z_q [B, C, h, w], indices [B, h, w], loss)."""
        return self.quantizer(self.encoder(images.contiguous(memory_format=torch.channels_last)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (recon [B, 3, H, W], indices [B, h, w], q_loss scalar)."""
        z_q, indices, q_loss = self.quantize(images)
        return self.decoder(z_q), indices, q_loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> indices [B, h, w] (int64)."""
        return self.quantize(images).indices

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> images [B, 3, H, W], clamped to [-1, 1]."""
        z_q = self.quantizer.indices_to_codes(indices).contiguous(memory_format=torch.channels_last)
        return self.decoder(z_q).clamp(-1, 1)

    def decode_soft(self, weights: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of per-position code weights ``[B, h*w, V]`` (one-hot rows give
        :meth:`decode_indices`; straight-through Gumbel-softmax rows pass gradients back to logits)."""
        vocab = self.codebook_size
        table = self.quantizer.indices_to_codes(torch.arange(vocab, device=weights.device).view(1, vocab, 1))
        table = table[0, :, :, 0].t()  # [V, C]
        side = self.grid_size
        z_q = (weights.float() @ table).transpose(1, 2).reshape(len(weights), -1, side, side)
        return self.decoder(z_q.contiguous(memory_format=torch.channels_last)).clamp(-1, 1)

    # ------------------------------------------------------------------------------ persistence
    def describe(self) -> dict:
        """What ``config.json`` holds: enough to rebuild the model with no other file."""
        return {"format": FORMAT, "image_size": self.image_size, "grid_size": self.grid_size,
                "codebook_size": self.codebook_size, "vqgan": dataclasses.asdict(self.cfg)}

    def save_pretrained(self, directory: Path, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` into ``directory`` (each file atomically)."""

        directory = Path(directory)
        with atomic_path(directory / WEIGHTS) as tmp:
            save_file(state_dict_for_save(self), str(tmp))
        write_json_atomic(directory / CONFIG, {**self.describe(), **(extra or {})})


def state_dict_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors accepts: contiguous CPU tensors that share no storage."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def load_vqgan(directory: Path, device: str | torch.device = "cpu") -> VQGAN:
    """Rebuild a VQGAN from ``directory`` (``config.json`` + ``model.safetensors``), in eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no VQGAN checkpoint in {directory} (need {CONFIG} and {WEIGHTS}); "
                                "run the train-vqgan stage first, or point at its ckpt/vqgan/<id> folder")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a clipgen VQGAN config (format {meta.get('format')!r})")
    known = {f.name for f in dataclasses.fields(VQGANConfig)}
    cfg = VQGANConfig(**{k: v for k, v in meta["vqgan"].items() if k in known})
    model = VQGAN(cfg, meta["image_size"])
    missing, unexpected = model.load_state_dict(load_file(str(weights_path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; the checkpoint folder is damaged, retrain it")
    return model.to(device).eval()

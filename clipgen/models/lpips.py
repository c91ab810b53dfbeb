"""LPIPS-VGG (Zhang et al. 2018), the tokenizer's perceptual loss, loaded from local files only.

The network is torchvision's VGG16 ``features`` up to ``relu5_3``, tapped after each block's last ReLU.
Each tap is unit-normalised over channels, the squared difference of two images' taps is weighted per
channel by a learned non-negative 1x1 head, averaged over space and summed over taps. Inputs are in
[-1, 1], as everywhere in the tokenizer.

Nothing is downloaded. ``load_lpips(path)`` reads either

* one file: the state dict of ``lpips.LPIPS(net="vgg")`` (``.pth`` or ``.safetensors``), or
* a folder with torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``, as in the torch hub cache)
  and the LPIPS v0.1 heads ``vgg.pth`` (shipped inside the ``lpips`` pip package, ``lpips/weights/v0.1``).

Both load with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models import vgg16

TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1 input scaling (its "ScalingLayer"): ImageNet statistics expressed for [-1, 1] inputs
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
HINT = ("get them on a machine with internet: torchvision's vgg16-397923af.pth (torch hub cache) plus "
        "vgg.pth from the lpips pip package (lpips/weights/v0.1/), or save lpips.LPIPS(net='vgg').state_dict(); "
        "or set vqgan.perceptual: none")


class LPIPS(nn.Module):
    """``lpips(x, y) -> [B]`` perceptual distances; frozen, but differentiable in its inputs."""

    def __init__(self):
        super().__init__()
        self.features = vgg16(weights=None).features[: TAPS[-1] + 1]
        self.heads = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pairs = zip(self._taps(x.float()), self._taps(y.float()), self.heads, strict=True)
        return sum(F.conv2d((a - b).pow(2), head).mean(dim=(2, 3)) for a, b, head in pairs).flatten()


def load_lpips(path: str | Path | None) -> LPIPS:
    """An :class:`LPIPS` with weights from ``path`` (see the module doc); fails clearly when they are absent."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"vqgan.perceptual is 'lpips' but vqgan.lpips_weights={str(path)!r} does not "
                                f"exist; {HINT}")
    path = Path(path)
    if path.is_dir():
        backbone = _first(path, ("vgg16-397923af.pth", "vgg16.pth", "vgg16.safetensors"))
        heads = _first(path, ("vgg.pth", "lpips_vgg_heads.pth", "vgg.safetensors"))
        state = _from_torchvision(_read(backbone)) | _from_lpips(_read(heads), need_backbone=False)
    else:
        state = _from_lpips(_read(path), need_backbone=True)
    net = LPIPS()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not LPIPS-VGG weights (missing {missing[:4]}, unexpected {unexpected[:4]}); {HINT}")
    return net


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"vqgan.lpips_weights folder {folder} has none of {list(names)}; {HINT}")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``features.{i}.*`` of torchvision's VGG16 -> ours (the classifier is dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) <= TAPS[-1]:
            out[key] = value
    return out


def _from_lpips(state: dict[str, torch.Tensor], need_backbone: bool) -> dict[str, torch.Tensor]:
    """``lin{k}.model.1.weight`` heads and, in a full LPIPS state dict, ``net.slice{s}.{i}.*`` -> ours."""
    out = {}
    for key, value in state.items():
        head = re.fullmatch(r"lins?\.?(\d+)\.model\.\d+\.weight", key)  # lin0.model.1 (or lins.0.model.1)
        layer = re.fullmatch(r"net\.slice\d+\.(\d+)\.(weight|bias)", key)
        if head:
            out[f"heads.{head.group(1)}"] = value
        elif layer and need_backbone:
            out[f"features.{layer.group(1)}.{layer.group(2)}"] = value  # lpips keeps torchvision's indices
    return out

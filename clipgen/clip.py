"""One face over CLIP: open_clip architectures, local checkpoints and the bundled toy CLIP.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") gives
CLIP-GEN (Wang et al. 2022, arXiv 2203.00386) its shared image-text space: the generator is conditioned on
CLIP *image* embeddings in training and on CLIP *text* embeddings at inference. Every CLIP here is built by
open_clip (Ilharco et al.), named the open_clip way (``ViT-B-32``) or ``toy-clip`` for the tiny model
registered from ``model_configs/toy-clip.json`` and pretrained on the captioned shapes world.

Loading never hangs on a network it cannot reach: a pretrained tag is resolved to a local file first (the
Hugging Face cache), and when it is not there and the hub is offline or unreachable, :class:`ClipLoadError`
says at once how to supply the weights. Checkpoints load with safetensors or ``weights_only`` torch.load.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants, try_to_load_from_cache
from open_clip.pretrained import download_pretrained
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import ToTensor

from clipgen.artifacts import atomic_path, file_digest, write_json_atomic
from clipgen.errors import ClipgenError

TOY_CLIP = "toy-clip"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "config.json"  # clipgen's self-description of a saved CLIP
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # lets plain open_clip load the folder as 'local-dir:'
INIT_SEED = 0  # random-init CLIPs are reproducible, so their embedding caches can be reused
_TOY_CONFIG = Path(__file__).parent / "model_configs" / f"{TOY_CLIP}.json"
_PATH_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


class ClipLoadError(ClipgenError, RuntimeError):
    """A CLIP that cannot be built or loaded. The message names the model and how to fix it."""


def register_toy_clip() -> None:
    """Make ``toy-clip`` an open_clip architecture name (safe to call any number of times)."""
    if TOY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_TOY_CONFIG)


# ------------------------------------------------------------------------------------- the model
class ClipModel:
    """An open_clip model with its eval preprocessing and tokenizer; parameters are frozen.

    ``encode_images`` / ``encode_texts`` return L2-normalised float32 ``[N, D]`` tensors on the model's
    device. ``net`` is the raw open_clip module (the toy-CLIP trainer unfreezes and trains it in place).
    """

    def __init__(self, name: str, net: torch.nn.Module, preprocess, tokenizer, model_cfg: dict,
                 weights_file: str | None):
        self.name, self.net, self.preprocess, self.tokenizer = name, net, preprocess, tokenizer
        self.model_cfg = model_cfg
        self.weights_file = weights_file  # None: weights are not a file (random init)
        self._file_digest: str | None = None
        self._mean_std_cache: dict = {}
        self.net.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size if isinstance(size, int) else size[0])

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def token_count(self, text: str) -> int | None:
        """Tokens ``text`` takes with its start and end markers (None if the tokenizer cannot say)."""
        encode = getattr(self.tokenizer, "encode", None)
        return len(encode(text)) + 2 if callable(encode) else None

    @property
    def preprocess_cfg(self) -> dict:
        return dict(self.net.visual.preprocess_cfg)

    def autocast(self):
        # bf16 autocast on CUDA for speed; CPU stays fp32 (CPU bf16 is slower and less precise)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def normalize_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 1], ``[N, 3, H, W]`` -> model input (resized, mean/std); differentiable."""
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean, std = self._mean_std(pixels.device, pixels.dtype)
        return (pixels - mean) / std

    def _mean_std(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessing mean and std as ``[1, 3, 1, 1]``, made once per device and dtype: building them
        on a GPU for every batch waited for all queued kernels, so the host could not run ahead of the device."""
        key = (device, dtype)
        if key not in self._mean_std_cache:
            cfg = self.preprocess_cfg
            self._mean_std_cache[key] = tuple(torch.tensor(cfg[k], dtype=dtype).view(1, 3, 1, 1).to(device)
                                              for k in ("mean", "std"))
        return self._mean_std_cache[key]

    def fit_image(self, img: Image.Image) -> np.ndarray:
        """The PIL half of ``preprocess`` (resize, crop, RGB) -> uint8 ``[S, S, 3]``.

        :meth:`prepare_images` on the result gives exactly ``preprocess(img)``: the rest of the transform
        is the /255 and mean/std that it applies to whole batches.
        """
        steps = self.preprocess.transforms
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        if cut is None:
            raise ValueError(f"{self.name}: preprocess has no ToTensor step to split at: {self.preprocess}")
        for step in steps[:cut]:
            img = step(img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def prepare_images(self, images) -> torch.Tensor:
        """PIL list, uint8 ``[N, H, W, 3]`` (array or tensor) or preprocessed float tensor -> model input.

        uint8 pixels at model size skip PIL (identical numbers to the preprocess transform): they move to
        the model's device as uint8, a quarter of the bytes, and are scaled and normalised there.
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8:
                return images  # already preprocessed
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [N, H, W, 3], got {tuple(images.shape)}")
            if images.shape[1:3] == (self.image_size, self.image_size):
                pixels = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
                return self.normalize_pixels(pixels)
            images = [Image.fromarray(a) for a in images.numpy()]
        return torch.stack([self.preprocess(img.convert("RGB")) for img in images])

    def encode_images(self, images, batch_size: int = 256, grad: bool = False) -> torch.Tensor:
        """Unit-norm image embeddings ``[N, D]``; images as for :meth:`prepare_images`."""
        chunks = []
        for start in range(0, len(images), batch_size):
            x = self.prepare_images(images[start:start + batch_size]).to(self.device)
            with self.autocast(), torch.set_grad_enabled(grad):
                chunks.append(F.normalize(self.net.encode_image(x).float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim, device=self.device)

    def encode_texts(self, texts: list[str], batch_size: int = 256, grad: bool = False) -> torch.Tensor:
        """Unit-norm text embeddings ``[N, D]``."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings; wrap a single prompt as [prompt]")
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            with self.autocast(), torch.set_grad_enabled(grad):
                chunks.append(F.normalize(self.net.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim, device=self.device)

    def weights_digest(self) -> str:
        """sha256 of the checkpoint file; of the tensors themselves when there is no file (random init)."""
        if self.weights_file is not None:
            if self._file_digest is None:  # files do not change under us; hash once
                self._file_digest = "file:" + file_digest(Path(self.weights_file))
            return self._file_digest
        return "tensors:" + state_dict_digest(self.net.state_dict())

    def fingerprint(self) -> str:
        """Changes exactly when the architecture, the weights or the image preprocessing change."""
        cfg = self.preprocess_cfg
        payload = {
            "model": self.name, "model_cfg": self.model_cfg, "weights": self.weights_digest(),
            "preprocess": {k: cfg.get(k) for k in ("size", "mean", "std", "interpolation", "resize_mode",
                                                   "fill_color")},
        }
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_dict_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{tensor.dtype}:{tuple(state[key].shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------- loading
class _Source(NamedTuple):
    open_clip_name: str  # what open_clip is asked to build ('toy-clip' or 'local-dir:/abs/path')
    checkpoint: str | None  # a local weights file, or None (random init / found by open_clip in local-dir)
    weights_file: str | None  # the file the weights come from, for the fingerprint
    tag_cfg: dict  # open_clip's pretrained-tag entry (preprocessing, quick_gelu); {} for files


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu",
              init_seed: int = INIT_SEED) -> ClipModel:
    """Build CLIP ``model`` with weights from a tag ('openai'), a local file or folder, or None (random).

    ``init_seed`` seeds the random initialisation (without touching the global RNG), so a random-init CLIP
    is the same model on every load.
    """
    register_toy_clip()
    check_clip_model(model)
    source = _resolve(model, pretrained)
    tag = source.tag_cfg
    overrides = {f"image_{k}": tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net, _, preprocess = open_clip.create_model_and_transforms(
                source.open_clip_name, pretrained=source.checkpoint, device=device,
                # a tag trained with QuickGELU must run with it; open_clip itself only warns
                force_quick_gelu=bool(tag.get("quick_gelu", False)),
                pretrained_text=False,  # never fetch separate text-tower weights behind the user's back
                **overrides)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ClipLoadError(
            f"could not build CLIP {model!r} with pretrained={pretrained!r}: {exc}. If this is a checkpoint, "
            f"check that clip.model names the architecture it was trained with") from exc
    tokenizer = open_clip.get_tokenizer(source.open_clip_name)
    model_cfg = open_clip.get_model_config(source.open_clip_name)
    return ClipModel(model, net, preprocess, tokenizer, model_cfg, source.weights_file)


def check_clip_source(model: str, pretrained: str | None) -> None:
    """Raise :class:`ClipLoadError` now if :func:`load_clip` would fail on where the weights come from: an
    unknown architecture, a missing file, an unknown tag, or a tag whose weights are not cached on an offline
    machine. Downloads nothing (a tag that can still be downloaded passes)."""
    register_toy_clip()
    check_clip_model(model)
    is_tag = pretrained and not os.path.exists(pretrained) and open_clip.get_pretrained_cfg(model, pretrained)
    if is_tag and not _hf_offline():
        return  # cached, or downloaded when a stage loads it
    _resolve(model, pretrained)


def check_clip_model(model: str) -> None:
    """Raise :class:`ClipLoadError` unless ``model`` names an open_clip architecture (toy-clip included)."""
    register_toy_clip()
    if model.startswith(("hf-hub:", "local-dir:")) or model in open_clip.list_models():
        return
    names = open_clip.list_models()
    close = difflib.get_close_matches(model, names, n=5, cutoff=0.4)
    hint = f"close names: {close}" if close else f"e.g. {[TOY_CLIP, 'ViT-B-32', 'ViT-B-16', 'RN50']}"
    raise ClipLoadError(f"unknown CLIP architecture {model!r}; {hint} (all: open_clip.list_models())")


def _resolve(model: str, pretrained: str | None) -> _Source:
    if not pretrained:
        return _Source(model, None, None, {})
    if os.path.isdir(pretrained):
        return _resolve_dir(model, Path(pretrained))
    if os.path.isfile(pretrained):
        return _Source(model, pretrained, pretrained, {})
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        path = _tag_weights_file(model, pretrained, tag_cfg)
        return _Source(model, path, path, tag_cfg)
    if os.sep in pretrained or pretrained.endswith(_PATH_SUFFIXES):
        raise ClipLoadError(f"CLIP checkpoint {pretrained!r} not found; check clip.pretrained")
    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ClipLoadError(
        f"{pretrained!r} is neither a pretrained tag of {model!r} (tags: {tags or 'none'}) nor an existing "
        f"checkpoint path; set clip.pretrained to a tag, a local checkpoint path, or null for random init")


def _resolve_dir(model: str, folder: Path) -> _Source:
    """A folder written by :func:`save_clip` (or any folder holding one open_clip weights file)."""
    folder = folder.resolve()
    described = folder / CONFIG_FILE
    if described.is_file():
        saved = json.loads(described.read_text()).get("model")
        if saved and saved != model:
            raise ClipLoadError(f"{folder} holds a {saved!r} checkpoint but clip.model is {model!r}; "
                                f"set clip.model: {saved}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            raise ClipLoadError(f"no single CLIP weights file in {folder} (expected {WEIGHTS_FILE}); "
                                f"point clip.pretrained at the weights file itself")
        weights = found[0]
    if (folder / OPEN_CLIP_CONFIG_FILE).is_file() and weights.name == WEIGHTS_FILE:
        # the architecture saved beside the weights wins over today's registry entry
        return _Source(f"local-dir:{folder}", None, str(weights), {})
    return _Source(model, str(weights), str(weights), {})


# ----------------------------------------------------------------------- pretrained tags, offline
def _tag_weights_file(model: str, tag: str, cfg: dict) -> str:
    """A local file for open_clip tag ``model:tag``: the cached one, or a download when that can work."""
    for repo_id, filename in _hf_candidates(cfg):
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(hit, str):
            return hit
    url = cfg.get("url", "")
    legacy = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
    if legacy is not None and legacy.is_file():
        return str(legacy)
    if _hf_offline():
        raise ClipLoadError(_missing_weights(model, tag, cfg, "HF_HUB_OFFLINE is set and they are not cached"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub") else url
    if not _reachable(endpoint):
        raise ClipLoadError(_missing_weights(model, tag, cfg, f"{endpoint} cannot be reached"))

    cache_dir = _hf_cache_dir() if cfg.get("hf_hub") else None
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # any hub/HTTP failure becomes the same actionable message
        raise ClipLoadError(_missing_weights(model, tag, cfg, f"the download failed ({exc})")) from exc


def _hf_candidates(cfg: dict) -> list[tuple[str, str]]:
    """(repo, filename) pairs open_clip would fetch for a tag, safetensors first (open_clip's order)."""
    hub = cfg.get("hf_hub", "")
    if not hub:
        return []
    repo_id, filename = os.path.split(hub)
    if not filename:
        return [(repo_id, "open_clip_model.safetensors"), (repo_id, "open_clip_pytorch_model.bin")]
    stem, ext = os.path.splitext(filename)
    safe = [(repo_id, stem + ".safetensors")] if ext in (".bin", ".pth") else []
    return safe + [(repo_id, filename)]


def _hf_cache_dir() -> str:
    # read at call time: huggingface_hub freezes its constants at import, before tests/users set HF_HOME
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(home, "hub")


def _hf_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """One quick request instead of open_clip's ~45 s of retries against a network that is not there."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _missing_weights(model: str, tag: str, cfg: dict, reason: str) -> str:
    where = cfg.get("hf_hub") or cfg.get("url") or "its download location"
    return (
        f"cannot load CLIP {model!r} with pretrained={tag!r}: the weights are not on this machine and {reason}. "
        f"Supply them one of three ways: (1) copy the checkpoint file here and set clip.pretrained to its local "
        f"path (e.g. /models/{model}-{tag}.safetensors); (2) pre-populate the Hugging Face cache with {where} "
        f"and point HF_HOME at it (now {os.path.dirname(_hf_cache_dir())}); (3) on a host that can reach it, "
        f"unset HF_HUB_OFFLINE so open_clip downloads them.")


# --------------------------------------------------------------------------------------- saving
def save_clip(clip: ClipModel, out_dir: str | Path) -> Path:
    """Write ``open_clip_model.safetensors`` + ``config.json`` (+ open_clip's own config) atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in clip.net.state_dict().items()}
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": clip.name})
        os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; checkpoints are meant to be shared
    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in clip.preprocess_cfg.items()}
    write_json_atomic(out / OPEN_CLIP_CONFIG_FILE, {"model_cfg": clip.model_cfg, "preprocess_cfg": preprocess})
    write_json_atomic(out / CONFIG_FILE, {
        "model": clip.name, "weights": WEIGHTS_FILE, "embed_dim": clip.embed_dim,
        "image_size": clip.image_size, "context_length": clip.context_length,
        "open_clip_version": open_clip.__version__,
    })
    return out / WEIGHTS_FILE

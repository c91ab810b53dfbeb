"""Contrastive pretraining of the bundled toy CLIP, and the probes that say whether it is good enough.

The toy CLIP stands in for OpenAI's CLIP in the self-contained shapes pipeline: it
is trained with CLIP's symmetric InfoNCE objective (Radford et al. 2021) and a learnable temperature on
the *captioned* world split, then frozen for CLIP-GEN (Wang et al. 2022).

Templated captions repeat: a batch holds many images with the very same caption. Plain InfoNCE would
treat those copies as negatives of each other and push apart what it also pulls together. Here every
distinct caption in a batch is encoded once, an image's target is its caption (image -> text is then an
ordinary softmax over distinct captions), and a caption's target is the uniform distribution over all
images that carry it (text -> image is a multi-positive, soft-target InfoNCE). Duplicates thus become
positives, and identical texts stop costing a text-tower forward each.

Training resumes: ``train_state.pt`` (weights + AdamW state, loadable with ``weights_only=True``) is saved
every ``ckpt_every`` steps; each step's batch and augmentation are drawn from an RNG seeded by
``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipgen.artifacts import atomic_path
from clipgen.clip import TOY_CLIP, ClipModel, load_clip, save_clip
from clipgen.config import ToyClipConfig
from clipgen.train.loop import evaluation_due

WARMUP_FRACTION = 0.05  # of cfg.steps, linear warmup before the cosine decay
MIN_LR_FRACTION = 0.1  # the cosine ends at this fraction of cfg.lr
WEIGHT_DECAY = 0.1
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp on the learnable temperature
MAX_SHIFT = 2  # pixels of random translation (augmentation)
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class CaptionedImages(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]  # N captions, one per image


class Batch(NamedTuple):
    pixels: torch.Tensor  # [B, 3, S, S] model input
    tokens: torch.Tensor  # [U, T] the distinct captions of the batch
    caption_index: torch.Tensor  # [B] which of the U captions each image carries


# ------------------------------------------------------------------------------------------ loss
def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                             caption_index: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over B images and U distinct captions; images sharing a caption are all positives.

    image_features [B, D] and text_features [U, D] are unit-norm; caption_index [B] maps image -> caption.
    """
    logits = logit_scale.exp().clamp(max=100.0) * image_features @ text_features.T  # [B, U]
    image_to_text = F.cross_entropy(logits, caption_index)
    positives = F.one_hot(caption_index, text_features.shape[0]).T.float()  # [U, B]
    targets = positives / positives.sum(dim=1, keepdim=True)
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def _forward_loss(clip: ClipModel, batch: Batch) -> torch.Tensor:
    net = clip.net
    with clip.autocast():
        image_features = F.normalize(net.encode_image(batch.pixels).float(), dim=-1)
        text_features = F.normalize(net.encode_text(batch.tokens).float(), dim=-1)
    return multi_positive_clip_loss(image_features, text_features, batch.caption_index, net.logit_scale)


# ------------------------------------------------------------------------------------------ data
class _Data:
    """The captioned set held in memory as tensors, with every distinct caption tokenized once."""

    def __init__(self, data: CaptionedImages, clip: ClipModel):
        images = np.asarray(data.images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"CaptionedImages.images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(data.captions) != len(images) or len(images) == 0:
            raise ValueError(f"need one caption per image and at least one image; got {len(images)} images "
                             f"and {len(data.captions)} captions")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 [N, 3, H, W]
        distinct, caption_ids = np.unique(np.asarray(data.captions, dtype=object), return_inverse=True)
        self.caption_ids = torch.from_numpy(caption_ids.astype(np.int64))
        self.tokens = clip.tokenizer([str(c) for c in distinct])  # [n_distinct, T]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, clip: ClipModel, indices: np.ndarray, rng: np.random.Generator | None) -> Batch:
        pixels = self.images[torch.from_numpy(indices)].float() / 255.0
        if rng is not None:
            pixels = augment(pixels, rng)
        distinct, caption_index = torch.unique(self.caption_ids[torch.from_numpy(indices)], return_inverse=True)
        device = clip.device
        return Batch(clip.normalize_pixels(pixels.to(device)), self.tokens[distinct].to(device),
                     caption_index.to(device))


def augment(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Horizontal flips and small shifts: they keep colour, shape and size, which captions describe.

    No colour jitter (colour is a caption word) and no crops that could cut a shape in half.
    """
    flip = torch.from_numpy(rng.random(len(pixels)) < 0.5)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    dx, dy = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
    # edge replication continues the background instead of adding a black border that is not in the data
    padded = F.pad(pixels, (MAX_SHIFT,) * 4, mode="replicate")
    h, w = pixels.shape[-2:]
    return padded[..., MAX_SHIFT + dy:MAX_SHIFT + dy + h, MAX_SHIFT + dx:MAX_SHIFT + dx + w]


# ------------------------------------------------------------------------------------- training
def lr_at(step: int, cfg: ToyClipConfig) -> float:
    """Linear warmup, then cosine decay to MIN_LR_FRACTION * lr."""
    warmup = max(1, int(WARMUP_FRACTION * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(net: torch.nn.Module, cfg: ToyClipConfig) -> torch.optim.Optimizer:
    # CLIP practice: no weight decay on gains, biases, embeddings of positions/class or the temperature
    decay, no_decay = [], []
    for name, param in net.named_parameters():
        plain = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all parameters, ~5x faster than the per-tensor loop on CPU (6M-row token table)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def pretrain_toy_clip(data: CaptionedImages, cfg: ToyClipConfig, out_dir: str | Path,
                      eval_data: CaptionedImages | None = None, *, model: str = TOY_CLIP, augmentation: bool = True,
                      log_every: int = 50, ckpt_every: int = 200, device: str | None = None,
                      progress: bool = True) -> dict:
    """Train CLIP ``model`` from scratch on ``data``; save it to ``out_dir`` with :func:`save_clip`.

    Writes ``metrics.jsonl`` (step, loss, lr, seconds, logit_scale, eval_loss when ``eval_data`` is given).
    Returns {"steps", "train_seconds", "final_loss"}; final_loss is the mean of the last log window.
    Set ``augmentation=False`` if captions name positions or sides (flips and shifts would then lie).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip = load_clip(model, None, device=device, init_seed=cfg.seed)
    clip.net.requires_grad_(True).train()
    optimizer = _optimizer(clip.net, cfg)
    train = _Data(data, clip)
    held = _Data(_head(eval_data, 1024), clip) if eval_data is not None else None
    start, seconds = _resume(out, clip, optimizer)
    run = _Run(clip, optimizer, cfg, out, augmentation, log_every, ckpt_every)
    with tqdm(total=cfg.steps, initial=start, desc="toy-clip", disable=not progress) as bar:
        seconds, window = run.steps(train, held, start, seconds, bar)
    clip.net.eval().requires_grad_(False)
    save_clip(clip, out)
    (out / STATE_FILE).unlink(missing_ok=True)  # finished: the resume state is no longer needed
    final = float(np.mean(window)) if window else _last_logged_loss(out)
    return {"steps": cfg.steps, "train_seconds": round(seconds, 2), "final_loss": final}


class _Run(NamedTuple):
    clip: ClipModel
    optimizer: torch.optim.Optimizer
    cfg: ToyClipConfig
    out: Path
    augmentation: bool
    log_every: int
    ckpt_every: int

    def steps(self, train: _Data, held: _Data | None, start: int, seconds: float, bar) -> tuple[float, list[float]]:
        """Steps ``start .. cfg.steps - 1``: (seconds trained in all, losses of the last log window)."""
        cfg, net, window = self.cfg, self.clip.net, []
        for step in range(start, cfg.steps):
            began = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, step])  # batch + augmentation: a function of the step
            indices = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
            batch = train.batch(self.clip, indices, rng if self.augmentation else None)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = _forward_loss(self.clip, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                net.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            seconds += time.perf_counter() - began
            window = (window + [loss.item()])[-self.log_every:]
            bar.update(1)
            self._after_step(step + 1, window, seconds, held, bar)
        return seconds, window

    def _after_step(self, done: int, window: list[float], seconds: float, held: _Data | None, bar) -> None:
        if done % self.log_every == 0 or done == self.cfg.steps:
            row = {"step": done, "loss": float(np.mean(window)), "lr": lr_at(done - 1, self.cfg),
                   "seconds": round(seconds, 2), "logit_scale": float(self.clip.net.logit_scale.detach().exp())}
            if held is not None and evaluation_due(done, self.cfg.steps, self.log_every):
                row["eval_loss"] = evaluate_loss(self.clip, held)
            _append_metrics(self.out, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if done % self.ckpt_every == 0 and done < self.cfg.steps:
            _save_state(self.out, self.clip, self.optimizer, done, seconds)


def evaluate_loss(clip: ClipModel, held: _Data, batch_size: int = 256) -> float:
    """Mean contrastive loss on held-out pairs in fixed batches (no augmentation, no gradients)."""
    was_training = clip.net.training
    clip.net.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(held), batch_size):
            indices = np.arange(start, min(start + batch_size, len(held)))
            losses.append(_forward_loss(clip, held.batch(clip, indices, None)).item())
    clip.net.train(was_training)
    return float(np.mean(losses))


def _head(data: CaptionedImages, n: int) -> CaptionedImages:
    return CaptionedImages(np.asarray(data.images)[:n], list(data.captions[:n]))


def _append_metrics(out: Path, row: dict) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def _last_logged_loss(out: Path) -> float:
    lines = (out / METRICS_FILE).read_text().splitlines() if (out / METRICS_FILE).is_file() else []
    return float(json.loads(lines[-1])["loss"]) if lines else float("nan")


def _save_state(out: Path, clip: ClipModel, optimizer: torch.optim.Optimizer, step: int, seconds: float) -> None:
    state = {"model": clip.net.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds}
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)


def _resume(out: Path, clip: ClipModel, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Load the last train state if there is one: (first step to run, seconds trained so far)."""
    path = out / STATE_FILE
    if not path.is_file():
        (out / METRICS_FILE).unlink(missing_ok=True)  # a fresh run: no metrics from an older attempt
        return 0, 0.0
    state = torch.load(path, map_location=clip.device, weights_only=True)
    clip.net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _truncate_metrics(out, state["step"])
    return int(state["step"]), float(state["seconds"])


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from (they will be logged again)."""
    path = out / METRICS_FILE
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


# ---------------------------------------------------------------------------------------- probes
def zero_shot_accuracy(clip: ClipModel, images: np.ndarray, labels: Mapping[str, Sequence[str]],
                       prompts: Mapping[str, Sequence[str]],
                       templates: str | Mapping[str, Sequence[str]] = "a {}") -> dict[str, float]:
    """Per-attribute accuracy of classifying each image by its nearest class-prompt embedding.

    ``labels[attr]`` holds each image's true class, ``prompts[attr]`` the candidate class names. A class
    embedding is the normalised mean over its templates (CLIP's prompt ensembling): ``templates`` is one
    template for every attribute, or per attribute a list such as ``["a {} circle", "a {} square"]``.
    """
    image_features = clip.encode_images(images)
    accuracy = {}
    for attr, classes in prompts.items():
        truth = list(labels[attr]) if attr in labels else None
        if truth is None or len(truth) != len(image_features):
            raise ValueError(f"labels[{attr!r}] must hold one label per image ({len(image_features)})")
        unknown = sorted(set(truth) - set(classes))
        if unknown:
            raise ValueError(f"labels of {attr!r} {unknown} are not among prompts[{attr!r}] = {list(classes)}")
        attr_templates = [templates] if isinstance(templates, str) else list(templates.get(attr, ["a {}"]))
        class_features = class_embeddings(clip, list(classes), attr_templates)
        predicted = (image_features @ class_features.T).argmax(dim=1).cpu().numpy()
        accuracy[attr] = float(np.mean(np.asarray(classes, dtype=object)[predicted] == np.asarray(truth, dtype=object)))
    return accuracy


def class_embeddings(clip: ClipModel, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D] unit-norm mean text embedding of each class over the templates."""
    texts = [t.format(c) for c in classes for t in templates]
    features = clip.encode_texts(texts).view(len(classes), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


def modality_gap(clip: ClipModel, images: np.ndarray, captions: Sequence[str], combos: Sequence[str]) -> dict[str, float]:
    """How close images sit to their captions compared with other images.

    Returns the mean cosine of each image with its own caption, with other images of the same
    ``combos`` label (e.g. "red circle"), with any other image, and the distance between the image and
    text embedding centroids (the offset a mean-shift bridge would add).
    """
    img = clip.encode_images(images).double()
    txt = clip.encode_texts(list(captions)).double()
    groups = np.asarray(combos, dtype=object)
    pair_sum, pair_count = 0.0, 0
    for combo in np.unique(groups):
        members = img[torch.from_numpy(groups == combo)]
        n = len(members)
        # sum over ordered pairs i != j of cos = |sum of vectors|^2 - n (unit vectors), in O(n)
        pair_sum += float(members.sum(0).pow(2).sum()) - n
        pair_count += n * (n - 1)
    n = len(img)
    return {
        "cos_image_caption": float((img * txt).sum(1).mean()),
        "cos_image_same_combo": pair_sum / max(1, pair_count),
        "cos_image_random": (float(img.sum(0).pow(2).sum()) - n) / max(1, n * (n - 1)),
        "centroid_gap": float((img.mean(0) - txt.mean(0)).norm()),
    }

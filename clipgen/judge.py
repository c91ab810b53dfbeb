"""The shapes-world judge: a small CNN that says which shape and colour an image shows (DESIGN.md section 4).

Prompt accuracy (does the generated image show what the prompt asked for?) needs a scorer that shares
nothing with the CLIP that conditions the generator, or the generator could be graded by its own teacher.
The judge is trained with plain labels on the world's ``judge`` split and checked on ``heldout``.

A judge directory is self-describing: ``judge.safetensors`` (weights), ``config.json`` (architecture,
label names in id order, image size) and ``metrics.json`` (held-out accuracy, training time).
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from clipgen.artifacts import atomic_path, write_json_atomic
from clipgen.config import DataConfig, JudgeConfig
from clipgen.cores import free_cpu_threads, torch_threads
from clipgen.data.shards import iter_shard, shard_paths
from clipgen.data.world import COLOUR_NAMES, SHAPES, WorldArrays, world_arrays

WEIGHTS, CONFIG, METRICS = "judge.safetensors", "config.json", "metrics.json"
PREDICT_BATCH = 512
BLUR_RATE = 0.3


@dataclass(frozen=True)
class JudgeArch:
    """Conv widths and strides; three stride-2 layers take 32 px to 4x4 before global pooling.

    Small on purpose: it reaches 100% on 10k held-out 32 px images in ~45 ms per step on one CPU core.
    """

    widths: tuple[int, ...] = (32, 64, 96)
    strides: tuple[int, ...] = (2, 2, 2)


class JudgeNet(nn.Module):
    """conv-BN-ReLU stack -> global avg+max pool -> one linear head per attribute."""

    def __init__(self, arch: JudgeArch, n_shapes: int, n_colours: int):
        super().__init__()
        layers, channels = [], 3
        for width, stride in zip(arch.widths, arch.strides, strict=True):
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        # max pooling keeps a small shape's evidence from being averaged away by the background
        self.shape_head = nn.Linear(2 * channels, n_shapes)
        self.colour_head = nn.Linear(2 * channels, n_colours)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features((x - 0.5) / 0.25)  # x: [N, 3, H, W] in [0, 1]
        pooled = torch.cat([F.adaptive_avg_pool2d(h, 1), F.adaptive_max_pool2d(h, 1)], dim=1).flatten(1)
        return self.shape_head(pooled), self.colour_head(pooled)  # [N, n_shapes], [N, n_colours]


class JudgeVerdict(NamedTuple):
    shapes: list[str]  # one name from the judge's shape list per image
    colours: list[str]  # one name from the judge's colour list per image


# ------------------------------------------------------------------------------------ the judge
def images_to_tensor(images, image_size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch), float [N, 3, H, W] in [0, 1], or PIL images -> float [N, 3, S, S]."""
    if isinstance(images, Sequence) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BOX))
                           for im in images])
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"judge images must be a batch [N, H, W, 3] uint8 or [N, 3, H, W] float, got shape "
                         f"{tuple(x.shape)}; add a batch dimension for a single image")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 judge images must be [N, H, W, 3] RGB, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 255.0
    elif not x.is_floating_point() or x.shape[1] != 3:
        raise ValueError(f"float judge images must be [N, 3, H, W] in [0, 1], got {x.dtype} {tuple(x.shape)}")
    x = x.float()
    if x.shape[-2:] != (image_size, image_size):  # the judge saw one scale only; meet it there
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


class Judge:
    """A trained judge plus its label names; ``predict`` maps images to attribute names."""

    def __init__(self, net: JudgeNet, arch: JudgeArch, image_size: int, shapes: Sequence[str],
                 colours: Sequence[str]):
        self.net, self.arch, self.image_size = net.eval(), arch, image_size
        self.shapes, self.colours = tuple(shapes), tuple(colours)

    @torch.no_grad()
    def logits(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape and colour logits, [N, len(shapes)] and [N, len(colours)]; see images_to_tensor for inputs."""
        x = images_to_tensor(images, self.image_size)
        device = next(self.net.parameters()).device
        parts = [self.net(x[i:i + PREDICT_BATCH].to(device)) for i in range(0, len(x), PREDICT_BATCH)]
        if not parts:
            return torch.zeros(0, len(self.shapes)), torch.zeros(0, len(self.colours))
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def predict_ids(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (shape ids, colour ids), int64 [N] each: indices into ``shapes`` / ``colours``."""
        shape_logits, colour_logits = self.logits(images)
        return shape_logits.argmax(1), colour_logits.argmax(1)

    def predict(self, images) -> JudgeVerdict:
        """Predicted attribute names, one shape and one colour per image."""
        shape_ids, colour_ids = self.predict_ids(images)
        return JudgeVerdict([self.shapes[i] for i in shape_ids.tolist()],
                            [self.colours[i] for i in colour_ids.tolist()])


def save_judge(judge: Judge, out_dir: Path) -> None:
    """Write ``judge.safetensors`` and ``config.json`` (each atomically) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in judge.net.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    config = {"arch": asdict(judge.arch), "image_size": judge.image_size, "shapes": list(judge.shapes),
              "colours": list(judge.colours)}
    write_json_atomic(out_dir / CONFIG, config)


def load_judge(path: Path, device: str = "cpu") -> Judge:
    """Load a judge directory written by :func:`train_judge` (safetensors, no pickle)."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"no judge at {path}: {name} is missing; train it by running the ingest "
                                    "stage (clipgen run PIPELINE --stages ingest)")
    config = json.loads((path / CONFIG).read_text())
    arch = JudgeArch(**{k: tuple(v) for k, v in config["arch"].items()})
    net = JudgeNet(arch, len(config["shapes"]), len(config["colours"]))
    net.load_state_dict(load_file(str(path / WEIGHTS)))
    return Judge(net.to(device), arch, config["image_size"], config["shapes"], config["colours"])


# ------------------------------------------------------------------------------------- training
def _blur(x: torch.Tensor) -> torch.Tensor:
    """A mild 3x3 binomial blur per channel."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and transposes (the 8 symmetries of a square: none changes a shape's name), and a
    mild blur on some images, because generated images are softer than rendered ones."""
    for change, rate in ((lambda t: t.flip(2), 0.5), (lambda t: t.flip(3), 0.5),
                         (lambda t: t.transpose(2, 3), 0.5), (_blur, BLUR_RATE)):
        chosen = (torch.rand(len(x), generator=gen) < rate).to(x.device)
        x = torch.where(chosen[:, None, None, None], change(x), x)
    return x


def _learning_rate(step: int, cfg: JudgeConfig) -> float:
    """Short linear warm-up, then cosine decay to zero: late steps polish the last fraction of a percent."""
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def _batch_indices(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of sample indices: a fresh permutation per epoch, the ragged tail dropped."""
    if n < batch_size:
        raise ValueError(f"the judge split has {n} images, fewer than data.judge.batch_size={batch_size}; "
                         "raise data.world.n_judge or lower the batch size")
    while True:
        order = torch.randperm(n, generator=gen)
        yield from order[: n - n % batch_size].split(batch_size)


def fit_judge(net: JudgeNet, data: WorldArrays, cfg: JudgeConfig) -> float:
    """Train ``net`` in place on labeled world arrays; return the final training loss."""
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order and augmentation draws, on the CPU
    device = next(net.parameters()).device
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).to(device)  # uint8 [N, 3, H, W]
    shape_ids = torch.from_numpy(data.shape_ids).to(device)
    colour_ids = torch.from_numpy(data.colour_ids).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    batches = _batch_indices(len(images), cfg.batch_size, gen)
    net.train()
    for step in range(cfg.steps):
        batch = next(batches).to(device)
        x = _augment(images[batch].float() / 255.0, gen)  # float per batch only: 4x less resident memory
        shape_logits, colour_logits = net(x)
        loss = F.cross_entropy(shape_logits, shape_ids[batch]) + F.cross_entropy(colour_logits, colour_ids[batch])
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    return loss.item()


def arrays_accuracy(judge: Judge, data: WorldArrays) -> dict:
    """Per-attribute accuracy of ``judge`` on labeled world arrays."""
    shape_ids, colour_ids = judge.predict_ids(data.images)
    return _accuracy(shape_ids.numpy(), colour_ids.numpy(), data.shape_ids, data.colour_ids)


def _accuracy(shape_pred: np.ndarray, colour_pred: np.ndarray, shape_true: np.ndarray,
              colour_true: np.ndarray) -> dict:
    shape_ok, colour_ok = shape_pred == shape_true, colour_pred == colour_true
    n = len(shape_true)
    return {"shape_accuracy": float(shape_ok.mean()) if n else 0.0,
            "colour_accuracy": float(colour_ok.mean()) if n else 0.0,
            "joint_accuracy": float((shape_ok & colour_ok).mean()) if n else 0.0,
            "n": n, "shape_correct": int(shape_ok.sum()), "colour_correct": int(colour_ok.sum())}


def train_judge(data: DataConfig, out_dir: Path) -> dict:
    """Train the judge on the world's ``judge`` split, score it on ``heldout``, save it to ``out_dir``."""
    cfg = data.judge
    threads = free_cpu_threads()  # before rendering, so the load we see is other processes' only
    train = world_arrays(data.world, "judge", data.image_size, workers=data.workers)
    heldout = world_arrays(data.world, "heldout", data.image_size, workers=data.workers)
    torch.manual_seed(cfg.seed)  # the weight init
    arch = JudgeArch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = JudgeNet(arch, len(SHAPES), len(COLOUR_NAMES)).to(device)
    with torch_threads(threads):
        start = time.perf_counter()
        final_loss = fit_judge(net, train, cfg)
        train_seconds = time.perf_counter() - start
        judge = Judge(net, arch, data.image_size, SHAPES, COLOUR_NAMES)
        accuracy = arrays_accuracy(judge, heldout)
    save_judge(judge, out_dir)
    metrics = {**accuracy, "device": device, "cpu_threads": threads, "steps": cfg.steps,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "final_train_loss": final_loss, "train_seconds": round(train_seconds, 2),
               "n_train": len(train.images), "n_heldout": len(heldout.images)}
    write_json_atomic(Path(out_dir) / METRICS, metrics)
    return {key: metrics[key] for key in ("shape_accuracy", "colour_accuracy", "train_seconds", "n_train",
                                          "n_heldout")}


# ------------------------------------------------------------------------------ scoring shards
def _iter_labeled_shards(shard_root: Path, split: str) -> Iterator[tuple[np.ndarray, str, str]]:
    for path in shard_paths(shard_root, split):
        for key, parts in iter_shard(path):
            image_ext = next((ext for ext in ("png", "jpg") if ext in parts), None)
            if image_ext is None or "json" not in parts:
                raise ValueError(f"{path}: sample {key!r} lacks an image or its json; re-run the ingest stage")
            meta = json.loads(parts["json"])
            if "shape" not in meta or "colour" not in meta:
                raise ValueError(f"{path}: sample {key!r} has no shape/colour labels; the judge can only "
                                 "score shapes-world shards (data.source: world)")
            image = np.asarray(Image.open(io.BytesIO(parts[image_ext])).convert("RGB"))
            yield image, meta["shape"], meta["colour"]


def judge_accuracy(judge: Judge, shard_root: Path, split: str = "heldout") -> dict:
    """Per-attribute accuracy and counts of ``judge`` on the labeled world shards of one split."""
    shape_pred, colour_pred, shape_true, colour_true = [], [], [], []
    batch: list[np.ndarray] = []

    def flush() -> None:
        shape_ids, colour_ids = judge.predict_ids(np.stack(batch))
        shape_pred.extend(shape_ids.tolist())
        colour_pred.extend(colour_ids.tolist())
        batch.clear()

    for image, shape, colour in _iter_labeled_shards(shard_root, split):
        batch.append(image)
        # a label the judge does not know can never be matched: -1 counts it as wrong, not as a crash
        shape_true.append(judge.shapes.index(shape) if shape in judge.shapes else -1)
        colour_true.append(judge.colours.index(colour) if colour in judge.colours else -1)
        if len(batch) == PREDICT_BATCH:
            flush()
    if batch:
        flush()
    result = _accuracy(*(np.asarray(v, np.int64) for v in (shape_pred, colour_pred, shape_true, colour_true)))
    return {"split": split, **result}

"""The ``pretrain-clip`` and ``embed`` stages.

``pretrain-clip`` (toy CLIP only) trains the bundled open_clip model contrastively on the *captioned*
world split and records its zero-shot accuracy and modality gap. ``embed`` writes the CLIP image
embedding of every train/heldout sample to per-shard Parquet, up to ``SHARDS_PER_TASK`` shards per
mapped task, and a faiss index over the train embeddings. Finished shard files are reused after an interruption.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch

from clipgen.artifacts import Artifact, weights_identity, write_json_atomic
from clipgen.config import PipelineConfig, to_dict
from clipgen.cores import free_cpu_threads, torch_threads
from clipgen.data.images_array import decode_image
from clipgen.data.shards import iter_shard, shard_paths
from clipgen.data.world import COLOUR_NAMES, SHAPES
from clipgen.embed import cache_files, embed_shards, read_embeddings
from clipgen.index import build_index, save_index
from clipgen.stages import ShardJob, pending_shard_jobs, reuse_other_shards_work

EMBED_SPLITS = ("train", "heldout")
# Zero-shot probes: each class embedding is the mean over these templates (CLIP prompt ensembling).
PROBE_TEMPLATES = {
    "colour": ["a {} shape", "a picture of a {} shape", "a {} object"],
    "shape": ["a {}", "a picture of a {}", "an image of a {}"],
}
PROBE_IMAGES = 2000
# Shards per embed task: one pipeline (decoding threads, the model, a writer thread) runs through all of
# them, so a task still stays small enough to retry or to spread over task-runner workers.
SHARDS_PER_TASK = 16


# ---------------------------------------------------------------------------------- pretrain-clip
class LabeledImages(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, 3]
    meta: list[dict[str, Any]]  # each sample's json (captions and attributes live here)


def read_labeled_split(shard_root: Path, split: str, image_size: int, limit: int | None = None) -> LabeledImages:
    """Images and their json of one split. Only the toy CLIP and evaluation may read the json."""
    images, metas = [], []
    for shard in shard_paths(shard_root, split):
        for _, members in iter_shard(shard):
            image = decode_image(members, image_size)
            if image is None or "json" not in members:
                continue
            images.append(image)
            metas.append(json.loads(members["json"]))
            if limit is not None and len(images) >= limit:
                return LabeledImages(np.stack(images), metas)
    return LabeledImages(np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8), metas)


def toyclip_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"model": cfg.clip.model, "image_size": cfg.data.image_size, "toy": to_dict(cfg.clip.toy)}


def build_toyclip(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.clip import load_clip
    from clipgen.train.clip_trainer import CaptionedImages, pretrain_toy_clip

    shards = inputs["shards"].path
    train = read_labeled_split(shards, "captioned", cfg.data.image_size)
    held = read_labeled_split(shards, "heldout", cfg.data.image_size, limit=PROBE_IMAGES)
    # oversubscribed CPU threads slow small models down many times
    with torch_threads(cfg.train.cpu_threads or free_cpu_threads()):
        summary = pretrain_toy_clip(CaptionedImages(train.images, [m["caption"] for m in train.meta]),
                                    cfg.clip.toy, out, CaptionedImages(held.images, [m["caption"] for m in held.meta]),
                                    model=cfg.clip.model)
    probe = probe_clip(load_clip(cfg.clip.model, str(out)), held)
    write_json_atomic(out / "probe.json", probe)
    return {**summary, **probe}


def probe_clip(clip, held: LabeledImages) -> dict[str, Any]:
    """Zero-shot accuracy per attribute (nearest class prompt) and the image/text modality gap."""
    from clipgen.train.clip_trainer import modality_gap, zero_shot_accuracy

    labels = {"colour": [m["colour"] for m in held.meta], "shape": [m["shape"] for m in held.meta]}
    accuracy = zero_shot_accuracy(clip, held.images, labels, {"colour": list(COLOUR_NAMES), "shape": list(SHAPES)},
                                  PROBE_TEMPLATES)
    gap = modality_gap(clip, held.images, [m["caption"] for m in held.meta],
                       [f"{m['colour']} {m['shape']}" for m in held.meta])
    return {"zero_shot": accuracy, "modality_gap": gap, "probe_images": len(held.meta)}


# ------------------------------------------------------------------------------------------ embed
def clip_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What determines the embeddings: architecture, weights digest and preprocessing; nothing else."""
    import open_clip

    from clipgen.clip import register_toy_clip

    register_toy_clip()
    model, pretrained = cfg.clip.model, cfg.clip.pretrained
    identity: dict[str, Any] = {"model": model, "arch": open_clip.get_model_config(model)}
    if model == "toy-clip":
        return identity  # its weights are the pretrain-clip artifact, whose id is an input
    identity["weights"] = weights_identity(pretrained)  # a file or folder's digest, a tag, or None (seeded init)
    if pretrained and not Path(pretrained).exists():
        identity["tag"] = open_clip.get_pretrained_cfg(model, pretrained)
    return identity


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_clip(cfg: PipelineConfig, artifacts: dict[str, Artifact], device: str | None = None):
    """The run's CLIP: the pretrain-clip artifact for the toy CLIP, else ``clip.pretrained``."""
    from clipgen.clip import load_clip

    return load_clip(cfg.clip.model, clip_weights(cfg, artifacts), device=device or default_device())


def clip_weights(cfg: PipelineConfig, artifacts: dict[str, Artifact]) -> str | None:
    return str(artifacts["toyclip"].path) if "toyclip" in artifacts else cfg.clip.pretrained


def embed_config(cfg: PipelineConfig) -> dict[str, Any]:
    config = {"clip": clip_identity(cfg), "index": cfg.clip.index, "ivfpq_min_size": cfg.clip.ivfpq_min_size}
    if cfg.clip.decoder != "opencv":  # a GPU's JPEG decoder may differ from libjpeg-turbo in the last bit
        config["decoder"] = cfg.clip.decoder
    return config


class ShardGroup(NamedTuple):
    """Consecutive shard jobs embedded by one :func:`clipgen.embed.embed_shards` call (one pipeline)."""

    jobs: list[ShardJob]

    @property
    def label(self) -> str:  # the Prefect task-run name
        first, last = self.jobs[0], self.jobs[-1]
        return first.label if len(self.jobs) == 1 else f"{first.label} .. {last.out.parent.name}/{last.shard.name}"


def group_jobs(jobs: list[ShardJob], per_group: int = SHARDS_PER_TASK) -> list[ShardGroup]:
    return [ShardGroup(jobs[i:i + per_group]) for i in range(0, len(jobs), per_group)]


@functools.lru_cache(maxsize=1)
def process_clip(model: str, weights: str | None):
    """This process's copy of a CLIP: a Dask worker loads it once for all its tasks, threads share one."""
    from clipgen.clip import load_clip

    return load_clip(model, weights, device=default_device())


class EmbedShards(NamedTuple):
    """The embed task: names of the model, not the model, so a task runner ships a few bytes per task."""

    model: str
    weights: str | None
    batch_size: int
    decoder: str

    def __call__(self, group: ShardGroup) -> dict[str, Any]:
        count = skipped = 0
        clip = process_clip(self.model, self.weights)
        for result in embed_shards(clip, [(job.shard, job.out) for job in group.jobs], self.batch_size,
                                   decoder=self.decoder):
            write_json_atomic(Path(result.path).with_suffix(".skipped.json"), result.skipped_keys)
            count, skipped = count + result.count, skipped + len(result.skipped_keys)
        return {"count": count, "skipped": skipped}


def build_embeddings(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    embed = EmbedShards(cfg.clip.model, clip_weights(cfg, inputs), cfg.clip.batch_size, cfg.clip.decoder)
    shards = inputs["shards"].path
    jobs = pending_shard_jobs("embed", shards, EMBED_SPLITS, out)
    map_fn(embed, group_jobs(reuse_other_shards_work(jobs, out, shards, sidecars=(".skipped.json",))))
    train = read_embeddings(cache_files(out, "train"))
    save_index(build_index(train.vectors, cfg.clip.index, cfg.clip.ivfpq_min_size), train.keys, out)
    skipped = sum(len(json.loads(p.read_text())) for p in out.glob("*/*.skipped.json"))
    counts = {split: sum(pq.ParquetFile(p).metadata.num_rows for p in cache_files(out, split))
              for split in EMBED_SPLITS}
    embed_dim = process_clip(embed.model, embed.weights).embed_dim
    process_clip.cache_clear()  # the model is not needed by the stages that follow
    return {"counts": counts, "skipped": skipped, "embed_dim": embed_dim, "index_size": len(train.keys)}

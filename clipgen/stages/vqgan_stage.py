"""The ``train-vqgan`` and ``tokenize`` stages: fit the VQ tokenizer on the train split, then encode every
train/heldout shard into the token cache (one mapped task per shard; finished shards are reused)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

from clipgen.artifacts import Artifact, weights_identity
from clipgen.config import PipelineConfig, to_dict
from clipgen.data.shards import shard_paths
from clipgen.stages import ShardJob, pending_shard_jobs

TOKEN_SPLITS = ("train", "heldout")


def vqgan_config(cfg: PipelineConfig) -> dict[str, Any]:
    train = to_dict(cfg.train, output_only=True)
    vqgan = {**to_dict(cfg.vqgan), "lpips_weights": weights_identity(cfg.vqgan.lpips_weights)}
    return {"vqgan": vqgan, "image_size": cfg.data.image_size, "train": train}


def build_vqgan(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.data.images_array import load_split_images, open_images
    from clipgen.train.vqgan_trainer import fit

    shards, size = inputs["shards"].path, cfg.data.image_size
    held = load_split_images(shards, "heldout", size)
    result = fit(cfg.vqgan, cfg.train, open_images(shards, "train", size, workers=cfg.data.workers), out,
                 heldout=held.images, cpu_threads=cfg.train.cpu_threads)
    return dict(result.summary)


def tokens_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"splits": list(TOKEN_SPLITS)}  # everything else is in the vqgan and shards ids


@functools.lru_cache(maxsize=1)
def process_vqgan(weights: str):
    """This process's copy of the VQGAN: a Dask worker loads it once for all its tasks, threads share one."""
    from clipgen.models.vqgan import load_vqgan

    return load_vqgan(Path(weights))


class TokenizeShard(NamedTuple):
    """The tokenize task: the VQGAN's folder, not the model, so a task runner ships a few bytes per task."""

    weights: str

    def __call__(self, job: ShardJob) -> int:
        from clipgen.tokenize import tokenize_shard

        return tokenize_shard(process_vqgan(self.weights), job.shard, job.out).count


def build_tokens(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.tokenize import tokenize_shards

    shards, weights = inputs["shards"].path, str(inputs["vqgan"].path)
    map_fn(TokenizeShard(weights), pending_shard_jobs("tokenize", shards, TOKEN_SPLITS, out))
    model = process_vqgan(weights)
    process_vqgan.cache_clear()
    all_shards = [p for split in TOKEN_SPLITS for p in shard_paths(shards, split)]
    results = tokenize_shards(model, all_shards, out)  # all files exist now: this only reads their counts
    counts = {split: sum(r.count for r in results if Path(r.path).parent.name == split) for split in TOKEN_SPLITS}
    return {"counts": counts, "skipped": sum(len(r.skipped_keys) for r in results),
            "grid_size": model.grid_size, "codebook_size": model.codebook_size}

"""The ``train-vqgan`` and ``tokenize`` stages: fit the VQ tokenizer on the train split, then encode every
train/heldout shard into the token cache (one mapped task per shard; finished shards are reused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipgen.artifacts import Artifact
from clipgen.config import PipelineConfig, to_dict
from clipgen.stages import pending_shard_jobs
from clipgen.stages.ingest import load_judge_if_any

TOKEN_SPLITS = ("train", "heldout")


def vqgan_config(cfg: PipelineConfig) -> dict[str, Any]:
    train = to_dict(cfg.train, output_only=True)
    return {"vqgan": to_dict(cfg.vqgan), "image_size": cfg.data.image_size, "train": train}


def build_vqgan(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.data.images_array import load_split_images, open_images
    from clipgen.train.vqgan import fit

    shards, size = inputs["shards"].path, cfg.data.image_size
    held = load_split_images(shards, "heldout", size)
    result = fit(cfg.vqgan, cfg.train, open_images(shards, "train", size, workers=cfg.data.workers), out,
                 heldout=held.images, cpu_threads=cfg.train.cpu_threads)
    summary = dict(result.summary)
    judge = load_judge_if_any(cfg)
    if judge is not None:
        summary["judge_agreement"] = reconstruction_agreement(result.model, judge, held.images)
    return summary


def reconstruction_agreement(model, judge, images: np.ndarray) -> dict[str, float]:
    """How often the judge reads the same attribute in the reconstruction as in the original, per attribute and
    for shape and colour together (``both``)."""
    import torch

    from clipgen.data.images_array import to_model_input, to_uint8

    agree = {name: 0 for name in (*judge.labels, "both")}
    with torch.no_grad():
        for start in range(0, len(images), 256):
            batch = images[start:start + 256]
            recon = to_uint8(model.decode_indices(model.encode(to_model_input(torch.from_numpy(batch))))).numpy()
            before, after = judge.predict_ids(batch), judge.predict_ids(recon)
            same = {name: before[name] == after[name] for name in judge.labels}
            for name, hit in same.items():
                agree[name] += int(hit.sum())
            agree["both"] += int((same["shape"] & same["colour"]).sum())
    n = max(1, len(images))
    return {**{name: count / n for name, count in agree.items()}, "images": len(images)}


def tokens_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"splits": list(TOKEN_SPLITS)}  # everything else is in the vqgan and shards ids


def build_tokens(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.data.shards import shard_paths
    from clipgen.models.vqgan import load_vqgan
    from clipgen.tokenize import tokenize_shard, tokenize_shards

    model = load_vqgan(inputs["vqgan"].path)
    shards = inputs["shards"].path
    map_fn(lambda job: tokenize_shard(model, job.shard, job.out).count,
           pending_shard_jobs("tokenize", shards, TOKEN_SPLITS, out))
    all_shards = [p for split in TOKEN_SPLITS for p in shard_paths(shards, split)]
    results = tokenize_shards(model, all_shards, out)  # all files exist now: this only reads their counts
    counts = {split: sum(r.count for r in results if Path(r.path).parent.name == split) for split in TOKEN_SPLITS}
    return {"counts": counts, "skipped": sum(len(r.skipped_keys) for r in results),
            "grid_size": model.grid_size, "codebook_size": model.codebook_size}

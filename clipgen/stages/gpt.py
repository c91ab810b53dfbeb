"""The ``train-gpt`` stage: fit the conditional transformer on (image embedding, token grid) pairs.

It reads the embedding and token caches only, joined by key; the VQGAN and the CLIP are loaded only for
the optional embedding-consistency loss. On the shapes world the stage also measures image-conditioned
generation: condition on held-out images' CLIP image embeddings, sample, decode, and let the judge say
whether each sample kept its conditioning image's shape and colour.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipgen.artifacts import Artifact
from clipgen.config import PipelineConfig, to_dict
from clipgen.stages.embed import default_device, run_clip

CONDITIONED_SAMPLES = 500  # held-out images the image-conditioned accuracy is measured on


def gpt_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"gpt": to_dict(cfg.gpt), "train": to_dict(cfg.train, output_only=True)}


def load_split_pairs(embeddings: Path, tokens: Path, split: str):
    """The (embedding, tokens) pairs of one split, joined by key, plus the join's counts."""
    from clipgen.embed import cache_files, read_embeddings
    from clipgen.tokenize import read_tokens
    from clipgen.train.gpt import join_by_key

    emb = read_embeddings(cache_files(embeddings, split))
    tok = read_tokens(cache_files(tokens, split))
    return join_by_key(emb.keys, emb.vectors, tok.keys, tok.tokens)


def build_gpt(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.models.vqgan import load_vqgan
    from clipgen.train.gpt import Consistency, fit

    train, counts = load_split_pairs(inputs["embeddings"].path, inputs["tokens"].path, "train")
    heldout, _ = load_split_pairs(inputs["embeddings"].path, inputs["tokens"].path, "heldout")
    device = default_device()
    vqgan = load_vqgan(inputs["vqgan"].path, device=device).requires_grad_(False)
    consistency = None
    if cfg.gpt.consistency_weight > 0:
        consistency = Consistency(vqgan, run_clip(cfg, inputs, device))
    result = fit(cfg.gpt, cfg.train, train, out, vocab_size=vqgan.codebook_size, heldout=heldout,
                 consistency=consistency)
    summary = {**result.summary, "data": counts}
    judge = load_judge_if_any(cfg)
    if judge is not None:
        summary["image_conditioned"] = image_conditioned_accuracy(
            result.model, vqgan, judge, heldout, heldout_labels(inputs, cfg), cfg)
    return summary


def load_judge_if_any(cfg: PipelineConfig):
    """The shapes world's judge, when this run has one built; else None."""
    from clipgen.judge import load_judge
    from clipgen.pipeline import plan

    if cfg.data.source != "world":
        return None
    judge = plan(cfg)["judge"]  # a reading for the report, not an input: its id stays out of ours
    return load_judge(judge.path) if judge.is_complete() else None


def heldout_labels(inputs: dict[str, Artifact], cfg: PipelineConfig) -> dict[str, tuple[str, str]]:
    """key -> (shape, colour) of the held-out world images, from the shards' attribute metadata.

    Only this measurement reads them (never captions); training above saw the caches alone.
    """
    import json

    from clipgen.data.shards import iter_shard, shard_paths
    from clipgen.pipeline import plan

    labels = {}
    for shard in shard_paths(plan(cfg)["shards"].path, "heldout"):
        for key, parts in iter_shard(shard, exts=("json",)):
            meta = json.loads(parts["json"]) if "json" in parts else {}
            if "shape" in meta and "colour" in meta:
                labels[key] = (meta["shape"], meta["colour"])
    return labels


def image_conditioned_accuracy(model, vqgan, judge, heldout, labels: dict[str, tuple[str, str]],
                               cfg: PipelineConfig, n: int = CONDITIONED_SAMPLES) -> dict[str, Any]:
    """Sample once per held-out image embedding; how often the judge sees the image's shape and colour."""
    from clipgen.data.images_array import to_uint8
    from clipgen.sample import Sampling, sample_tokens

    rows = [i for i, k in enumerate(heldout.keys) if k in labels][:n]
    if not rows:
        return {"images": 0}
    device = next(model.parameters()).device
    sampling = Sampling(temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                        cfg_scale=cfg.sample.cfg_scale)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    side = vqgan.grid_size
    shapes, colours = [], []
    for start in range(0, len(rows), 250):
        cond = heldout.cond[rows[start:start + 250]].to(device)
        tokens = sample_tokens(model, cond, sampling, generator)
        with torch.no_grad():
            images = to_uint8(vqgan.decode_indices(tokens.view(len(cond), side, side))).numpy()
        verdict = judge.predict(images)
        shapes += verdict.shapes
        colours += verdict.colours
    truth = [labels[heldout.keys[i]] for i in rows]
    shape_ok = np.array([s == t[0] for s, t in zip(shapes, truth, strict=True)])
    colour_ok = np.array([c == t[1] for c, t in zip(colours, truth, strict=True)])
    return {"images": len(rows), "shape": float(shape_ok.mean()), "colour": float(colour_ok.mean()),
            "both": float((shape_ok & colour_ok).mean()), "sampling": dataclasses.asdict(sampling)}

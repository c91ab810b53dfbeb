"""The ``generate`` stage and the models behind ``clipgen generate``: load a finished run, sample prompts.

On the shapes world every image gets the judge's verdict, and the stage reports

* *prompt accuracy*: the fraction of images whose judged shape and colour are the ones the prompt
  names, separately for combinations seen as training images and for those held out of them;
* *image-conditioned accuracy*: conditioned on held-out images' CLIP image embeddings instead of text,
  how often a sample keeps its conditioning image's shape and colour.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clipgen.artifacts import Artifact
from clipgen.config import PipelineConfig, SampleConfig, to_dict
from clipgen.data.shards import iter_shard, shard_paths
from clipgen.embed import cache_files, read_embeddings
from clipgen.generate import Generator, draw, generate, judged_per_prompt, write_outputs
from clipgen.index import load_index
from clipgen.judge import accuracy_of, prompt_hits
from clipgen.models.gpt import load_gpt
from clipgen.models.vqgan import load_vqgan
from clipgen.stages.clip_stage import default_device, run_clip
from clipgen.stages.ingest_stage import load_judge_if_any

if TYPE_CHECKING:
    from clipgen.embed import Embeddings

CONDITIONED_SAMPLES = 500  # held-out images the image-conditioned accuracy is measured on


def generate_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"sample": to_dict(cfg.sample)}


def load_generator(cfg: PipelineConfig, artifacts: dict[str, Artifact], device: str | None = None):
    """The run's CLIP, VQGAN, transformer, faiss index and (shapes world) judge from ``artifacts`` (a step's
    inputs, or :func:`clipgen.pipeline.plan`); each must be built."""
    for name in ("embeddings", "vqgan", "gpt"):
        if not artifacts[name].is_complete():
            raise FileNotFoundError(f"the run in {cfg.run_path} has no finished {name!r} step "
                                    f"({artifacts[name].path}); run `clipgen run` with the same config first")
    device = device or default_device()
    clip = run_clip(cfg, artifacts, device)
    embeddings = artifacts["embeddings"].path
    index = load_index(embeddings, gpu=torch.device(device).type == "cuda")
    vectors = read_embeddings(cache_files(embeddings, "train")).vectors
    if len(vectors) != index.index.ntotal:
        raise ValueError(f"{embeddings}: the index holds {index.index.ntotal} vectors, the cache {len(vectors)}")
    return Generator(clip=clip, vqgan=load_vqgan(artifacts["vqgan"].path, device), gpt=load_gpt(artifacts["gpt"].path, device),
                     noise_level=cfg.gpt.noise_level if cfg.gpt.bridge == "noise" else 0.0, index=index,
                     index_vectors=vectors, judge=load_judge_if_any(artifacts))


def prompt_accuracy(gen, prompts: list[str], s: SampleConfig, held_out_combos: list[str]) -> dict[str, Any]:
    """Generate ``s.n_per_prompt`` images per prompt and judge them: shape and colour together (``accuracy``),
    for combinations seen as training images and held out of them, each other attribute over the prompts that
    name it, and per prompt."""
    result = generate(gen, prompts, s)
    if result.verdict is None:
        raise ValueError("prompt accuracy needs the shapes world's judge")
    hits = prompt_hits(result.prompts, result.verdict)
    held = {c.lower() for c in held_out_combos}
    is_held = np.array([any(c in p.lower() for c in held) for p in result.prompts])
    return {"accuracy": accuracy_of(hits["both"]), "seen": accuracy_of(hits["both"][~is_held]),
            "held_out": accuracy_of(hits["both"][is_held]),
            "attributes": {name: accuracy_of(h) for name, h in hits.items() if name != "both"},
            "clip_score": float(result.clip_scores.mean()), "per_prompt": judged_per_prompt(result),
            "images": len(result.prompts), "result": result}


def heldout_labels(shards: Path) -> dict[str, tuple[str, str]]:
    """key -> (shape, colour) of the held-out world images, from the shards' attribute metadata.

    Only this measurement reads them (never captions); training saw the caches alone.
    """


    labels = {}
    for shard in shard_paths(shards, "heldout"):
        for key, parts in iter_shard(shard, exts=("json",)):
            meta = json.loads(parts["json"]) if "json" in parts else {}
            if "shape" in meta and "colour" in meta:
                labels[key] = (meta["shape"], meta["colour"])
    return labels


def image_conditioned_accuracy(gen, heldout: Embeddings, labels: dict[str, tuple[str, str]], cfg: PipelineConfig,
                               n: int = CONDITIONED_SAMPLES) -> dict[str, Any]:
    """One image per held-out image embedding (the run's sample.* settings, its re-ranking against the
    conditioning embedding included); how often the judge sees that image's shape and colour."""
    rows = [i for i, k in enumerate(heldout.keys) if k in labels][:n]
    if not rows:
        return {"images": 0}
    device = next(gen.gpt.parameters()).device
    settings = dataclasses.replace(cfg.sample, n_per_prompt=1)
    cond = torch.from_numpy(heldout.vectors[rows]).to(device).repeat_interleave(max(1, settings.rerank_candidates), 0)
    images, _, _ = draw(gen, cond, cond, settings)
    verdict = gen.judge.predict(images)
    truth = [labels[heldout.keys[i]] for i in rows]
    shape_ok = np.array([s == t[0] for s, t in zip(verdict.shapes, truth, strict=True)])
    colour_ok = np.array([c == t[1] for c, t in zip(verdict.colours, truth, strict=True)])
    sampling = {k: getattr(settings, k) for k in ("temperature", "top_k", "top_p", "cfg_scale", "rerank_candidates")}
    return {"images": len(rows), "shape": float(shape_ok.mean()), "colour": float(colour_ok.mean()),
            "both": float((shape_ok & colour_ok).mean()), "sampling": sampling}


def build_generate(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    if not cfg.sample.prompts:
        raise ValueError("sample.prompts is empty: the generate stage needs the prompt set to draw")
    gen = load_generator(cfg, inputs)
    if gen.judge is None:
        write_outputs(generate(gen, cfg.sample.prompts, cfg.sample), out)
        return {"images": len(cfg.sample.prompts) * cfg.sample.n_per_prompt}
    scores = prompt_accuracy(gen, cfg.sample.prompts, cfg.sample, cfg.data.world.held_out_combos)
    write_outputs(scores.pop("result"), out)
    heldout = read_embeddings(cache_files(inputs["embeddings"].path, "heldout"))
    scores["image_conditioned"] = image_conditioned_accuracy(gen, heldout, heldout_labels(inputs["shards"].path), cfg)
    return scores

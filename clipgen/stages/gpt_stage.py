"""The ``train-gpt`` stage: fit the conditional transformer on (image embedding, token grid) pairs.

Training reads the embedding and token caches only, joined by key; the VQGAN and the CLIP come in only
for the optional embedding-consistency loss. How well the model generates is measured by the ``generate``
stage, whose id includes the sampling settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipgen.artifacts import Artifact
from clipgen.config import PipelineConfig, to_dict
from clipgen.embed import cache_files, read_embeddings
from clipgen.models.vqgan import load_vqgan
from clipgen.stages.clip_stage import default_device, run_clip
from clipgen.tokenize import read_tokens
from clipgen.train.gpt_trainer import Consistency, fit, join_by_key


def gpt_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"gpt": to_dict(cfg.gpt), "train": to_dict(cfg.train, output_only=True)}


def load_split_pairs(embeddings: Path, tokens: Path, split: str):
    """The (embedding, tokens) pairs of one split, joined by key, plus the join's counts."""
    emb = read_embeddings(cache_files(embeddings, split))
    tok = read_tokens(cache_files(tokens, split))
    return join_by_key(emb.keys, emb.vectors, tok.keys, tok.tokens)


def build_gpt(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    train, counts = load_split_pairs(inputs["embeddings"].path, inputs["tokens"].path, "train")
    heldout, _ = load_split_pairs(inputs["embeddings"].path, inputs["tokens"].path, "heldout")
    device = default_device()
    vqgan = load_vqgan(inputs["vqgan"].path, device=device).requires_grad_(False)
    consistency = None
    if cfg.gpt.consistency_weight > 0:
        consistency = Consistency(vqgan, run_clip(cfg, inputs, device))
    result = fit(cfg.gpt, cfg.train, train, out, vocab_size=vqgan.codebook_size, heldout=heldout,
                 consistency=consistency, cpu_threads=cfg.train.cpu_threads)
    return {**result.summary, "data": counts}

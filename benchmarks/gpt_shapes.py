"""The transformer shapes the benchmarks build for each gpt preset: the preset's width and depth
(:mod:`clipgen.presets`) plus the data it is meant for. ``tiny`` is the shapes world (8x8 grid of 1000 FSQ
codes, 128-d toy-CLIP embeddings); ``mid``, ``base`` and ``paper`` are real-image scale (16x16 grid of an
f16 VQGAN's 16384 codes, 512-d ViT-B-32 embeddings)."""

from __future__ import annotations

from clipgen.models.gpt import GPT, GPTShape
from clipgen.presets import PRESETS, preset_names

DATA = {  # preset -> (grid side, vocabulary, embedding size)
    "tiny": (8, 1000, 128),
    "mid": (16, 16384, 512),
    "base": (16, 16384, 512),
    "paper": (16, 16384, 512),
}


def gpt_shape(preset: str) -> GPTShape:
    if preset not in DATA:
        raise SystemExit(f"unknown gpt preset {preset!r}; choose from {preset_names('gpt')}")
    side, vocab, dim = DATA[preset]
    dims = {k: v for k, v in PRESETS["gpt"][preset].items() if k in ("n_layer", "n_head", "n_embd", "n_prefix")}
    return GPTShape(vocab_size=vocab, n_tokens=side * side, cond_dim=dim, **dims)


def decode_step_parameters(model: GPT) -> int:
    """Weights a single-token step reads: every block, the final norm and the output head (the condition's
    projections run once per image, and the token embedding reads one row per image)."""
    parts = [*model.blocks, model.ln_f, model.head]
    return sum(p.numel() for part in parts for p in part.parameters())

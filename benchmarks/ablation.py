"""Ablation of the generator's training and sampling changes on the shapes world: one row per change.

Each variant is a list of config overrides on top of a pipeline (``pipelines/shapes.yaml`` by default). The
script builds, for each variant in turn, only what the overrides change (through the run's content-addressed
caches: the shards, CLIP, VQGAN and caches are shared) up to the evaluation report, and prints one JSON row
per variant with the report's headline: FD over its real floor in the run's CLIP space and in the judge's
feature space, precision and recall, judge accuracy per attribute, and the seconds the transformer trained
and the report took. Every variant uses the same seeds. The last line holds all rows.

    python benchmarks/ablation.py [--pipeline pipelines/shapes.yaml] [--variants FILE.json] [--only 1,3]

A variants file is a JSON list of ``{"name": ..., "overrides": ["gpt.noise_level=0.5", ...]}``; without
one the built-in list below runs, from the old defaults to the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clipgen.config import load_config
from clipgen.pipeline import plan, run_step

# From main's defaults before the distribution work, one change at a time, to the shipped defaults.
BEFORE = ["gpt.noise_level=0.2", "gpt.weight_average=0", "sample.bridge=none", "sample.cfg_scale=2.0",
          "sample.rerank_candidates=4", "sample.rerank_against=prompt", "sample.knn_spread=0.225",
          "sample.knn_temperature=0.05", "sample.rerank_prompt_weight=1"]
STEPS = [
    ("before: train noise 0.2, no inference bridge, guidance 2, CLIP-best of 4 against the prompt", []),
    ("train noise 0.6 (training conditions as far from the image as a text is)", ["gpt.noise_level=0.6"]),
    ("kNN bridge: each draw's variation from a train image near the prompt", ["sample.bridge=knn"]),
    ("re-ranking against each draw's own condition", ["sample.rerank_against=condition"]),
    ("8 candidates per image", ["sample.rerank_candidates=8"]),
    ("re-ranking against the prompt and the condition together (keeps held-out combinations)",
     ["sample.rerank_against=both"]),
    ("sharper neighbour weights (temperature 0.025) and milder guidance (1.75)",
     ["sample.knn_temperature=0.025", "sample.cfg_scale=1.75"]),
    ("the prompt weighed 0.75 beside the condition in re-ranking", ["sample.rerank_prompt_weight=0.75"]),
    ("re-ranking: the prompt gates (within cosine 0.08 of the best match), the condition chooses (shipped)",
     ["sample.rerank_against=prompt_then_condition", "sample.rerank_prompt_margin=0.08"]),
]

def cumulative(start: list[str], steps: list[tuple[str, list[str]]]) -> list[dict]:
    """One variant per step, each holding its own overrides on top of all the steps before it."""
    variants, overrides = [], list(start)
    for name, change in steps:
        keys = {c.split("=")[0] for c in change}
        overrides = [o for o in overrides if o.split("=")[0] not in keys] + change
        variants.append({"name": name, "overrides": overrides})
    return variants


VARIANTS = cumulative(BEFORE, STEPS)
VARIANTS += cumulative(VARIANTS[1]["overrides"], [  # measured beside the shipped path, not taken
    ("not shipped: train noise 0.6 with a weight average (EMA 0.998)", ["gpt.weight_average=0.998"])])
VARIANTS += [{"name": name, "overrides": VARIANTS[7]["overrides"] + change} for name, change in [  # on row 8's path
    ("not shipped: 2-D rotary positions in attention (LlamaGen-style RoPE) on the shipped path", ["gpt.rope_2d=true"]),
    ("not shipped: 2-D rotary positions, 1000 transformer steps", ["gpt.rope_2d=true", "gpt.steps=1000"])]]
HEADLINE = ("fd_over_floor", "fd_judge_over_floor", "precision", "recall", "judge_seen", "judge_held_out",
            "judge_shape", "judge_colour", "judge_size", "judge_background", "clip_score")


def run_variant(pipeline: str, name: str, overrides: list[str]) -> dict:
    cfg = load_config(pipeline, overrides)
    start = time.perf_counter()
    for step in ("shards", "judge", "toyclip", "embeddings", "vqgan", "tokens", "gpt", "report"):
        run_step(cfg, step)  # cached steps return at once
    artifacts = plan(cfg)
    metrics = json.loads((artifacts["report"].path / "metrics.json").read_text())
    gpt = artifacts["gpt"].summary()
    head = metrics["headline"]
    return {"name": name, "overrides": overrides, **{k: round(head[k], 4) for k in HEADLINE if head.get(k) is not None},
            "fd": round(head["fd_samples"], 4), "fd_judge": round(head["fd_judge_samples"], 4),
            "gpt_train_seconds": gpt.get("train_seconds"), "wall_seconds": round(time.perf_counter() - start, 1),
            "report": str(artifacts["report"].path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="pipelines/shapes.yaml")
    parser.add_argument("--variants", type=Path, help="a JSON list of {name, overrides}; default: the built-in list")
    parser.add_argument("--only", help="comma-separated variant numbers to run, from 1, e.g. 1,3")
    args = parser.parse_args()
    variants = json.loads(args.variants.read_text()) if args.variants else VARIANTS
    if args.only:
        variants = [variants[int(i) - 1] for i in args.only.split(",")]
    rows = []
    for variant in variants:
        rows.append(run_variant(args.pipeline, variant["name"], variant["overrides"]))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "ablation", "pipeline": args.pipeline, "rows": rows}))


if __name__ == "__main__":
    main()

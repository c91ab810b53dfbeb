"""Sweep of the sampling settings on a finished shapes run: prompt accuracy for each combination.

For every combination of inference bridge (none / noise / knn), guidance scale and re-ranking, draw
``--n`` images for each of the 24 colour-shape prompts and let the judge score them: the fraction whose
judged shape and colour are the prompt's, over the combinations seen as training images and over the
held-out ones. The defaults in ``pipelines/shapes.yaml`` are the best row. Prints one JSON line per
setting and a final summary line.

    python benchmarks/prompt_sweep.py --run runs/shapes [--n 16] [--scales 1,2,3] [--rerank 0,4] [--set k=v]

An ablation's transformer is named by the same overrides it was trained with, e.g. after
``clipgen run pipelines/shapes.yaml --stages train-gpt --set gpt.steps=1000 --set gpt.bridge=none``:
``python benchmarks/prompt_sweep.py --run pipelines/shapes.yaml --set gpt.steps=1000 --set gpt.bridge=none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from clipgen.cli import load_run_config
from clipgen.data.world import COLOUR_NAMES, SHAPES
from clipgen.stages.generate import load_generator, prompt_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/shapes", help="a finished shapes run folder or pipeline YAML")
    parser.add_argument("--n", type=int, default=16, help="images per prompt")
    parser.add_argument("--bridges", default="none,noise,knn")
    parser.add_argument("--scales", default="1,2,3")
    parser.add_argument("--rerank", default="0,4")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides naming which transformer to sweep, e.g. --set gpt.steps=1000")
    args = parser.parse_args()
    cfg = load_run_config(args.run, args.overrides)
    gen = load_generator(cfg)
    prompts = [f"a {colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES]
    rows = []
    for bridge in args.bridges.split(","):
        for scale in (float(v) for v in args.scales.split(",")):
            for rerank in (int(v) for v in args.rerank.split(",")):
                s = dataclasses.replace(cfg.sample, bridge=bridge, cfg_scale=scale, rerank_candidates=rerank,
                                        n_per_prompt=args.n)
                start = time.perf_counter()
                scores = prompt_accuracy(gen, prompts, s, cfg.data.world.held_out_combos)
                row = {"bridge": bridge, "cfg_scale": scale, "rerank": rerank, "seen": round(scores["seen"], 3),
                       "held_out": round(scores["held_out"], 3), "clip_score": round(scores["clip_score"], 2),
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    best = max(rows, key=lambda r: (r["seen"] + r["held_out"], r["seen"]))
    print(json.dumps({"benchmark": "prompt_sweep", "images_per_prompt": args.n, "prompts": len(prompts),
                      "best": best, "rows": rows}))


if __name__ == "__main__":
    main()

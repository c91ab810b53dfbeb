"""How much the judge's held-out accuracy moves with the sampling seed alone, on one finished shapes run.

For each seed, draw ``eval.held_out_images_per_prompt`` images of every held-out colour-shape combination with
the run's sampling settings (what the report scores) and judge them. Prints one JSON line per seed and a summary
with the mean, the spread over seeds and the binomial standard error of one seed's figure. Comparing two runs
(``--set run_dir=...``) tells a model's difference from the noise of its measurement.

    python benchmarks/held_out_spread.py --run pipelines/shapes.yaml --seeds 0,1,2,3,4 [--set k=v] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch
from run_info import Report

from clipgen.cli import load_run_config
from clipgen.generate import generate
from clipgen.pipeline import plan
from clipgen.stages.clip_stage import default_device
from clipgen.stages.evaluate_stage import ImageSet, judged, text_group, world_prompt
from clipgen.stages.generate_stage import load_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="pipelines/shapes.yaml", help="a finished shapes run folder or pipeline YAML")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", help="also write the report here (JSON)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_run_config(args.run, args.overrides)
    combos = cfg.data.world.held_out_combos
    prompts = [world_prompt(*combo.split()) for combo in combos]
    per_prompt = cfg.eval.held_out_images_per_prompt
    artifacts = plan(cfg)
    gen = load_generator(cfg, artifacts)
    report = Report("held_out_spread", torch.device(default_device()),
                    {"run": str(cfg.run_path), "ids": {k: artifacts[k].id for k in ("gpt", "vqgan", "judge")},
                     "prompts": prompts, "images_per_prompt": per_prompt,
                     "sample": {k: v for k, v in dataclasses.asdict(cfg.sample).items() if k not in ("prompts", "seed")}},
                    args.out)
    accuracies = []
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        settings = dataclasses.replace(cfg.sample, n_per_prompt=per_prompt, seed=seed)
        drawn = generate(gen, prompts, settings)
        found = judged(gen.judge, ImageSet("held-out", drawn.images, drawn.prompts,
                                           [text_group(p, True) for p in drawn.prompts]), combos)
        accuracies.append(found["held_out"])
        row = {"seed": seed, "held_out": found["held_out"], "shape": found["shape"], "colour": found["colour"],
               "images": found["held_out_images"], "seconds": round(time.perf_counter() - start, 1)}
        report.add(row)
        print(row, flush=True)
    n = len(prompts) * per_prompt
    mean = float(np.mean(accuracies))
    report.body["summary"] = {"mean": mean, "std_over_seeds": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1
                              else None, "min": min(accuracies), "max": max(accuracies),
                              "binomial_se_of_one_seed": math.sqrt(mean * (1 - mean) / n)}
    report.save()
    print(report.body["summary"])


if __name__ == "__main__":
    main()

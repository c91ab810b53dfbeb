"""Sweep of the sampling settings on a finished shapes run, scored on distribution and accuracy together.

For every combination of inference bridge (none / noise / knn, the last at each ``--spreads`` and
``--shrinks``), guidance scale, re-ranking and what re-ranking compares with (the prompt, or each draw's own
condition), draw the evaluation's images and measure FD over its real floor in two feature spaces (the run's
CLIP, which re-ranking optimises, and the judge's, which nothing optimises), precision and recall, and the
judge's accuracy per attribute (:mod:`clipgen.sweep`). ``--vary FIELD=V1,V2`` crosses every setting with more
values of any other ``sample`` field. The chosen setting is the one closest to the real
distribution among those that hold the accuracy floor; the defaults in ``pipelines/shapes.yaml`` are it.
Prints one JSON line per setting and a final summary line.

    python benchmarks/prompt_sweep.py --run runs/shapes [--scales 1,1.5,2] [--rerank 0,4] [--spreads 0.3,0.5]
        [--shrinks 0,20] [--rerank-against prompt,condition,both,prompt_then_condition] [--prompt-weights 0.25,1]
        [--prompt-margins 0.04,0.08] [--vary knn_centre_margin=0,0.1 ...] [--set k=v]

An ablation's transformer is named by the same overrides it was trained with, e.g. after
``clipgen run pipelines/shapes.yaml --stages train-gpt --set gpt.noise_level=0.5``:
``python benchmarks/prompt_sweep.py --run pipelines/shapes.yaml --set gpt.noise_level=0.5``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import torch
from run_info import Report

from clipgen.cli import load_run_config
from clipgen.stages.clip_stage import default_device
from clipgen.sweep import ACCURACY_FLOOR, choose_setting, distance, score_setting, sweep_context


def settings(cfg, args) -> list[dict]:
    """The sampling settings to score, as SampleConfig fields."""
    out = []
    for bridge in args.bridges.split(","):
        if bridge == "noise" and cfg.gpt.bridge != "noise":
            continue  # the noise bridge reuses the transformer's training noise, and it was trained without
        spreads = [float(v) for v in args.spreads.split(",")] if bridge == "knn" else [cfg.sample.knn_spread]
        shrinks = [float(v) for v in args.shrinks.split(",")] if bridge == "knn" and args.shrinks \
            else [cfg.sample.knn_shrink]
        for spread, shrink, scale, rerank in itertools.product(spreads, shrinks,
                                                               (float(v) for v in args.scales.split(",")),
                                                               (int(v) for v in args.rerank.split(","))):
            varied = rerank > 1 and bridge != "none"  # without a bridge the condition is the prompt
            for against in args.rerank_against.split(",") if varied else ["prompt"]:
                weights = args.prompt_weights.split(",") if against == "both" and args.prompt_weights \
                    else [cfg.sample.rerank_prompt_weight]
                margins = args.prompt_margins.split(",") if against == "prompt_then_condition" and \
                    args.prompt_margins else [cfg.sample.rerank_prompt_margin]
                out.extend({"bridge": bridge, "knn_spread": spread, "knn_shrink": shrink, "cfg_scale": scale,
                            "rerank_candidates": rerank, "rerank_against": against, "rerank_prompt_weight": float(w),
                            "rerank_prompt_margin": float(m)} for w in weights for m in margins)
    return [setting | dict(varied) for setting in out for varied in itertools.product(*extra_values(cfg, args))]


def extra_values(cfg, args) -> list[list[tuple[str, object]]]:
    """``--vary FIELD=V1,V2``: for each field, its ``(field, value)`` pairs, typed as the run's own value."""
    extra = []
    for spec in args.vary:
        name, _, values = spec.partition("=")
        if not hasattr(cfg.sample, name) or not values:
            raise SystemExit(f"--vary {spec!r}: give a sample field and its values, e.g. knn_centre_margin=0,0.1")
        kind = type(getattr(cfg.sample, name))
        extra.append([(name, kind(v)) for v in values.split(",")])
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/shapes", help="a finished shapes run folder or pipeline YAML")
    parser.add_argument("--bridges", default="none,noise,knn")
    parser.add_argument("--scales", default="1,1.5,2")
    parser.add_argument("--rerank", default="0,4")
    parser.add_argument("--spreads", default="0.5", help="sample.knn_spread values for the knn bridge")
    parser.add_argument("--shrinks", default="", help="sample.knn_shrink values for the knn bridge; default: the run's")
    parser.add_argument("--rerank-against", default="prompt,condition")
    parser.add_argument("--prompt-margins", default="", help="sample.rerank_prompt_margin values for re-ranking "
                        "prompt_then_condition (default: the run's own)")
    parser.add_argument("--prompt-weights", default="", help="sample.rerank_prompt_weight values for re-ranking "
                        "against both; default: the run's")
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                        help="more values of any sample field, crossed with every setting (repeatable)")
    parser.add_argument("--out", help="also write the report here (JSON, rewritten after each setting)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides naming which transformer to sweep, e.g. --set gpt.steps=1000")
    args = parser.parse_args()
    cfg = load_run_config(args.run, args.overrides)
    ctx = sweep_context(cfg)
    report = Report("prompt_sweep", torch.device(default_device()),
                    {"command": " ".join(["python", *sys.argv]), "images_per_prompt": cfg.eval.images_per_prompt,
                     "floor": {k: round(v, 4) for k, v in ctx.floor.items()}, "accuracy_floor": ACCURACY_FLOOR},
                    args.out)
    for setting in settings(cfg, args):
        s = dataclasses.replace(cfg.sample, **setting)
        row = {**setting, **score_setting(ctx, s)}
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        row["distance"] = round(distance(row), 3)
        report.add(row)
        print(json.dumps(row), flush=True)
    report.body["chosen"] = choose_setting(report.body["results"])
    report.save()
    report.print()


if __name__ == "__main__":
    main()

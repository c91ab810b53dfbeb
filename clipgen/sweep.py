"""Sampling-settings sweep on a finished shapes-world run: each setting scored on distribution and accuracy.

For every combination of inference bridge, guidance scale and re-ranking, :func:`score_setting` draws the
evaluation's images (``eval.images_per_prompt`` per colour-shape prompt, and as many per prompt that also
names a size and a background) and measures what the report measures: FD, precision and recall against the
held-out images in the run's CLIP space and in the judge's feature space, and the judge's accuracy on every
attribute the prompts name. :func:`choose_setting` then picks the setting whose samples sit closest to the
real distribution (FD over its real floor, averaged over the two spaces) among those that hold the accuracy
floor; settings are never ranked on accuracy alone, which favours one confident picture per prompt.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import numpy as np

from clipgen.config import PipelineConfig, SampleConfig
from clipgen.generate import generate
from clipgen.pipeline import plan
from clipgen.stages.clip_stage import read_labeled_split
from clipgen.stages.evaluate_stage import (
    ImageSet,
    attribute_prompts,
    eval_prompts,
    fidelity_rows,
    judged,
    text_group,
)
from clipgen.stages.generate_stage import load_generator

# The accuracy a setting must hold to be chosen (issue 27's bars for the shipped defaults).
ACCURACY_FLOOR = {"seen": 0.95, "held_out": 0.85, "size": 0.80, "background": 0.80}


class SweepContext(NamedTuple):
    """What every setting is scored against, loaded once."""

    cfg: PipelineConfig
    gen: Any  # clipgen.generate.Generator (with the judge)
    ids: dict[str, str]  # artifact ids: the fidelity caches are named by them
    reference: np.ndarray  # uint8 held-out real images
    floor: dict[str, float]  # the real-images row: train images against the reference


def sweep_context(cfg: PipelineConfig) -> SweepContext:
    artifacts = plan(cfg)
    gen = load_generator(cfg, artifacts)
    if gen.judge is None:
        raise ValueError("the sampling sweep needs the shapes world's judge (data.source: world)")
    shards, size = artifacts["shards"].path, cfg.data.image_size
    reference = read_labeled_split(shards, "heldout", size, limit=cfg.eval.max_reference_images).images
    n = 24 * cfg.eval.images_per_prompt  # as many train images as one setting's samples
    train = read_labeled_split(shards, "train", size, limit=n).images
    ids = {name: a.id for name, a in artifacts.items()}
    floor, _ = fidelity_rows(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_weights=None)),
                             gen, [ImageSet("real images", train, [], [])], train, reference, ids)
    return SweepContext(cfg, gen, ids, reference, floor["real images"])


def score_setting(ctx: SweepContext, s: SampleConfig) -> dict[str, Any]:
    """One setting's distribution and accuracy figures (see the module doc)."""
    cfg, start = ctx.cfg, time.perf_counter()
    s = dataclasses.replace(s, n_per_prompt=cfg.eval.images_per_prompt)
    plain = generate(ctx.gen, eval_prompts(cfg, []), s)
    named = generate(ctx.gen, attribute_prompts(), s)
    sets = [ImageSet(name, r.images, r.prompts, [text_group(p, True) for p in r.prompts])
            for name, r in (("samples", plain), ("attribute prompts", named))]
    no_inception = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, inception_weights=None))
    fidelity, _ = fidelity_rows(no_inception, ctx.gen, sets[:1], ctx.reference, ctx.reference, ctx.ids)
    held = cfg.data.world.held_out_combos
    plain_judged, named_judged = judged(ctx.gen.judge, sets[0], held), judged(ctx.gen.judge, sets[1], held)
    f = fidelity["samples"]
    return {"fd": f["fd"], "fd_judge": f["fd_judge"],
            "fd_over_floor": f["fd"] / ctx.floor["fd"], "fd_judge_over_floor": f["fd_judge"] / ctx.floor["fd_judge"],
            "precision": f["precision"], "recall": f["recall"],
            "precision_judge": f["precision_judge"], "recall_judge": f["recall_judge"],
            "seen": plain_judged["seen"], "held_out": plain_judged["held_out"],
            "shape": plain_judged["shape"], "colour": plain_judged["colour"],
            "size": named_judged["size"], "background": named_judged["background"],
            "sizes_drawn": plain_judged["mix"]["size"], "backgrounds_drawn": plain_judged["mix"]["background"],
            "clip_score": float(plain.clip_scores.mean()), "seconds": round(time.perf_counter() - start, 1)}


def holds_floor(row: dict[str, Any], floor: dict[str, float] = ACCURACY_FLOOR) -> bool:
    return all(row.get(k) is not None and row[k] >= v for k, v in floor.items())


def distance(row: dict[str, Any]) -> float:
    """How far a setting's samples sit from the real distribution: FD over the real floor, averaged over the
    run's CLIP space (which re-ranking optimises) and the judge's (which nothing optimises)."""
    return (row["fd_over_floor"] + row["fd_judge_over_floor"]) / 2


def choose_setting(rows: list[dict[str, Any]], floor: dict[str, float] = ACCURACY_FLOOR) -> dict[str, Any] | None:
    """The row with the smallest :func:`distance` among those that hold ``floor``; None if none does."""
    eligible = [r for r in rows if holds_floor(r, floor)]
    return min(eligible, key=distance) if eligible else None

"""The parent ``clip-gen`` flow: chains every stage flow in order (``prefect deployment run clip-gen/full``). On a
CPU host the independent chains between the shards and the transformer run side by side, one task each, every
chain in a process of its own (:mod:`clipgen.side_by_side`)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from clipgen.pipeline import parse_stages, save_run_config
from clipgen.preflight import check_inputs
from clipgen.side_by_side import plan_phases, run_side_by_side, stage_of
from flows.common import load, prefect_map, with_task_runner
from flows.embed import embed
from flows.evaluate import evaluate
from flows.generate import generate
from flows.ingest import ingest
from flows.pretrain_clip import pretrain_clip
from flows.tokenize import tokenize
from flows.train_gpt import train_gpt
from flows.train_vqgan import train_vqgan

STAGE_FLOWS = {"ingest": ingest, "pretrain-clip": pretrain_clip, "embed": embed, "train-vqgan": train_vqgan,
               "tokenize": tokenize, "train-gpt": train_gpt,
               "generate": generate, "evaluate": evaluate}


@flow(name="clip-gen")
def clip_gen(pipeline: str = "pipelines/shapes.yaml", overrides: list[str] | None = None,
             stages: str | None = None) -> dict[str, dict]:
    """Run ``stages`` (comma-separated; default all) of ``pipeline`` with dotted ``overrides``."""
    cfg = load(pipeline, overrides)  # validates every value before any work starts
    stage_names = parse_stages(stages)
    check_inputs(cfg, stage_names)  # and what the config points at: data, weights files, GPUs
    save_run_config(cfg)
    logger = get_run_logger()
    results: dict[str, dict] = {}
    for phase in plan_phases(cfg, stage_names):
        if len(phase) == 1:
            steps = list(phase[0].steps)
            stage = stage_of(steps[0])
            logger.info("stage %s", stage)
            found = with_task_runner(STAGE_FLOWS[stage], cfg)(pipeline, overrides, steps)
        else:
            logger.info("side by side: %s", " | ".join(chain.label for chain in phase))
            found = run_side_by_side(cfg, phase, map_fn=prefect_map)
        for step, result in found.items():
            results.setdefault(stage_of(step), {})[step] = result
    return {stage: results[stage] for stage in stage_names if stage in results}  # in pipeline order

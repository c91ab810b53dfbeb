"""The stage graph: which artifact each pipeline step writes, what it depends on, and how to build it.

This is library code (no Prefect). Each *step* writes one content-addressed artifact
(:mod:`clipgen.artifacts`); a user-facing *stage* (``ingest``, ``embed``, ...) runs one or more steps.
A step's id hashes its output-affecting config section, its inputs' ids and its code version, so a
changed config reruns that step and everything downstream of it, and nothing upstream.
Flows (``flows/``) call :func:`run_step`; ``clipgen status`` calls :func:`plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipgen.artifacts import Artifact, run_cached, stage_id, write_text_atomic
from clipgen.config import ConfigError, PipelineConfig, config_yaml
from clipgen.data.shard_parts import SHARD_CODE_VERSION
from clipgen.data.shards import damaged_shards
from clipgen.fanout import MapFn, serial_map
from clipgen.host_memory import keep_freed_memory
from clipgen.stages import (
    clip_stage,
    damaged_parquet,
    evaluate_stage,
    generate_stage,
    gpt_stage,
    ingest_stage,
    vqgan_stage,
    write_recipe,
)
from clipgen.train.launch import launch_step, wants_torchrun

# User-facing stages in pipeline order. Stages of later issues join this list as they land.
STAGES: tuple[str, ...] = ("ingest", "pretrain-clip", "embed", "train-vqgan", "tokenize", "train-gpt", "generate",
                           "evaluate")

@dataclass(frozen=True)
class Step:
    name: str
    stage: str  # the user-facing stage that runs this step
    kind: str  # artifact folder under the run dir
    inputs: tuple[str, ...]  # steps whose artifacts this one reads (those that don't apply are dropped)
    code_version: str  # bump when the step's output changes for the same config
    config: Callable[[PipelineConfig], dict[str, Any]]  # the output-affecting config
    build: Callable[[PipelineConfig, dict[str, Artifact], Path, MapFn], dict[str, Any]]
    applies: Callable[[PipelineConfig], bool] = lambda cfg: True
    distributed: bool = False  # trains with DDP: train.devices/nodes > 1 launch it under torchrun
    damaged: Callable[[Path], list[tuple[Path, str]]] | None = None  # files of a finished artifact gone bad


STEPS: tuple[Step, ...] = (
    Step("shards", "ingest", "shards", (), SHARD_CODE_VERSION, ingest_stage.shards_config, ingest_stage.build_shards,
         damaged=damaged_shards),
    Step("judge", "ingest", "judge", (), "2", ingest_stage.judge_config, ingest_stage.build_judge,
         applies=lambda cfg: cfg.data.source == "world"),
    Step("toyclip", "pretrain-clip", "ckpt/clip", ("shards",), "1", clip_stage.toyclip_config,
         clip_stage.build_toyclip, applies=lambda cfg: cfg.clip.model == "toy-clip"),
    Step("embeddings", "embed", "cache/clip", ("shards", "toyclip"), "1", clip_stage.embed_config,
         clip_stage.build_embeddings, damaged=damaged_parquet),
    Step("vqgan", "train-vqgan", "ckpt/vqgan", ("shards",), "2", vqgan_stage.vqgan_config,
         vqgan_stage.build_vqgan, distributed=True),
    Step("tokens", "tokenize", "cache/tokens", ("shards", "vqgan"), "1", vqgan_stage.tokens_config,
         vqgan_stage.build_tokens, damaged=damaged_parquet),
    # the VQGAN and CLIP are inputs for loading only (the consistency loss, the sample check): the caches'
    # ids already cover them
    Step("gpt", "train-gpt", "ckpt/gpt", ("embeddings", "tokens", "vqgan", "toyclip"), "2",
         gpt_stage.gpt_config, gpt_stage.build_gpt, distributed=True),
    # the shards' held-out labels and the judge score the image-conditioned draws (shapes world)
    Step("samples", "generate", "samples", ("gpt", "vqgan", "embeddings", "toyclip", "shards", "judge"), "3",
         generate_stage.generate_config, generate_stage.build_generate),
    # the shards and judge ids cover the held-out reference set and the scorer
    Step("report", "evaluate", "report", ("gpt", "vqgan", "embeddings", "toyclip", "shards", "judge"), "8",
         evaluate_stage.evaluate_config, evaluate_stage.build_report),
)
STEPS_BY_NAME = {s.name: s for s in STEPS}


def steps_of(stage: str, cfg: PipelineConfig) -> list[Step]:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose from {list(STAGES)}")
    return [s for s in STEPS if s.stage == stage and s.applies(cfg)]


def parse_stages(text: str | None) -> list[str]:
    """``"ingest,embed"`` -> validated list in pipeline order; None or "" -> every stage."""
    if not text:
        return list(STAGES)
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return [s for s in STAGES if s in asked]


def plan(cfg: PipelineConfig) -> dict[str, Artifact]:
    """Every applicable step's artifact (id and path), computed without running anything."""
    artifacts: dict[str, Artifact] = {}
    for step in STEPS:
        if not step.applies(cfg):
            continue
        input_ids = [artifacts[name].id for name in step.inputs if name in artifacts]
        sid = stage_id(step.name, step.config(cfg), input_ids, step.code_version)
        artifacts[step.name] = Artifact(cfg.run_path, step.kind, sid)
    return artifacts


def run_step(cfg: PipelineConfig, name: str, map_fn: MapFn = serial_map) -> dict[str, Any]:
    """Build one step's artifact unless it is already complete. Its inputs must be complete."""
    step = STEPS_BY_NAME[name]
    artifacts = plan(cfg)
    inputs = {n: artifacts[n] for n in step.inputs if n in artifacts}
    for n, art in inputs.items():
        if not art.is_complete():
            raise RuntimeError(
                f"step {name!r} needs the {n!r} artifact {art.path}, which is not built; "
                f"run the {STEPS_BY_NAME[n].stage!r} stage first (or run without --stages)")
    artifact = artifacts[name]
    recipe = {"step": name, "config": step.config(cfg), "inputs": {n: a.id for n, a in inputs.items()},
              "code_version": step.code_version}

    def build(out: Path) -> dict[str, Any]:
        keep_freed_memory()  # CPU steps reuse their freed tensors' pages instead of faulting them in again
        write_recipe(out, recipe)  # what the id hashes, readable: lets a later artifact reuse per-shard work
        if step.distributed and wants_torchrun(cfg):  # every rank builds the step under torchrun
            return launch_step(cfg, name, out)
        return step.build(cfg, inputs, out, map_fn)

    summary = run_cached(artifact, build, stage=name, wait=cfg.orchestration.wait_for_locks, damaged=step.damaged)
    return {"step": name, "id": artifact.id, "path": str(artifact.path), **summary}


def needs_build(step: Step, art: Artifact) -> bool:
    """Whether running ``step`` would build: its artifact is missing, unfinished, or has damaged files. Only reads."""
    return not art.is_complete() or (step.damaged is not None and bool(step.damaged(art.path)))


def cached_results(cfg: PipelineConfig, stages: Iterable[str]) -> dict[str, dict[str, dict]] | None:
    """What running ``stages`` would report when every one of their steps is built and undamaged (each
    ``cached``, as :func:`run_step` reports a reused step), or None when any step has work to do. Only reads:
    a damaged file is left for the run to repair."""
    artifacts = plan(cfg)
    results: dict[str, dict[str, dict]] = {}
    for stage in stages:
        results[stage] = {}
        for step in steps_of(stage, cfg):
            art = artifacts[step.name]
            if needs_build(step, art):
                return None
            results[stage][step.name] = {"step": step.name, "id": art.id, "path": str(art.path), **art.summary(),
                                         "cached": True}
    return results


def save_run_config(cfg: PipelineConfig) -> Path:
    """Write the resolved config to ``<run_dir>/pipeline.yaml`` so a run folder describes itself."""
    path = cfg.run_path / "pipeline.yaml"
    write_text_atomic(path, config_yaml(cfg))
    return path

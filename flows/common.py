"""Shared flow plumbing: load the pipeline config and run library steps as Prefect tasks.

Flows stay thin: they pass only a pipeline path, override strings and small result dicts around.
"""

from __future__ import annotations

from prefect import get_run_logger, task

from clipgen.config import PipelineConfig, load_config
from clipgen.pipeline import run_step, steps_of


def load(pipeline: str, overrides: list[str] | None) -> PipelineConfig:
    return load_config(pipeline, overrides or [])


@task(task_run_name="{name}")
def step_task(cfg: PipelineConfig, name: str) -> dict:
    result = run_step(cfg, name)
    verb = "cached, skipped" if result["skipped"] else "built"
    get_run_logger().info("%s %s: %s", name, verb, result["path"])
    return result


def run_stage(cfg: PipelineConfig, stage: str) -> dict[str, dict]:
    """Run every step of ``stage`` in order; returns {step name: result}."""
    return {step.name: step_task(cfg, step.name) for step in steps_of(stage, cfg)}

"""Shared flow plumbing: load the pipeline config, run library steps, fan parts out as Prefect tasks.

Flows stay thin: they pass only a pipeline path, override strings and small result dicts around.
A step that works shard by shard receives :func:`prefect_map`, so its parts run on the flow's task
runner (threads by default) and show up as task runs in the Prefect UI.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from clipgen.config import PipelineConfig, load_config
from clipgen.pipeline import run_step, steps_of


def load(pipeline: str, overrides: list[str] | None) -> PipelineConfig:
    return load_config(pipeline, overrides or [])


@task(cache_policy=NO_CACHE, task_run_name="{label}")
def run_part(fn, item, label: str):
    return fn(item)


def prefect_map(fn, items) -> list:
    futures = [run_part.submit(fn, item, label=str(getattr(item, "label", item))) for item in items]
    return [f.result() for f in futures]


def with_task_runner(stage_flow, cfg: PipelineConfig):
    """The stage flow with the configured task runner for its shard-parallel parts: threads, or Dask
    (``orchestration.dask_address``, or a local cluster of ``max_workers`` single-threaded processes)."""
    o = cfg.orchestration
    if o.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return stage_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=o.max_workers))
    import dask
    from prefect_dask import DaskTaskRunner

    # non-daemonic workers may start DataLoader worker processes of their own
    dask.config.set({"distributed.worker.daemon": False})
    if o.dask_address:
        return stage_flow.with_options(task_runner=DaskTaskRunner(address=o.dask_address))
    cluster = {"n_workers": o.max_workers, "threads_per_worker": 1, "dashboard_address": None}
    return stage_flow.with_options(task_runner=DaskTaskRunner(cluster_kwargs=cluster))


def run_stage(cfg: PipelineConfig, stage: str, steps: list[str] | None = None) -> dict[str, dict]:
    """Run the steps of ``stage`` in order (those named in ``steps``, or all); returns {step name: result}."""
    logger = get_run_logger()
    results = {}
    for step in steps_of(stage, cfg):
        if steps is not None and step.name not in steps:
            continue
        result = run_step(cfg, step.name, map_fn=prefect_map)
        logger.info("%s %s: %s", step.name, "cached, skipped" if result["cached"] else "built", result["path"])
        results[step.name] = result
    return results

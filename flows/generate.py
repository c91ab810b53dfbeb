"""The ``generate`` stage flow (see clipgen.stages.generate_stage)."""

from __future__ import annotations

from prefect import flow

from flows.common import load, run_stage


@flow(name="generate")
def generate(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    return run_stage(load(pipeline, overrides), "generate", steps)

"""The ``train-vqgan`` stage flow (see clipgen.stages.vqgan_stage)."""

from __future__ import annotations

from prefect import flow

from flows.common import load, run_stage


@flow(name="train-vqgan")
def train_vqgan(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    return run_stage(load(pipeline, overrides), "train-vqgan", steps)

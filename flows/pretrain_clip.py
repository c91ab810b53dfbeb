"""The ``pretrain-clip`` stage flow: contrastive pretraining of the toy CLIP (toy-CLIP pipelines only)."""

from __future__ import annotations

from prefect import flow

from flows.common import load, run_stage


@flow(name="pretrain-clip")
def pretrain_clip(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    return run_stage(load(pipeline, overrides), "pretrain-clip", steps)

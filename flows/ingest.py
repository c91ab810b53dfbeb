"""The ``ingest`` stage flow: source images -> WebDataset shards (+ the shapes-world judge)."""

from __future__ import annotations

from prefect import flow

from flows.common import load, run_stage


@flow(name="ingest")
def ingest(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    return run_stage(load(pipeline, overrides), "ingest", steps)

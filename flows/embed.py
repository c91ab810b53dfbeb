"""The ``embed`` stage flow: CLIP image embeddings per shard (one mapped task each) + the faiss index."""

from __future__ import annotations

from prefect import flow

from flows.common import load, run_stage


@flow(name="embed")
def embed(pipeline: str, overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, dict]:
    return run_stage(load(pipeline, overrides), "embed", steps)

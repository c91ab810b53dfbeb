"""The ``ingest`` stage: source images -> WebDataset shards, and (shapes world only) the attribute judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipgen.artifacts import Artifact, content_digest, listing_digest
from clipgen.config import PipelineConfig, to_dict
from clipgen.data.ingest import ingest_folder, ingest_urls
from clipgen.data.world import ingest_world


def shards_config(cfg: PipelineConfig) -> dict[str, Any]:
    data = to_dict(cfg.data, output_only=True)
    data.pop("judge")
    if cfg.data.source != "world":
        data.pop("world")
        path = Path(cfg.data.path or "")
        if cfg.data.path and path.exists():  # what the source holds now, not only where it is
            data["content"] = listing_digest(path) if cfg.data.source == "folder" else content_digest(path)
    return data


def build_shards(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    """One shard per task on the task runner (:mod:`clipgen.data.shard_parts`), whatever the source."""
    if cfg.data.source == "world":
        manifest = ingest_world(cfg.data, out, map_fn)
    elif cfg.data.source == "folder":
        manifest = ingest_folder(cfg.data, out, map_fn)
    else:
        manifest = ingest_urls(cfg.data, out, map_fn)
    return {"counts": manifest["counts"], "skipped_by_reason": manifest["skipped_by_reason"],
            "notes": manifest.get("notes", {}), "inputs": manifest["inputs"]}


def judge_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"image_size": cfg.data.image_size, "world": to_dict(cfg.data.world), "judge": to_dict(cfg.data.judge)}


def build_judge(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    from clipgen.judge import train_judge

    return train_judge(cfg.data, out)


def load_judge_if_any(artifacts: dict[str, Artifact]):
    """The shapes world's judge, when the step's declared inputs include one that is built; else None."""
    from clipgen.judge import load_judge

    judge = artifacts.get("judge")
    return load_judge(judge.path) if judge is not None and judge.is_complete() else None

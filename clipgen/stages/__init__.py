"""Step builders: each turns a pipeline config and its input artifacts into one output artifact.

:mod:`clipgen.pipeline` holds the graph (which step reads what); these modules hold the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from clipgen.data.shards import shard_paths


class ShardJob(NamedTuple):
    """One shard's share of a per-shard step: read ``shard``, write ``out`` (a Parquet cache file)."""

    verb: str
    shard: Path
    out: Path

    @property
    def label(self) -> str:  # the Prefect task-run name
        return f"{self.verb} {self.out.parent.name}/{self.shard.name}"


def pending_shard_jobs(verb: str, shard_root: Path, splits: tuple[str, ...], out: Path) -> list[ShardJob]:
    """The jobs whose output file is missing: finished files (written atomically) survive a kill."""
    jobs = [ShardJob(verb, shard, out / split / f"{shard.stem}.parquet")
            for split in splits for shard in shard_paths(shard_root, split)]
    return [job for job in jobs if not job.out.is_file()]

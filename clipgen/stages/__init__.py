"""Step builders: each turns a pipeline config and its input artifacts into one output artifact.

:mod:`clipgen.pipeline` holds the graph (which step reads what); these modules hold the work.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from clipgen.data.shards import shard_paths

log = logging.getLogger("clipgen")


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
    return [job for job in jobs if not job.out.is_file() or parquet_problem(job.out, remove=True)]


def parquet_problem(path: Path, remove: bool = False) -> str | None:
    """Why a Parquet file cannot be trusted (its footer does not read), else None. With ``remove`` a damaged
    file is deleted, with a warning that names it, so that it is rebuilt."""
    try:
        pq.read_metadata(path)
        return None
    except (OSError, pa.ArrowException) as exc:
        problem = f"damaged Parquet file: {exc}"
    if remove:
        log.warning("%s: %s; rebuilding it", path, problem)
        path.unlink(missing_ok=True)
    return problem


def damaged_parquet(out: Path) -> list[tuple[Path, str]]:
    """The Parquet files of a per-shard cache artifact whose footers do not read."""
    found = ((path, parquet_problem(path)) for path in sorted(out.glob("*/*.parquet")))
    return [(path, problem) for path, problem in found if problem]

"""Step builders: each turns a pipeline config and its input artifacts into one output artifact.

:mod:`clipgen.pipeline` holds the graph (which step reads what); these modules hold the work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from clipgen.artifacts import link_or_copy, read_json_or_none, write_json_atomic
from clipgen.data.shards import read_manifest, shard_paths

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


RECIPE = "recipe.json"  # in every artifact: its step, config, input ids by name and code version


def write_recipe(out: Path, recipe: dict[str, Any]) -> None:
    write_json_atomic(out / RECIPE, json.loads(json.dumps(recipe, sort_keys=True, default=str)))


def _shard_digests(shard_root: Path) -> dict[str, str]:
    """``split/NNNNN`` -> sha256 of each shard in an ingest artifact's manifest (empty if it has none)."""
    try:
        manifest = read_manifest(shard_root)
    except (OSError, ValueError):
        return {}
    return {info["shard"].removesuffix(".tar"): info["sha256"] for infos in manifest["shards"].values()
            for info in infos}


def _same_but_shards(recipe: dict, other: dict | None) -> bool:
    """Whether ``other`` is ``recipe`` with (perhaps) other shards: the same step, config, code and other inputs."""
    if other is None or "shards" not in other.get("inputs", {}):
        return False
    return {**other, "inputs": {**other["inputs"], "shards": None}} == \
        {**recipe, "inputs": {**recipe["inputs"], "shards": None}}


def reuse_other_shards_work(jobs: list[ShardJob], out: Path, shard_root: Path,
                            sidecars: tuple[str, ...] = ()) -> list[ShardJob]:
    """Link each job's output (and its ``sidecars``, suffixes such as ``.skipped.json``) from another artifact
    of this kind that the same recipe built from other shards, where one of those shards has the same
    sha256 as the job's; return the jobs still to do. A folder that gained or lost a few files keeps most of
    its shards byte for byte (:mod:`clipgen.data.shard_parts`), so only the changed ones are worked again."""
    own = read_json_or_none(out / RECIPE)
    if not jobs or own is None or "shards" not in own["inputs"]:
        return jobs
    ours = _shard_digests(shard_root)
    names = {job: f"{job.out.parent.name}/{job.shard.stem}" for job in jobs}  # e.g. train/00003
    waiting = {ours[name]: job for job, name in names.items() if name in ours}
    reused = []
    for other in sorted(p for p in out.parent.iterdir() if p.is_dir() and p != out):
        recipe = read_json_or_none(other / RECIPE)
        if not waiting or not _same_but_shards(own, recipe):
            continue
        for name, digest in _shard_digests(shard_root.parent / recipe["inputs"]["shards"]).items():
            source = other / f"{name}.parquet"
            if digest not in waiting or not source.is_file() or parquet_problem(source):
                continue
            job = waiting.pop(digest)
            for suffix in sidecars:  # before the Parquet file, whose presence marks the job done
                if source.with_suffix(suffix).is_file():
                    link_or_copy(source.with_suffix(suffix), job.out.with_suffix(suffix))
            link_or_copy(source, job.out)
            reused.append(job)
    if reused:
        log.info("%s: reused %d of %d shards' files from artifacts built from the same shards", jobs[0].verb,
                 len(reused), len(jobs))
    return [job for job in jobs if job not in reused]


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

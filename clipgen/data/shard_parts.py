"""Ingest one shard per task: a plan for each shard, a record beside each finished one, the manifest from them.

Every ingest source (the shapes world, an image folder, a downloaded URL list) cuts its inputs into
:class:`ShardPlan` s fixed by the inputs alone: the world by index ranges, a folder or URL list by ranges of
its inputs' hashed keys (:func:`plans_by_key_range`). So shard ``train/00003.tar`` holds the same inputs
whichever task, worker or run writes it, and the plans can be mapped on the task runner (threads or Dask)
like the embed and tokenize jobs.

A task writes its tar atomically, then ``NNNNN.part.json``: the shard's size and digest, the inputs it
skipped and why, and a digest of the plan's inputs. A rerun after a kill keeps every shard whose record
matches its plan and its tar's size, and writes only the rest; the manifest is assembled from the records.
A plan whose inputs were all skipped leaves a record and no tar, so shard numbers can have gaps. A changed
image folder is a new artifact, and it links every shard whose inputs (names, sizes, modification times) and
settings are unchanged from the run's other shard artifacts (:func:`reuse_finished`): only the shards that
hold added, removed or edited files are decoded again.

The work inside a task (rendering, decoding) goes to one pool of ``data.workers`` processes that the threads
of the default task runner share (:func:`worker_pool`); on Dask each worker process works in place, as the
cluster's workers are the processes.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from clipgen.artifacts import link_or_copy, read_json_or_none, write_json_atomic
from clipgen.data.shards import Sample, ShardInfo, Skipped, write_manifest, write_shard
from clipgen.fanout import MapFn, serial_map

# The shards step's code version (clipgen.pipeline); also in every folder plan's context, so a shard is never
# reused across a change of the code that writes it. 5: folder and URL-list shards by key ranges.
SHARD_CODE_VERSION = "5"


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: ``split/NNNNN.tar`` from ``inputs`` (source-specific, picklable)."""

    split: str
    index: int
    inputs: tuple  # the world: (start, stop) of sample indices; a folder or URL list: its Candidates
    input_names: tuple[str, ...]  # what identifies the inputs (keys, index range, file stamps), for the record
    context: str = ""  # what else the shard's bytes depend on (decoder settings, code version)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.index:05d}"

    @property
    def label(self) -> str:  # the Prefect task-run name
        return f"ingest {self.name}"

    @property
    def inputs_digest(self) -> str:
        text = "\n".join((self.context, *self.input_names))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def plans_by_key_range(split: str, items: list, size: int, key: Callable[[Any], str], name: Callable[[Any], str],
                       context: str = "") -> list[ShardPlan]:
    """Plans that cut ``items`` by ranges of their hex hash ``key``: shard ``i`` of ``n`` holds the keys in the
    ``i``-th ``n``-th of the key space, where ``n`` is the power of two at or above ``len(items) / size`` (so
    about ``size / 2`` to ``size`` items a shard). Adding or removing an item then changes only the shard it
    falls in (until the count crosses a power of two), which lets a changed folder reuse the other shards.
    Empty ranges get no plan, so shard numbers can have gaps."""
    n = 1 << max(0, math.ceil(math.log2(max(1, len(items)) / size)))
    buckets: dict[int, list] = {}
    for item in sorted(items, key=key):
        digits = key(item)
        buckets.setdefault(int(digits, 16) * n >> (4 * len(digits)), []).append(item)
    return [ShardPlan(split, i, tuple(group), tuple(name(x) for x in group), context)
            for i, group in sorted(buckets.items())]


def record_path(root: Path, plan: ShardPlan) -> Path:
    return Path(root) / f"{plan.name}.part.json"


def write_part(root: Path, plan: ShardPlan, samples: Iterable[Sample], skipped: list[Skipped],
               notes: Counter) -> None:
    """Write the plan's shard (none when ``samples`` is empty), then its record. ``samples`` may append to
    ``skipped`` and ``notes`` as it is consumed (a decoder reporting bad inputs)."""
    info = write_shard(samples, Path(root) / f"{plan.name}.tar", plan.name + ".tar")
    record = {"shard": asdict(info) if info else None, "skipped": [asdict(s) for s in skipped],
              "notes": dict(notes), "inputs_digest": plan.inputs_digest}
    write_json_atomic(record_path(root, plan), record)


def finished_record(root: Path, plan: ShardPlan) -> dict | None:
    """The plan's record if its shard is whole (same inputs, tar of the recorded size), else None."""
    record = read_json_or_none(record_path(root, plan))
    if record is None or record.get("inputs_digest") != plan.inputs_digest:
        return None
    shard = record["shard"]
    if shard is not None:
        tar = Path(root) / shard["shard"]
        if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            return None
    return record


def write_plans(root: Path, plans: list[ShardPlan], task: Callable[[ShardPlan], None],
                map_fn: MapFn | None = None, reuse_from: Iterable[Path] = ()) -> list[dict]:
    """Run ``task`` (picklable) on every plan without a finished record, through ``map_fn`` (serial when
    None); return every plan's record, in plan order. A plan that a folder in ``reuse_from`` (another
    artifact's root) holds finished, with the same inputs digest, is linked from there instead."""
    reuse_from = list(reuse_from)
    todo = [plan for plan in plans
            if finished_record(root, plan) is None and not reuse_finished(root, plan, reuse_from)]
    try:
        (map_fn or serial_map)(task, todo)
    finally:
        close_worker_pool()
    records = []
    for plan in plans:
        record = finished_record(root, plan)
        if record is None:
            raise RuntimeError(f"ingest task for {plan.name} finished without writing its shard record")
        records.append(record)
    return records


def reuse_finished(root: Path, plan: ShardPlan, sources: Iterable[Path]) -> bool:
    """Hard-link (or copy) the plan's finished shard and its record from the first of ``sources`` that has
    them; False when none has. The tar lands before the record, so a kill between them leaves no record."""
    for source in sources:
        record = finished_record(source, plan)
        if record is None:
            continue
        if record["shard"] is not None:
            tar = record["shard"]["shard"]  # e.g. train/00003.tar, the same path in both roots
            link_or_copy(Path(source) / tar, Path(root) / tar)
        write_json_atomic(record_path(root, plan), record)
        return True
    return False


def manifest_from_records(root: Path, source: str, splits: Iterable[str], plans: list[ShardPlan],
                          records: list[dict], skipped: list[Skipped]) -> dict:
    """Write the manifest of every split from the shard records, plus ``skipped`` (inputs dropped before
    any plan: unreadable files, failed downloads); skipped inputs are listed sorted."""
    shards: dict[str, list[ShardInfo]] = {split: [] for split in splits}
    notes: Counter = Counter()
    skipped = list(skipped)
    for plan, record in zip(plans, records, strict=True):
        if record["shard"] is not None:
            shards[plan.split].append(ShardInfo(**record["shard"]))
        skipped += [Skipped(**s) for s in record["skipped"]]
        notes.update(record["notes"])
    skipped.sort(key=lambda s: (s.input, s.reason))
    return write_manifest(root, source, shards, skipped, notes)


_POOLS: dict[int, Executor] = {}
_POOLS_LOCK = threading.Lock()


def worker_pool(workers: int) -> Executor | None:
    """This process's pool of ``workers`` processes for ingest work, shared by its threads until
    :func:`close_worker_pool`; None (work in the caller) for 1 worker, and in a Dask worker, which is
    itself one of the task runner's processes.

    Spawned, not forked: the caller may be a threaded Prefect worker, and forking threads can deadlock.
    """
    if workers <= 1 or _in_dask_worker():
        return None
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        return _POOLS[workers]


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker
    except ImportError:
        return False
    try:
        get_worker()
    except ValueError:
        return False
    return True


def close_worker_pool() -> None:
    with _POOLS_LOCK:
        while _POOLS:
            _POOLS.popitem()[1].shutdown()

"""Ingest an image folder or a URL list into WebDataset shards.

Both sources end in the same place: every input is read as bytes, decoded and resized by
:func:`clipgen.data.images.load_rgb`, and written as ``KEY.jpg`` + ``KEY.json`` to
``root/{train,heldout}/NNNNN.tar`` with a ``manifest.json`` that counts every skipped input by reason and
every odd-but-valid input by note. Keys are hashes of the input's name (relative path or URL), and the
split is a hash of the key. Each split's inputs are cut by ranges of their keys (a fixed pseudo-random order,
so one class folder never fills a shard) into shards of about ``data.shard_size / 2`` to ``data.shard_size``,
written as one task each (:mod:`clipgen.data.shard_parts`): a rerun gives byte-identical shards, a rerun after
a kill keeps the finished ones, and a changed folder decodes only the shards whose files changed. A range
whose inputs are partly skipped gives a shorter shard.

URL lists are downloaded with img2dataset (raw bytes, no re-encoding) in resumable parts
(:mod:`clipgen.data.download`), then go through the same decoder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from clipgen.config import DataConfig
from clipgen.data.download import (
    DownloadedRow,
    download_part,
    import_img2dataset,
    read_download_results,
    split_url_list,
)
from clipgen.data.images import Decoded, decode_source, os_reason
from clipgen.data.shard_parts import (
    SHARD_CODE_VERSION,
    ShardPlan,
    manifest_from_records,
    plans_by_key_range,
    worker_pool,
    write_part,
    write_plans,
)
from clipgen.data.shards import Sample, Skipped
from clipgen.errors import IngestError
from clipgen.fanout import MapFn, serial_map

SPLITS = ("train", "heldout")
URL_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


class Candidate(NamedTuple):
    key: str
    label: str  # what the manifest calls this input: a relative path or a URL
    split: str
    source: tuple[str, int, int]  # (file, byte offset, length or -1): where the worker reads the bytes
    meta: dict[str, Any]  # written into KEY.json beside the decoder's fields
    stamp: str = ""  # a folder file's size and modification time: a shard of unchanged stamps can be reused


# ----------------------------------------------------------------------------------------- shared
def make_key(name: str) -> str:
    """Stable, unique, dot-free sample key for an input name (dots would split WebDataset members)."""
    # surrogateescape: Linux file names need not be valid UTF-8, and such files are still images
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def split_of(key: str, heldout_fraction: float) -> str:
    """'heldout' for a fixed ``heldout_fraction`` of keys, chosen by hash; 'train' for the rest."""
    position = int(hashlib.sha1(key.encode("ascii")).hexdigest(), 16) / float(1 << 160)
    return "heldout" if position < heldout_fraction else "train"


class WriteDecodedShard(NamedTuple):
    """The folder and URL-list ingest task: decode one plan's candidates and write its shard."""

    data: DataConfig
    root: str

    def __call__(self, plan: ShardPlan) -> None:
        data = self.data
        job = partial(decode_source, image_size=data.image_size, max_pixels=data.max_pixels, min_side=data.min_side)
        sources = [c.source for c in plan.inputs]
        pool = worker_pool(data.workers)
        if pool is None:
            results = map(job, sources)
        else:
            results = pool.map(job, sources, chunksize=max(1, min(64, len(sources) // (data.workers * 8))))
        skipped: list[Skipped] = []
        notes: Counter = Counter()
        write_part(Path(self.root), plan, _samples(plan.inputs, results, skipped, notes), skipped, notes)


def write_candidates(candidates: list[Candidate], data: DataConfig, root: Path, source: str,
                     skipped: list[Skipped], map_fn: MapFn | None, reuse_from: Iterable[Path] = ()) -> dict:
    """Decode and shard every candidate, one shard per task through ``map_fn``; write the manifest (with
    ``skipped``, the inputs dropped before decoding) and return it. Finished shards of the same inputs and
    settings are linked from the artifact roots ``reuse_from`` instead. Refuses a dataset with no usable image."""
    context = json.dumps({"code": SHARD_CODE_VERSION, "image_size": data.image_size, "max_pixels": data.max_pixels,
                          "min_side": data.min_side}, sort_keys=True)
    plans = [plan for split in SPLITS
             for plan in plans_by_key_range(split, [c for c in candidates if c.split == split], data.shard_size,
                                            lambda c: c.key, lambda c: f"{c.key} {c.stamp}", context)]
    records = write_plans(root, plans, WriteDecodedShard(data, str(root)), map_fn, reuse_from)
    manifest = manifest_from_records(root, source, SPLITS, plans, records, skipped)
    if manifest["inputs"]["kept"] == 0:
        raise IngestError(f"{source}: no usable image among {manifest['inputs']['skipped']} inputs; skipped by "
                          f"reason: {manifest['skipped_by_reason']}. Fix or replace those inputs (see "
                          f"{root}/manifest.json)")
    return manifest


def _samples(chosen: tuple[Candidate, ...], results: Iterable[Decoded], skipped: list[Skipped],
             notes: Counter) -> Iterator[Sample]:
    for candidate, out in zip(chosen, results, strict=True):
        if out.reason is not None:
            skipped.append(Skipped(candidate.label, out.reason))
            continue
        if out.note:
            notes.update(out.note.split("; "))
        meta = {**candidate.meta, "width": out.width, "height": out.height, "note": out.note}
        yield Sample(candidate.key, out.jpeg, "jpg", meta)


# ----------------------------------------------------------------------------------------- folder
def ingest_folder(data: DataConfig, root: Path, map_fn: MapFn | None = None) -> dict:
    """Shard every image under ``data.path`` (recursively, any format Pillow reads), one shard per task
    through ``map_fn`` (serial when None). Returns the manifest."""
    folder = check_folder(data.path)
    names, skipped = find_files(folder)
    if not names and not skipped:
        raise IngestError(f"data.path {data.path!r} holds no files; put images (any format Pillow reads, "
                          "in any sub-folders) under it, or point data.path at the folder that has them")
    candidates = [_file_candidate(folder, name, data.heldout_fraction) for name in names]
    if len({c.key for c in candidates}) != len(candidates):
        raise IngestError(f"two paths under {data.path!r} hash to the same key; rename one of them")
    parent = Path(root).parent  # the run's shards folder: its other artifacts may hold shards to reuse
    others = sorted(p for p in parent.iterdir() if p.is_dir() and p != Path(root)) if parent.is_dir() else []
    return write_candidates(candidates, data, Path(root), f"folder:{data.path}", skipped, map_fn, others)


def check_source(data: DataConfig) -> None:
    """Fail now, naming data.path, if the folder or URL list cannot be read (world sources need nothing)."""
    if data.source == "folder":
        folder = check_folder(data.path)
        if not os.access(folder, os.R_OK | os.X_OK):
            raise IngestError(f"data.path {data.path!r} cannot be listed (permission denied)")
    elif data.source == "urls":
        check_url_list(data)


def check_folder(path: str | None) -> Path:
    if path is None:
        raise IngestError("data.path is not set; set it to the folder of images (data.source: folder)")
    folder = Path(path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise IngestError(f"data.path {path!r} {what}; set data.path to a folder of images")
    return folder


def find_files(folder: Path) -> tuple[list[str], list[Skipped]]:
    """Sorted POSIX paths (relative to ``folder``) of the files to decode, and inputs skipped on the way."""
    names: list[str] = []
    skipped: list[Skipped] = []

    def relative(path: str) -> str:
        return Path(os.path.relpath(path, folder)).as_posix()

    def on_error(exc: OSError) -> None:  # a sub-folder that cannot be listed
        skipped.append(Skipped(relative(exc.filename or str(folder)), os_reason(exc)))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error, followlinks=False):
        dirnames.sort()  # os.walk descends in this order: sorting makes the walk deterministic
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                # not followed (loops, duplicates), but never silently lost either
                skipped.append(Skipped(relative(os.path.join(dirpath, name)), "symlinked folder not followed"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            problem = _file_problem(path)
            if problem is None:
                names.append(relative(path))
            else:
                skipped.append(Skipped(relative(path), problem))
    return names, skipped


def _file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as a file (stat follows links), or None when it is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return os_reason(exc)
    # FIFOs and devices would block or never end; they are never images.
    return None if stat.S_ISREG(mode) else "not a regular file"


def _file_candidate(folder: Path, name: str, heldout_fraction: float) -> Candidate:
    key = make_key(name)
    split = split_of(key, heldout_fraction)
    try:
        info = os.stat(folder / name)
        stamp = f"{info.st_size}:{info.st_mtime_ns}"
    except OSError:  # gone since the listing: the decoder skips it with its reason, and nothing is reused
        stamp = "unreadable"
    return Candidate(key, name, split, (str(folder / name), 0, -1), {"source_path": name, "split": split}, stamp)


# ------------------------------------------------------------------------------------------- URLs
def ingest_urls(data: DataConfig, root: Path, map_fn: MapFn | None = None) -> dict:
    """Download the URL list ``data.path`` in parts (:mod:`clipgen.data.download`; ``map_fn`` fans them
    out), then shard it, one shard per task. A rerun after a kill downloads only the parts that are not
    finished and writes only the shards that are not."""
    url_list, input_format = check_url_list(data)
    import_img2dataset()  # fail before any work if it is missing
    staging = Path(root) / ".img2dataset"  # inside the artifact, so it shares its disk and its fate
    parts = split_url_list(data, url_list, input_format, staging)
    (map_fn or serial_map)(partial(download_part, data), parts)
    rows, skipped = [], []
    for part in parts:
        part_rows, part_skipped = read_download_results(part.folder)
        rows += part_rows
        skipped += part_skipped
    candidates = _url_candidates(rows, data, skipped)
    manifest = write_candidates(candidates, data, Path(root), f"urls:{data.path}", skipped, map_fn)
    shutil.rmtree(staging)  # the shards hold every kept image; a failed run keeps its parts instead
    return manifest


def check_url_list(data: DataConfig) -> tuple[Path, str]:
    path = Path(data.path or "")
    if data.path is None or not path.is_file():
        raise IngestError(f"data.path {data.path!r} is not a file; set it to a URL list (.csv, .tsv or .parquet)")
    if not os.access(path, os.R_OK):
        raise IngestError(f"data.path {data.path!r} cannot be read (permission denied)")
    input_format = URL_FORMATS.get(path.suffix.lower())
    if input_format is None:
        raise IngestError(f"data.path {data.path!r}: unknown URL list type; use one of {sorted(URL_FORMATS)}")
    columns = _columns(path, input_format)
    for key, column in (("data.url_column", data.url_column), ("data.caption_column", data.caption_column)):
        if column is not None and column not in columns:
            raise IngestError(f"{key} = {column!r} is not a column of {data.path}; its columns are {columns}")
    return path, input_format


def _columns(path: Path, input_format: str) -> list[str]:
    if input_format == "parquet":
        return list(pq.read_schema(path).names)
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f, delimiter="\t" if input_format == "tsv" else ","), [])


def _url_candidates(rows: list[DownloadedRow], data: DataConfig, skipped: list[Skipped]) -> list[Candidate]:
    candidates: dict[str, Candidate] = {}
    for row in sorted(rows, key=lambda r: (r.url, r.caption or "")):  # img2dataset's order is not fixed
        key = make_key(row.url)
        if key in candidates:
            skipped.append(Skipped(row.url, "duplicate url"))
            continue
        split = split_of(key, data.heldout_fraction)
        meta = {"url": row.url, "split": split}
        if data.caption_column is not None:
            meta["caption"] = row.caption  # for evaluation only; the generator never reads captions
        candidates[key] = Candidate(key, row.url, split, row.source, meta)
    return list(candidates.values())

"""WebDataset shards: deterministic tar writing, reading, and the ingest manifest.

A shard is a plain tar of ``KEY.png|jpg`` + ``KEY.json`` members, readable by ``webdataset``. We write
the tars ourselves with fixed headers (mtime 0, uid 0, sorted by arrival) so the same input always
gives byte-identical shards and digests, and each shard appears under its final name only when whole.
"""

from __future__ import annotations

import io
import itertools
import json
import mmap
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq

from clipgen.artifacts import atomic_path, file_digest, write_json_atomic
from clipgen.errors import ClipgenError

IMAGE_EXTS = ("png", "jpg")
T = TypeVar("T")


@dataclass
class Sample:
    key: str  # unique and stable across reruns
    image: bytes  # encoded image bytes
    ext: str  # "png" or "jpg"
    meta: dict[str, Any] = field(default_factory=dict)  # written as KEY.json


@dataclass
class ShardInfo:
    shard: str  # path relative to the shard root, e.g. "train/00000.tar"
    count: int
    bytes: int
    sha256: str


@dataclass
class Skipped:
    input: str
    reason: str


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[Sample], root: Path, split: str, shard_size: int) -> list[ShardInfo]:
    """Write ``samples`` to ``root/split/NNNNN.tar``, ``shard_size`` samples per shard, each atomically."""
    infos: list[ShardInfo] = []
    batch: list[Sample] = []

    def flush() -> None:
        rel = f"{split}/{len(infos):05d}.tar"
        infos.append(write_shard(batch, Path(root) / rel, rel))
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) >= shard_size:
            flush()
    if batch:
        flush()
    return infos


def write_shard(samples: Iterable[Sample], path: Path, name: str) -> ShardInfo | None:
    """Write ``samples`` as one tar at ``path``, atomically; ``name`` is what the manifest calls it.
    Nothing is written, and None returned, when there are no samples."""
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return None
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in itertools.chain([first], samples):
            if s.ext not in IMAGE_EXTS:
                raise ValueError(f"sample {s.key}: image ext must be one of {IMAGE_EXTS}, got {s.ext!r}")
            _add_member(tar, f"{s.key}.{s.ext}", s.image)
            _add_member(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode())
            count += 1
    return ShardInfo(name, count, path.stat().st_size, file_digest(path))


def iter_shard(path: Path, exts: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of one shard, in order.

    ``exts`` limits which members are read (the embed stage asks for image bytes only); a sample with none
    of them still appears, with an empty dict, so the caller can count it.
    """
    for key, readers in iter_shard_readers(path, exts):
        yield key, {ext: read() for ext, read in readers.items()}


def iter_shard_readers(path: Path, exts: Iterable[str] | None = None
                       ) -> Iterator[tuple[str, dict[str, Callable[[], bytes]]]]:
    """:func:`iter_shard` with a function per member that reads its bytes, so that skipping a sample (a
    DataLoader worker passing over other workers' batches) reads nothing but its tar header.

    The functions are made as the samples are reached, not with the shard's index: a whole shard's worth of
    them (thousands of closures living as long as the shard) made the garbage collector sweep the process's
    heap, every object torch and open_clip import, about once every ten shards. That cost ~7 us per 32 px image,
    all of it holding the GIL: a quarter of what loading the image costs.
    """
    wanted = set(exts) if exts is not None else None
    data, members = _tar_index(Path(path))
    current_key, current = None, {}
    for name, start, size in members:
        key, _, ext = name.rpartition("/")[2].partition(".")
        if key != current_key and current_key is not None:
            yield current_key, current
            current = {}
        current_key = key
        if wanted is None or ext in wanted:
            current[ext] = lambda s=start, n=size: data[s:s + n]
    if current_key is not None:
        yield current_key, current


_END_BLOCK = bytes(512)


def _tar_index(path: Path) -> tuple[bytes | mmap.mmap, list[tuple[str, int, int]]]:
    """The tar's bytes and ``(name, offset, size)`` of each regular file in them, in order.

    Plain ustar shards (what :func:`write_shards` and webdataset's writer produce) are indexed from their
    headers directly, which is ~10x cheaper per member than :mod:`tarfile` and matters for 32 px images.
    Anything else (pax or GNU long names, no ustar magic, compression) goes through :mod:`tarfile`. A truncated
    shard raises rather than yielding the samples before the cut as if they were all. The file is mapped,
    not read: a DataLoader worker that decodes one batch in eight then touches only headers and its own
    members (reading whole shards in every worker cost as much as a third of their time on a GPU host).
    Shards are replaced atomically, never rewritten in place, so the mapping stays valid. The index holds
    only strings and ints, which the garbage collector stops tracking (see :func:`iter_shard_readers`).
    """
    if Path(path).stat().st_size < 512:  # no room for a header: an empty file (mmap cannot map one), a cut
        return _tarfile_index(path)  # one (tarfile raises its own error for both) or a small compressed tar
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    members: list[tuple[str, int, int]] = []
    pos = 0
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if header == _END_BLOCK:
            return data, members
        kind = header[156:157]
        if kind not in (b"0", b"\0", b"5") or header[257:263] != b"ustar\0":
            return _tarfile_index(path)
        try:
            size = int(header[124:136].rstrip(b"\0 "), 8)
        except ValueError:  # base-256 sizes (> 8 GiB) or a damaged header
            return _tarfile_index(path)
        if kind != b"5":
            name = header[:100].rstrip(b"\0").decode()
            if header[345]:  # ustar splits long paths into prefix/name
                name = header[345:500].rstrip(b"\0").decode() + "/" + name
            members.append((name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
    if pos != len(data):  # tarfile would stop quietly at a cut header and lose the rest without a word
        raise tarfile.ReadError(f"{path}: truncated shard: its member at byte {pos} runs past the end "
                                f"({len(data)} bytes); re-create or re-download it")
    return data, members  # ends on a member boundary without end-of-archive blocks, which tarfile accepts too


def _tarfile_index(path: Path) -> tuple[bytes, list[tuple[str, int, int]]]:
    """:func:`_tar_index` through :mod:`tarfile`: the regular files' contents, concatenated, and their index."""
    with tarfile.open(path, "r") as tar:
        contents = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    index, start = [], 0
    for name, data in contents:
        index.append((name, start, len(data)))
        start += len(data)
    return b"".join(data for _, data in contents), index


def image_bytes(members: Mapping[str, T]) -> T | None:
    """A sample's encoded image (the first of IMAGE_EXTS it has), or None; given readers, that image's reader."""
    return next((members[e] for e in IMAGE_EXTS if e in members), None)


def read_list_column(paths: list[Path], column: str, dtype) -> tuple[list[str], np.ndarray]:
    """Concatenate ``key`` and a fixed-size-list ``column`` from Parquet cache files -> (keys, [N, L])."""
    keys: list[str] = []
    parts: list[np.ndarray] = []
    for path in paths:
        table = pq.read_table(path)
        length = table.schema.field(column).type.list_size
        keys.extend(table.column("key").to_pylist())
        flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        parts.append(flat.astype(dtype).reshape(-1, length))
    return keys, (np.concatenate(parts) if parts else np.zeros((0, 0), dtype))


def write_manifest(root: Path, source: str, shards: dict[str, list[ShardInfo]], skipped: list[Skipped],
                   notes: dict[str, int] | None = None) -> dict:
    """Write ``root/manifest.json``: per-split shard counts, bytes, digests, every skipped input, and
    ``notes``: counts of odd-but-valid inputs that were kept after a conversion (CMYK, animated, ...)."""
    kept = sum(s.count for infos in shards.values() for s in infos)
    manifest = {
        "source": source,
        "counts": {split: sum(s.count for s in infos) for split, infos in shards.items()},
        "shards": {split: [asdict(s) for s in infos] for split, infos in shards.items()},
        "skipped": [asdict(s) for s in skipped],
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "inputs": {"tried": kept + len(skipped), "kept": kept, "skipped": len(skipped)},
        "notes": dict(sorted((notes or {}).items())),
    }
    write_json_atomic(Path(root) / "manifest.json", manifest)
    return manifest


def read_manifest(root: Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; run the ingest stage first")
    return json.loads(path.read_text())


def shard_paths(root: Path, split: str) -> list[Path]:
    """The shard files of one split, in order, as listed in the manifest; each one's size is checked against
    the manifest's (a stat), so a shard cut short, even at a member boundary, is never read as whole."""
    manifest = read_manifest(root)
    if split not in manifest["shards"]:
        raise KeyError(f"split {split!r} not in {root}; have {sorted(manifest['shards'])}")
    infos = manifest["shards"][split]
    for info in infos:
        if problem := _shard_problem(Path(root), info, digest=False):
            raise DamagedShard(f"{Path(root) / info['shard']}: {problem}; rerun the ingest stage, which "
                               "rebuilds damaged shards")
    return [Path(root) / s["shard"] for s in infos]


class DamagedShard(ClipgenError):
    """A shard that no longer matches its manifest entry."""


def _shard_problem(root: Path, info: dict, digest: bool) -> str | None:
    path = root / info["shard"]
    if not path.is_file():
        return "missing"
    if (size := path.stat().st_size) != info["bytes"]:
        return f"{size} bytes where the manifest says {info['bytes']} (cut short or overwritten)"
    if digest and file_digest(path) != info["sha256"]:
        return "its sha256 differs from the manifest's"
    return None


def damaged_shards(root: Path, digest: bool = False) -> list[tuple[Path, str]]:
    """Every shard of an ingest artifact that does not match the manifest: by size (a stat each), and by
    sha256 too with ``digest`` (reads every byte)."""
    manifest = read_manifest(root)
    infos = [info for split in manifest["shards"].values() for info in split]
    found = ((Path(root) / info["shard"], _shard_problem(Path(root), info, digest)) for info in infos)
    return [(path, problem) for path, problem in found if problem]

"""Content-addressed, atomically written stage artifacts; the README's "How it works" describes the layout.

An artifact lives at ``<run_dir>/<kind>/<id>/`` where ``id`` is a short hash of the stage name, the ids
of its inputs, the stage's output-affecting config and a code version. It is *complete* only once its
``_COMPLETE`` marker exists; the marker is written last, atomically, so an interrupted stage never
leaves an artifact that a rerun would trust. Files inside are written atomically too (temp name, then
rename), which lets long stages keep finished pieces (shards, checkpoints) and redo only what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipgen.errors import ClipgenError

log = logging.getLogger("clipgen")

MARKER = "_COMPLETE"


def stage_id(stage: str, config: Mapping[str, Any], inputs: Sequence[str] = (), code_version: str = "1") -> str:
    """Short stable hash of everything that determines a stage's output."""
    payload = json.dumps(
        {"stage": stage, "config": config, "inputs": list(inputs), "code": code_version},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Artifact:
    """One stage output directory: ``root/kind/id``."""

    root: Path
    kind: str  # e.g. "shards", "judge", "cache/clip", "ckpt/vqgan"
    id: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.kind / self.id

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def is_complete(self) -> bool:
        return self.marker.is_file()

    def summary(self) -> dict[str, Any]:
        """The dict saved with the completion marker (raises if the artifact is not complete)."""
        if not self.is_complete():
            raise FileNotFoundError(f"artifact {self.path} is not complete; run its stage first")
        return json.loads(self.marker.read_text())

    def prepare(self) -> Path:
        """Create the directory to build into. Pieces finished by an interrupted run are kept; its temp files
        (``.NAME.tmp-PID``, half-written when it stopped) are swept. Called under the artifact's lock, so no
        live process is writing them."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in sorted(self.path.rglob(".*.tmp-*"), reverse=True):
            log.info("removing %s, left by an interrupted run", stale)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        return self.path

    def mark_complete(self, summary: Mapping[str, Any]) -> None:
        record = {"kind": self.kind, "id": self.id, "finished_at": time.time(), **summary}
        write_text_atomic(self.marker, json.dumps(record, indent=2, sort_keys=True, default=str))


class ArtifactBusy(ClipgenError):
    """Another process is building this artifact, and the caller asked not to wait for it."""


def _holder(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text())
        return f"pid {h['pid']} on {h['host']}, since {time.strftime('%H:%M:%S', time.localtime(h['since']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def artifact_lock(artifact: Artifact, *, wait: bool = True) -> Iterator[None]:
    """Hold the artifact's build lock: one builder per artifact, across processes on a shared folder.

    An advisory ``flock`` on ``<kind>/.<id>.lock``. The kernel drops it when its holder exits, however it
    exits, so a lock left by a killed run is taken over by the next run with no stale-lock guessing. The
    file keeps the holder's pid and host so that a waiting run can say whom it waits for.
    """
    lock_file = artifact.path.with_name(f".{artifact.id}.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock_file)
            if not wait:
                raise ArtifactBusy(f"{artifact.path} is being built by {holder}; wait for it, or set "
                                   "orchestration.wait_for_locks=true to queue behind it") from None
            log.info("%s is being built by %s; waiting for it", artifact.path, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = _holder(lock_file) if lock_file.stat().st_size else None
        if previous and not artifact.is_complete():
            log.info("%s: taking over from %s, which stopped before finishing", artifact.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        yield
        os.ftruncate(fd, 0)  # an empty lock file: nobody to take over from
    finally:
        os.close(fd)  # releases the lock


def run_cached(artifact: Artifact, build, *, stage: str, wait: bool = True,
               damaged: Callable[[Path], list[tuple[Path, str]]] | None = None) -> dict[str, Any]:
    """Run ``build(path) -> summary`` unless ``artifact`` is already complete; return the summary and
    ``cached`` (whether it was reused). A run that finds the artifact being built waits and then reuses it.

    ``damaged(path)`` lists the files of a complete artifact that can no longer be trusted (a cut shard, a
    Parquet file without its footer); they are deleted, with a warning naming each, and rebuilt.
    """
    def reusable() -> bool:
        if not artifact.is_complete():
            return False
        bad = damaged(artifact.path) if damaged else []
        for path, problem in bad:
            log.warning("%s: %s is damaged (%s); rebuilding it", stage, path, problem)
            path.unlink(missing_ok=True)
        if bad:
            artifact.marker.unlink(missing_ok=True)
        return not bad

    if reusable():
        log.info("%s: cached, skipping (%s)", stage, artifact.path)
        return {**artifact.summary(), "cached": True}
    with artifact_lock(artifact, wait=wait):
        if reusable():  # built by the run we waited for
            log.info("%s: built by another run, reusing (%s)", stage, artifact.path)
            return {**artifact.summary(), "cached": True}
        log.info("%s: building %s", stage, artifact.path)
        summary = build(artifact.prepare())
        artifact.mark_complete(summary)
    log.info("%s: done (%s)", stage, artifact.path)
    return {**artifact.summary(), "cached": False}


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_tree(tmp)  # the bytes reach the disk before the name does: a crash leaves old or new, never junk
        os.replace(tmp, final)
        _fsync(final.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file() and not child.is_symlink():
                _fsync(child)
    if path.exists():
        _fsync(path)


def link_or_copy(source: Path, dest: Path) -> None:
    """Put ``source``'s bytes at ``dest`` atomically: a hard link where the filesystem allows, else a copy."""
    with atomic_path(Path(dest)) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(source, tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json_or_none(path: Path) -> Any:
    """The JSON in ``path``, or None where it is missing or unreadable (a file its writer never finished)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listing(path: Path, change_stamp: bool = False) -> list[tuple]:
    """(relative POSIX path, size, mtime in ns) of every file under ``path`` (or of ``path`` itself), sorted;
    with ``change_stamp`` also the inode and ctime, which every write changes and no tool can set back.
    Symlinked folders are not followed, as ingest does not follow them; an unreadable entry is listed as -1."""
    def entry(full: str, rel: str) -> tuple:
        try:
            st = os.stat(full)
        except OSError:
            return (rel, -1, -1)
        return (rel, st.st_size, st.st_mtime_ns, *((st.st_ino, st.st_ctime_ns) if change_stamp else ()))

    if not path.is_dir():
        return [entry(str(path), path.name)]
    found = []
    for dirpath, _, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            found.append(entry(full, Path(os.path.relpath(full, path)).as_posix()))
    return sorted(found)


def listing_digest(folder: str | Path) -> str:
    """Changes when any file under ``folder`` is added, removed, resized or touched: cheap enough for a data
    folder of millions of images (one stat each, no reads)."""
    payload = json.dumps(_listing(Path(folder)), separators=(",", ":"))
    return "listing:" + hashlib.sha256(payload.encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, stamps: tuple[tuple, ...]) -> str:
    h = hashlib.sha256()
    root = Path(path)
    for rel, *_ in stamps:
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        h.update(file_digest(root if root.is_file() else root / rel).encode())
    return h.hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 over the content of a file, or of every file in a folder (with their relative paths). Hashed
    once per process while no file under it is written (the memo is keyed by inode and ctime too)."""
    path = Path(path).resolve()
    return "sha256:" + _content_digest(str(path), tuple(_listing(path, change_stamp=True)))


def weights_identity(value: str | None) -> str | None:
    """What a weights setting contributes to a stage id: the digest of a local file or folder, else the value
    itself (an open_clip tag, whose weights are fixed, or None)."""
    if value is None or not Path(value).exists():
        return value
    return content_digest(value)

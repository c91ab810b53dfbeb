"""Content-addressed, atomically written stage artifacts (DESIGN.md section 3).

An artifact lives at ``<run_dir>/<kind>/<id>/`` where ``id`` is a short hash of the stage name, the ids
of its inputs, the stage's output-affecting config and a code version. It is *complete* only once its
``_COMPLETE`` marker exists; the marker is written last, atomically, so an interrupted stage never
leaves an artifact that a rerun would trust. Files inside are written atomically too (temp name, then
rename), which lets long stages keep finished pieces (shards, checkpoints) and redo only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """Create the directory to build into; pieces finished by an interrupted run are kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def mark_complete(self, summary: Mapping[str, Any]) -> None:
        record = {"kind": self.kind, "id": self.id, "finished_at": time.time(), **summary}
        write_text_atomic(self.marker, json.dumps(record, indent=2, sort_keys=True, default=str))


def run_cached(artifact: Artifact, build, *, stage: str) -> dict[str, Any]:
    """Run ``build(path) -> summary`` unless ``artifact`` is already complete; return the summary."""
    if artifact.is_complete():
        log.info("%s: cached, skipping (%s)", stage, artifact.path)
        return {**artifact.summary(), "skipped": True}
    log.info("%s: building %s", stage, artifact.path)
    summary = build(artifact.prepare())
    artifact.mark_complete(summary)
    log.info("%s: done (%s)", stage, artifact.path)
    return {**artifact.summary(), "skipped": False}


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

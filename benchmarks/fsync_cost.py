"""What the durable writes cost: every atomic write fsyncs its bytes, then the folder after the rename
(:func:`clipgen.artifacts.atomic_path`), so a crash leaves the old file or the new one, never a torn one.

Two measures, each with fsync on and with it replaced by a no-op, alternated in one process:

* ``shards``: the shapes pipeline's ingest (``shards`` step: rendering and writing every tar, record and the
  manifest) into a fresh temporary run folder;
* ``checkpoint``: :func:`clipgen.train.loop.save_checkpoint` of the tiny transformer (weights, AdamW state,
  RNG), the write a training stage makes every ``train.ckpt_every`` steps.

Each measure runs once unmeasured first, then alternates the order of the two modes. With fsync on it
also counts the fsync calls and the seconds spent inside them. The temporary folders are
on the same filesystem as ``--tmp`` (default: the system's), so point it at the run folder's disk to measure
that disk.

    python benchmarks/fsync_cost.py [--repeats 3] [--checkpoints 20] [--tmp DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from run_info import Report

import clipgen.artifacts as artifacts
from clipgen.config import load_config
from clipgen.models.gpt import GPT
from clipgen.pipeline import run_step
from clipgen.train import loop
from clipgen.train.gpt_trainer import make_optimizer, model_shape


class FsyncMeter:
    """Counts the calls of ``artifacts._fsync`` and the seconds inside it, or makes it a no-op."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0

    @contextlib.contextmanager
    def installed(self, enabled: bool):
        real = artifacts._fsync

        def measured(path: Path) -> None:
            self.calls += 1
            if enabled:
                start = time.perf_counter()
                real(path)
                self.seconds += time.perf_counter() - start

        artifacts._fsync = measured
        try:
            yield self
        finally:
            artifacts._fsync = real


def build_shards(tmp: str) -> None:
    with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
        run_step(load_config("pipelines/shapes.yaml", [f"run_dir={run_dir}"]), "shards")


def checkpoint_saves(tmp: str, count: int):
    """The timed work: ``count`` checkpoints of the tiny transformer, whose model and AdamW state (with its
    moments, as in a real checkpoint) are built here, once, outside the timing."""
    cfg = load_config("pipelines/shapes.yaml", [])
    model = GPT(model_shape(cfg.gpt, 1000, 64, 128))
    opt = make_optimizer(model, cfg.gpt)
    model(torch.zeros(2, 128), torch.zeros(2, 64, dtype=torch.long)).float().mean().backward()
    opt.step()
    state = {"optimizers": {"gpt": opt.state_dict()}, "rng": [loop.rng_state()]}

    def work() -> None:
        with tempfile.TemporaryDirectory(dir=tmp) as root:
            for step in range(count):
                loop.save_checkpoint(Path(root), step, {"model": model.state_dict()}, {"bench": True}, state)

    return work


def measure(name: str, work, repeats: int) -> dict:
    times: dict[str, list[float]] = {"fsync": [], "no_fsync": []}
    work()  # warm-up, unmeasured: first-call costs (imports, allocations, the page cache) land here
    meter = FsyncMeter()
    for repeat in range(repeats):
        for mode in ("fsync", "no_fsync") if repeat % 2 == 0 else ("no_fsync", "fsync"):
            with meter.installed(enabled=mode == "fsync"):
                start = time.perf_counter()
                work()
                times[mode].append(time.perf_counter() - start)
    on, off = statistics.median(times["fsync"]), statistics.median(times["no_fsync"])
    return {"measure": name, "seconds_with_fsync": round(on, 4), "seconds_without": round(off, 4),
            "ratio": round(on / off, 3), "fsync_calls_per_run": meter.calls // (2 * repeats),
            "seconds_inside_fsync_per_run": round(meter.seconds / repeats, 3), "all_seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoints", type=int, default=20, help="checkpoints saved per timed run")
    parser.add_argument("--tmp", default=None, help="folder for the temporary run folders (its disk is measured)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = Report("fsync_cost", torch.device("cpu"), {"repeats": args.repeats, "checkpoints": args.checkpoints,
                                                        "tmp": args.tmp or tempfile.gettempdir()}, args.out)
    report.add(measure("checkpoint", checkpoint_saves(args.tmp, args.checkpoints), args.repeats))
    report.add(measure("shards", lambda: build_shards(args.tmp), args.repeats))
    print(report.body)


if __name__ == "__main__":
    main()

"""Independent steps side by side on a CPU host, each chain in a process of its own on cores of its own.

Between the shards and the transformer, three chains of steps need nothing from one another: the tokenizer
chain (train-vqgan, then tokenize), the CLIP chain (pretrain-clip, then embed) and the shapes world's judge.
Their models are small, and a second core speeds each of them up only 1.6-1.7x, so two of them at once, one core
each, finish sooner than one after the other on both cores: in a cold shapes demo on a 2-core Xeon with AMX the
phase took 294 s (train-vqgan 269 s on one core) against 337 s one after the other (train-vqgan 158 s on two).
A model trained on one core is not bit-identical to one trained on two (float sums run in another order).

Each chain runs :func:`clipgen.pipeline.run_step` for its steps in a child process (``python -m
clipgen.side_by_side``), pinned to its cores. A process, not a thread, because torch's thread count and random
generator are global to a process: in threads, one step's draws would depend on what ran beside it. The
locks, caches and artifacts are the same as in the parent, so a chain that fails leaves the others' finished
work for the rerun. GPU hosts, multi-process training and Dask runs keep the one-after-the-other order.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from clipgen.artifacts import write_json_atomic, write_text_atomic
from clipgen.config import PipelineConfig, config_yaml, load_config
from clipgen.cores import usable_cores
from clipgen.fanout import MapFn
from clipgen.pipeline import STEPS_BY_NAME, needs_build, plan, run_step, steps_of

# the chains that may run side by side, longest first: that is the order they are handed cores in (cold shapes
# demo, one core each, process start included: 290, 211 and 61 s on an AMX Xeon, 231, 202 and 49 s on a Zen 5 EPYC)
SIDE_BY_SIDE: tuple[tuple[str, ...], ...] = (("vqgan", "tokens"), ("toyclip", "embeddings"), ("judge",))
CORES_ENV = "CLIPGEN_CHAIN_CORES"  # the child's cores, comma-separated


class Chain(NamedTuple):
    steps: tuple[str, ...]

    @property
    def label(self) -> str:
        return " -> ".join(self.steps)


def plan_phases(cfg: PipelineConfig, stages: Iterable[str]) -> list[list[Chain]]:
    """The steps of ``stages`` in pipeline order, as phases run one after the other. A phase of one chain runs in
    this process, and its steps belong to one stage; a phase of several chains runs them side by side
    (:func:`run_side_by_side`). That happens when ``orchestration.side_by_side`` is on, the host has no GPU and 2
    or more cores, no step trains under torchrun, the shard-parallel parts map on threads (a Dask cluster keeps
    its fan-out), and at least two chains have something to build; a chain with nothing to build stays in this
    process (it only reports its cached steps)."""
    names = [s.name for stage in stages for s in steps_of(stage, cfg)]
    artifacts = plan(cfg)
    chains = [Chain(tuple(n for n in chain if n in names)) for chain in SIDE_BY_SIDE]
    busy = [c for c in chains if any(needs_build(STEPS_BY_NAME[n], artifacts[n]) for n in c.steps)]
    together = {n for c in busy for n in c.steps} if len(busy) >= 2 and side_by_side_allowed(cfg) else set()
    phases: list[list[Chain]] = []
    for n in names:
        if n in together:
            if busy not in phases:  # the phase stands where its first step would
                phases.append(busy)
        elif len(phases) and len(phases[-1]) == 1 and stage_of(phases[-1][0].steps[-1]) == stage_of(n):
            phases[-1] = [Chain(phases[-1][0].steps + (n,))]
        else:
            phases.append([Chain((n,))])
    return phases


def stage_of(step: str) -> str:
    return STEPS_BY_NAME[step].stage


def side_by_side_allowed(cfg: PipelineConfig) -> bool:
    o = cfg.orchestration
    return (o.side_by_side and o.task_runner == "threads" and usable_cores() >= 2 and not torch.cuda.is_available()
            and cfg.train.devices * cfg.train.nodes == 1)


def core_groups(n: int, cores: list[int] | None = None) -> list[list[int]]:
    """This process's cores split into ``n`` groups as even as possible (the first groups get the extra)."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    size, extra = divmod(len(cores), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [cores[bounds[i]:bounds[i + 1]] for i in range(n)]


def thread_map(fn, items) -> list:
    items = list(items)
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def run_side_by_side(cfg: PipelineConfig, chains: list[Chain], map_fn: MapFn = thread_map) -> dict[str, dict]:
    """Run ``chains`` at once, each in a child process on its share of the cores; returns {step: result} as
    :func:`clipgen.pipeline.run_step` gives it. ``map_fn`` must run its items concurrently (the flow passes
    Prefect's thread-pool mapping). With more chains than cores, a chain waits for the cores of one that ends;
    chains get cores in the order given (:class:`CoreTurns`), whichever of ``map_fn``'s threads starts first."""
    turns = CoreTurns(core_groups(min(len(chains), usable_cores())))

    def run(chain: Chain) -> dict[str, dict]:
        cores = turns.take(chains.index(chain))
        try:
            return run_chain_process(cfg, chain, cores)
        finally:
            turns.give_back(cores)

    return {step: result for found in map_fn(run, chains) for step, result in found.items()}


class CoreTurns:
    """Core groups handed out strictly in turn order: turn ``i`` gets the first free group once turns ``0..i-1``
    have theirs. Without turns, threads that start in another order give the long chains' cores to a short one
    (a cold demo once started the judge beside the tokenizer and left the CLIP chain, the longest there, to
    wait for it)."""

    def __init__(self, groups: list[list[int]]):
        self.free, self.next_turn = list(groups), 0
        self.changed = threading.Condition()

    def take(self, turn: int) -> list[int]:
        with self.changed:
            self.changed.wait_for(lambda: self.next_turn == turn and self.free)
            self.next_turn += 1
            self.changed.notify_all()
            return self.free.pop(0)

    def give_back(self, cores: list[int]) -> None:
        with self.changed:
            self.free.append(cores)
            self.changed.notify_all()


def run_chain_process(cfg: PipelineConfig, chain: Chain, cores: list[int]) -> dict[str, dict]:
    logging.getLogger("clipgen").info("%s: on core(s) %s, in a process of its own", chain.label, cores)
    with tempfile.TemporaryDirectory(prefix="clipgen-chain-") as tmp:
        config_file, results_file = Path(tmp) / "config.yaml", Path(tmp) / "results.json"
        write_text_atomic(config_file, config_yaml(cfg))
        env = {**os.environ, CORES_ENV: ",".join(map(str, cores))}
        command = [sys.executable, "-m", "clipgen.side_by_side", str(config_file), str(results_file), *chain.steps]
        done = subprocess.run(command, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"the chain {chain.label} failed in its own process (exit code {done.returncode}); "
                               "its log is above. Steps it finished, and the other chains' work, are kept")
        return json.loads(results_file.read_text())


def main(argv: list[str]) -> None:
    config_file, results_file, *steps = argv
    cores = [int(c) for c in os.environ[CORES_ENV].split(",")]
    os.sched_setaffinity(0, cores)  # before torch's first parallel work; the stages size their work by it
    torch.set_num_threads(len(cores))
    label = Chain(tuple(steps)).label
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [{label}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipgen").setLevel(logging.INFO)
    cfg = load_config(config_file, [])
    write_json_atomic(Path(results_file), {step: run_step(cfg, step) for step in steps})


if __name__ == "__main__":
    main(sys.argv[1:])


"""Pieces every training loop shares: DDP set-up, precision, RNG state, checkpoints, metrics, schedules.

Checkpoints are directories ``<root>/step_NNNNNNN/`` holding one ``<name>.safetensors`` per module, the
``config.json`` that makes them self-describing, and ``train_state.pt``: optimiser states, the step, the
RNG states of every rank (python, numpy, torch, cuda) and the data position. ``train_state.pt`` holds only
tensors and plain containers and is read with ``torch.load(weights_only=True)``: no pickle is ever run.
Each checkpoint appears under its final name only when complete, and ``<root>/latest`` names the newest.

Distributed training follows ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):
gloo on CPU, NCCL on CUDA. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from clipgen.artifacts import atomic_path, write_json_atomic, write_text_atomic
from clipgen.cores import free_cpu_threads, torch_threads

log = logging.getLogger("clipgen")

TRAIN_STATE = "train_state.pt"
LATEST = "latest"


# ------------------------------------------------------------------------------------ distributed
class DistInfo(NamedTuple):
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # True if setup_distributed created the process group (and teardown ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistInfo(0, 1, device, False)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def training_process(cpu_threads: int | None):
    """One ``fit()``'s process set-up: join torchrun's group (if any) and, on CPU, take ``cpu_threads``
    torch threads (None: the cores that are free now, split over the local ranks); undone on exit."""
    info = setup_distributed()
    if info.device.type == "cpu" and cpu_threads is None:
        cpu_threads = max(1, free_cpu_threads() // info.world_size)
    try:
        with torch_threads(cpu_threads if info.device.type == "cpu" else None):
            yield info
    finally:
        teardown_distributed(info)


def micro_batch_size(batch_size: int, key: str, train_grad_accum: int, world_size: int) -> int:
    """Each rank's per-step micro-batch: ``batch_size`` (the config ``key``) over ranks x grad_accum."""
    parts = world_size * train_grad_accum
    if batch_size % parts:
        raise ValueError(f"{key}={batch_size} must be divisible by ranks x train.grad_accum "
                         f"= {world_size} x {train_grad_accum}; change one of them")
    return batch_size // parts


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware, where bf16 autocast pays off: Intel AMX tiles,
    or AVX512-BF16 dot products (AMD Zen 4 and later, measured 1.66x fp32 on the tiny transformer)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(device: torch.device, precision: str, matmul_bound: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16``, and for ``auto`` on CUDA; fp32 for ``fp32``.

    On CPU ``auto`` picks bf16 only for a ``matmul_bound`` model (the transformer) on a processor with bf16
    matrix instructions (:func:`cpu_has_bf16_matmul`): the tiny shapes GPT trains 1.83x faster with AMX and
    1.66x with AMD Zen 4's AVX512-BF16, while oneDNN's bf16 convolutions made the VQGAN slower
    (``benchmarks/train_gpt.py``, ``benchmarks/train_vqgan.py``). Without bf16 instructions it is emulated
    and far slower (``benchmarks/results/train_gpt_cpu_isa_2026-11-27.json``,
    ``benchmarks/results/train_gpt_cpu_zen4_2026-12-04.json``).
    """
    cpu_bf16 = device.type == "cpu" and matmul_bound and cpu_has_bf16_matmul()
    use_bf16 = precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_bf16))
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def evaluation_due(step: int, total: int, log_every: int, evaluations: int = 10) -> bool:
    """Whether logged ``step`` also scores the held-out set: about ``evaluations`` times a run, and at the end
    (scoring held-out data at every log line cost the shapes transformer ~15% of its training time)."""
    every = log_every * max(1, round(total / evaluations / log_every))
    return step == total or step % every == 0


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": npst["key"].numpy().astype(np.uint32),
                         "pos": npst["pos"]}, "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    mine = rng_state()
    if info.world_size == 1:
        return [mine]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


# ------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None.

    A checkpoint folder appears under its final name only when whole (:func:`save_checkpoint`), so the newest
    ``step_*`` is the one to resume from. The ``latest`` pointer, written just after, is for people: a kill
    between the two leaves it one checkpoint behind, and reading it would lose that checkpoint.
    """
    found = sorted(p for p in Path(root).glob("step_*") if (p / TRAIN_STATE).is_file())
    if not found:
        return None
    log.info("resuming from checkpoint %s", found[-1])
    return found[-1]


def save_checkpoint(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], config: dict,
                    train_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/step_NNNNNNN`` atomically, point ``root/latest`` at it, prune older ones (rank 0 only)."""
    root = Path(root)
    final = root / f"step_{step:07d}"
    for stale in [final, *root.glob(".step_*.tmp-*")]:  # a re-save of this step, or a killed run's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for name, state in weights.items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                      str(tmp / f"{name}.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        torch.save({**train_state, "step": step}, tmp / TRAIN_STATE)
    write_text_atomic(root / LATEST, final.name)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / f"{name}.safetensors"))


def load_train_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / TRAIN_STATE, map_location="cpu", weights_only=True)


def check_same_config(path: Path, config: dict) -> None:
    """Refuse to resume a run whose checkpoint was made with a different config."""
    saved = json.loads((Path(path) / "config.json").read_text())
    if json.loads(json.dumps(config, sort_keys=True, default=str)) != saved:
        raise ValueError(f"checkpoint {path} was written with a different config; "
                         f"delete {Path(path).parent} to start over, or use a fresh output directory")


# ----------------------------------------------------------------------------------------- metrics
class RollingMean:
    """Means of named scalars over the last ``window`` updates."""

    def __init__(self, window: int):
        self.values: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def update(self, **scalars: float) -> None:
        for name, value in scalars.items():
            self.values[name].append(float(value))

    def means(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.values.items() if v}


class MetricsLog:
    """Append-only JSONL of metric records; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep what the killed run logged up to its checkpoint, nothing after
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True, default=float) + "\n")


def _step_of(line: str) -> float:
    """The step of a JSONL record; a blank or half-written line (a kill mid-write) counts as never logged."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(path, summary)

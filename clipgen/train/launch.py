"""Multi-process training: a pipeline step whose config asks for ``train.devices`` > 1 or ``train.nodes`` > 1
runs under ``torchrun``, launched from the step's own task.

The parent writes the resolved config beside the step's output and runs::

    torchrun --nnodes N --nproc-per-node D [--standalone | --rdzv-backend c10d --rdzv-endpoint HOST:PORT]
             -m clipgen.train.launch_rank CONFIG STEP OUT

Every rank (:mod:`clipgen.train.launch_rank`) builds the step (``fit()`` joins the process group from torchrun's environment and splits
each global batch); rank 0 writes the weights and the summary, which the parent returns as the step's
result. On several nodes the same command runs once per node (see the README: a work pool whose jobs
start one process per node, e.g. Slurm or Kubernetes), all pointing at one rendezvous endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from clipgen.artifacts import write_text_atomic
from clipgen.config import ConfigError, PipelineConfig, config_yaml

SUMMARY_FILE = ".launch_summary.json"


def wants_torchrun(cfg: PipelineConfig) -> bool:
    """Whether this process must launch torchrun (it is not already one of its ranks)."""
    return cfg.train.devices * cfg.train.nodes > 1 and "WORLD_SIZE" not in os.environ


def torchrun_command(cfg: PipelineConfig, config_file: Path, step: str, out: Path) -> list[str]:
    t = cfg.train
    if t.nodes > 1 and not t.rdzv_endpoint:
        raise ConfigError("train.nodes > 1 needs train.rdzv_endpoint (HOST:PORT of the first node) so the "
                          "nodes can find each other; see the README's multi-node section")
    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", t.rdzv_endpoint, "--rdzv-id", f"clipgen-{out.name}"]
                  if t.nodes > 1 else ["--standalone"])
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(t.nodes), "--nproc-per-node",
            str(t.devices), *rendezvous, "-m", "clipgen.train.launch_rank", str(config_file), step, str(out)]


def launch_step(cfg: PipelineConfig, step: str, out: Path) -> dict[str, Any]:
    """Build ``step`` into ``out`` under torchrun; returns rank 0's summary. Fails if any rank fails."""



    out = Path(out)
    config_file = out / ".launch_config.yaml"
    write_text_atomic(config_file, config_yaml(cfg))
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    command = torchrun_command(cfg, config_file, step, out)
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun for step {step!r} exited with {done.returncode}: {' '.join(command)}")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {**summary, "world_size": cfg.train.devices * cfg.train.nodes}

"""Benchmark: tokenizer training throughput per precision, and whether bf16 trains as well as fp32.

Trains the ``shapes-f4`` preset on shapes-world images for ``--steps`` steps once per precision (same
seed, same data) and prints images/s over the second half of the steps plus the held-out PSNR each
reached. On CUDA compare ``fp32`` with ``bf16``; on CPU bf16 autocast is only worth it where the
processor has bf16 matrix units. Prints one JSON line.

    python benchmarks/train_vqgan.py [--steps 300] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from clipgen.config import TrainConfig, VQGANConfig, WorldConfig
from clipgen.data.world import world_arrays
from clipgen.host_memory import keep_freed_memory
from clipgen.presets import PRESETS
from clipgen.train.vqgan_trainer import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the preset's")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as a pipeline step sets it (CLIPGEN_MALLOC=default leaves glibc's defaults)
    world = WorldConfig()
    train_images = world_arrays(world, "train", 32, n=4096).images
    heldout = world_arrays(world, "heldout", 32, n=512).images
    preset = {**PRESETS["vqgan"]["shapes-f4"], "steps": args.steps}
    if args.batch_size:
        preset["batch_size"] = args.batch_size
    cfg = VQGANConfig(**preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            train = TrainConfig(precision=precision, log_every=max(1, args.steps // 2), ckpt_every=10**9)
            result = fit(cfg, train, train_images, Path(tmp) / precision, heldout=heldout, progress=False,
                         cpu_threads=os.cpu_count())
            last = json.loads((Path(tmp) / precision / "metrics.jsonl").read_text().splitlines()[-1])
            rows.append({"precision": precision, "images_per_s": round(cfg.batch_size / last["step_seconds"], 1),
                         "heldout_psnr": result.summary["heldout"]["psnr"], "loss": round(last["loss"], 4)})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(json.dumps({"benchmark": "train_vqgan", "device": device, "steps": args.steps, "kept_freed_memory": kept,
                      "vqgan": dataclasses.asdict(cfg) | {"steps": args.steps}, "results": rows}))


if __name__ == "__main__":
    main()

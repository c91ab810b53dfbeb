"""Benchmark: transformer training throughput (tokens/s) and the share of step time spent waiting on data.

Runs the real training loop (:func:`clipgen.train.gpt.fit`) on in-memory pairs shaped like the caches
(unit-norm embeddings, random token grids) for each preset: ``tiny`` on the shapes world (8x8 grid,
1000 codes, 128-d toy-CLIP embeddings) and ``mid`` (8 layers, width 512, a 16x16 grid of 16384 codes,
512-d embeddings). The first half of the steps is warm-up; the numbers are the means over the second
half, as the loop logs them. Prints one JSON line.

    python benchmarks/train_gpt.py [--presets tiny,mid] [--steps 20] [--batch-size 0 (= preset default)]
                                   [--precisions fp32,auto]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from clipgen.config import GPTConfig, TrainConfig
from clipgen.presets import PRESETS
from clipgen.train.gpt import Pairs, fit

DATA = {  # preset -> (grid side, vocabulary, embedding size, batch size on CPU, on CUDA)
    "tiny": (8, 1000, 128, 64, 256),
    "mid": (16, 16384, 512, 8, 64),
}


def bench(preset: str, steps: int, batch_size: int, precision: str, tmp: Path) -> dict:
    side, vocab, dim, cpu_batch, cuda_batch = DATA[preset]
    cuda = torch.cuda.is_available()
    batch = batch_size or (cuda_batch if cuda else cpu_batch)
    n = max(4 * batch, 512)
    g = torch.Generator().manual_seed(0)
    pairs = Pairs([f"k{i:06d}" for i in range(n)], F.normalize(torch.randn(n, dim, generator=g), dim=-1),
                  torch.randint(0, vocab, (n, side * side), generator=g))
    cfg = GPTConfig(**{**PRESETS["gpt"][preset], "steps": steps, "batch_size": batch, "warmup_steps": 1})
    train = TrainConfig(log_every=max(1, steps // 2), ckpt_every=10**9, precision=precision)
    # all cores, whatever the load average says (free_cpu_threads would read the previous run as load)
    result = fit(cfg, train, pairs, tmp / preset, vocab_size=vocab, progress=False, cpu_threads=os.cpu_count())
    last = json.loads((tmp / preset / "metrics.jsonl").read_text().splitlines()[-1])
    return {"preset": preset, "precision": precision, "tokens": side * side, "batch_size": batch, "parameters": result.summary["parameters"],
            "tokens_per_s": round(last["tokens_per_s"], 1), "step_ms": round(1000 * last["step_seconds"], 1),
            "data_wait_fraction": round(last["data_fraction"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--precisions", default="auto",
                        help="comma-separated, each of auto/fp32/bf16; e.g. fp32,auto compares them side by side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(p, args.steps, args.batch_size, precision, Path(tmp) / precision)
                for precision in args.precisions.split(",") for p in args.presets.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(json.dumps({"benchmark": "train_gpt", "device": device, "steps": args.steps,
                      "results": rows}))


if __name__ == "__main__":
    main()

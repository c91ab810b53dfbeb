"""Benchmark: a CPU sampling step's attention, written out as matmuls (what the transformer does) against PyTorch's
fused kernel (what it did before), side by side in one process.

The shapes are the shapes demo's: the tiny transformer with 2-D rotary positions, random weights (speed does not
depend on them), 256 conditions with guidance 1.75 (512 rows), fp32. Rounds alternate the two ways; each reports
the best of its calls, and ``speedup`` is the median over rounds of fused / written out. ``same_tokens`` says
whether the two drew the same token grids from the same generator state (their logits differ only by rounding).

    python benchmarks/cpu_decode_attention.py [--rounds 3] [--out benchmarks/results/cpu_decode_attention.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from gpt_shapes import gpt_shape  # beside this script
from run_info import Report

import clipgen.models.gpt as gpt_module
from clipgen.sample import Sampling, sample_tokens


def fused(q, k, v, dropout, causal):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)


def timed_sampling(model, cond, attention, repeats: int) -> tuple[float, torch.Tensor]:
    with mock.patch.object(gpt_module, "written_out_attention", attention), torch.no_grad():
        times = []
        for _ in range(repeats):
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            tokens = sample_tokens(model, cond, Sampling(cfg_scale=1.75), generator)
            times.append(time.perf_counter() - start)
    return min(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = gpt_module.GPT(dataclasses.replace(gpt_shape("tiny"), rope_2d=True)).eval()
    cond = F.normalize(torch.randn(256, model.shape.cond_dim), dim=-1)
    report = Report("cpu_decode_attention", torch.device("cpu"), {"rows": 512, "cfg_scale": 1.75, "preset": "tiny",
                                                                   "rope_2d": True, "dtype": "fp32"}, args.out)
    ways = {"fused": fused, "written_out": gpt_module.written_out_attention}
    timed_sampling(model, cond, fused, 1)  # warm-up
    ratios = []
    for _ in range(args.rounds):
        found = {name: timed_sampling(model, cond, way, args.repeats) for name, way in ways.items()}
        ratios.append(found["fused"][0] / found["written_out"][0])
        report.add({"seconds": {name: round(s, 3) for name, (s, _) in found.items()},
                    "same_tokens": bool(torch.equal(found["fused"][1], found["written_out"][1]))})
    report.body["speedup"] = round(statistics.median(ratios), 3)
    report.save()
    print(report.body["speedup"], [row["seconds"] for row in report.body["results"]])


if __name__ == "__main__":
    main()

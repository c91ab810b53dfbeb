"""Benchmark: batched KV-cache sampling against the reference loop (full prefix recomputed per token).

For each preset, in one run with the same weights (random init: speed does not depend on the values),
conditions, sampling settings and batch size: (a) :func:`clipgen.sample.sample_tokens`, one prefill and
one cached single-token step per image token; (b) :func:`clipgen.sample.sample_tokens_uncached`, what
the public CLIP-GEN code does. Both must give identical tokens under greedy decoding (checked here).
On CUDA, (a) also runs with its single-token step captured once and replayed as a CUDA graph.
Token sampling only: the VQGAN decode is the same for both and is left out. Prints one JSON line.

    python benchmarks/sample.py [--presets tiny,mid] [--batch-size 0 (= per-device default)] [--cfg-scale 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from clipgen.models.gpt import GPT, GPTShape
from clipgen.presets import PRESETS
from clipgen.sample import Sampling, sample_tokens, sample_tokens_uncached

DATA = {  # preset -> (grid side, vocabulary, embedding size, batch on CPU, batch on CUDA)
    "tiny": (8, 1000, 128, 32, 256),
    "mid": (16, 16384, 512, 4, 64),
}


def timed(fn, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(preset: str, batch_size: int, cfg_scale: float, repeats: int, device: torch.device) -> dict:
    side, vocab, dim, cpu_batch, cuda_batch = DATA[preset]
    batch = batch_size or (cuda_batch if device.type == "cuda" else cpu_batch)
    dims = {k: v for k, v in PRESETS["gpt"][preset].items() if k in ("n_layer", "n_head", "n_embd", "n_prefix")}
    torch.manual_seed(0)
    model = GPT(GPTShape(vocab_size=vocab, n_tokens=side * side, cond_dim=dim, **dims)).to(device).eval()
    cond = F.normalize(torch.randn(batch, dim, device=device), dim=-1)
    greedy = Sampling(greedy=True, cfg_scale=cfg_scale)
    identical = torch.equal(sample_tokens(model, cond[:2], greedy), sample_tokens_uncached(model, cond[:2], greedy))
    settings = Sampling(temperature=1.0, top_k=100, cfg_scale=cfg_scale)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    cache_dtype = torch.bfloat16 if device.type == "cuda" else None

    def ours(cuda_graph: bool = False):
        with autocast:
            sample_tokens(model, cond, settings, cache_dtype=cache_dtype, cuda_graph=cuda_graph)

    def reference():
        with autocast:
            sample_tokens_uncached(model, cond, settings)

    ours()  # warm-up
    cached = min(timed(ours, device) for _ in range(repeats))
    uncached = timed(reference, device)  # one run: it is the slow side
    row = {"preset": preset, "tokens": side * side, "batch_size": batch, "cfg_scale": cfg_scale,
           "greedy_tokens_identical": identical, "ours_images_per_s": round(batch / cached, 2),
           "reference_images_per_s": round(batch / uncached, 3), "speedup": round(uncached / cached, 1)}
    if device.type == "cuda":  # the same loop with the single-token step replayed as a CUDA graph
        try:
            row.update(graph_row(model, cond, greedy, cache_dtype, autocast, ours, uncached, batch, repeats, device))
        except RuntimeError as exc:  # report, don't lose the other numbers
            row["graph_error"] = str(exc)[:300]
    return row


def graph_row(model, cond, greedy, cache_dtype, autocast, ours, uncached, batch, repeats, device) -> dict:
    """The CUDA-graph variant's throughput, and whether its greedy tokens equal the plain loop's."""
    with autocast:
        graphed_greedy = sample_tokens(model, cond[:2], greedy, cache_dtype=cache_dtype, cuda_graph=True)
        plain_greedy = sample_tokens(model, cond[:2], greedy, cache_dtype=cache_dtype)
    ours(cuda_graph=True)
    graphed = min(timed(lambda: ours(cuda_graph=True), device) for _ in range(repeats))
    return {"graph_images_per_s": round(batch / graphed, 2), "graph_speedup": round(uncached / graphed, 1),
            "graph_greedy_tokens_identical": torch.equal(graphed_greedy, plain_greedy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench(p, args.batch_size, args.cfg_scale, args.repeats, device) for p in args.presets.split(",")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    print(json.dumps({"benchmark": "sample", "device": name, "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()

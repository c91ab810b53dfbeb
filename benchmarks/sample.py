"""Benchmark: token sampling speed (images/s) against the hardware's bound, and greedy parity for every path.

For each gpt preset (shapes from :mod:`gpt_shapes`, random init: speed does not depend on the values),
each path in ``--paths`` samples the same conditions with guidance ``--cfg-scale`` (2) and top-k
``--top-k`` (100), in bf16 (weights and KV cache) on CUDA and fp32 on CPU, at each of ``--batch-sizes``;
the best of ``--repeats`` timed calls after one warm-up call (which captures the graphs) counts. Paths:

  plain         clipgen.sample.sample_tokens: one prefill, then one eager cached step per token
  graph-whole   static steps replayed as one CUDA graph over the whole cache, masked (the previous way)
  graph-bucket  a graph per ``--bucket`` positions; SDPA over the filled positions rounded up, masked
  graph-exact   a graph per position; SDPA over exactly the filled positions, no mask (FlashAttention)
  graph-kernel  one graph; a Triton kernel reads the filled length on the device (no mask, no buckets)
  graph         sample_tokens_graphed with its defaults, the library's choice (``graph_attention`` says which)
  On CPU the graph-* paths run the same static steps eagerly, without graphs.

Greedy parity: before its timings, each path samples ``--parity-rows`` conditions greedily in fp32 and must
give the tokens of :func:`clipgen.sample.sample_tokens_uncached`, the reference loop (the whole sequence
recomputed for every token), and (``greedy_matches_plain``) those of the plain cached loop. The reference is also timed (``speedup``) where ``--time-reference`` says:
by default on CPU only, at the first batch size (or each of ``--reference-batch-sizes``); at paper size on a GPU
it would take minutes.

The bound each batch size is measured against (``bound``): a single-token step must read the weights it
uses (:func:`gpt_shapes.decode_step_parameters` x 2 bytes in bf16) plus the filled KV cache
(2 x layers x rows x width x filled positions x 2 bytes), and compute 2 x those parameters x rows plus
4 x layers x rows x width x filled positions FLOPs; it takes at least max(bytes / ``--bandwidth``,
FLOPs / ``--peak-flops``), by default 4.8e12 B/s (an H200's HBM3e) and 989e12 FLOP/s (H100/H200 dense
bf16). Summed over an image's steps this gives ``images_per_s`` (the roofline bound), beside the memory-
and compute-only bounds; a path's ``of_bound`` is its images/s over the roofline bound. ``--profile`` adds
the kernels that ran in one call (:mod:`kernel_profile`). Token sampling only: the VQGAN decode is left
out. Prints one JSON line; ``--out`` also writes it, after every path.

    python benchmarks/sample.py [--presets tiny,mid] [--batch-sizes 64,256] [--paths plain,graph-kernel]
                                [--out benchmarks/results/sample.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from gpt_shapes import decode_step_parameters, gpt_shape  # beside this script
from kernel_profile import kernel_times
from run_info import Report

from clipgen.models.gpt import GPT, GPTShape
from clipgen.sample import Sampling, sample_tokens, sample_tokens_uncached
from clipgen.sample_graphed import kernel_runs, sample_tokens_graphed

PATHS = ("plain", "graph-whole", "graph-bucket", "graph-exact", "graph-kernel", "graph")  # safest first
CPU_BATCH = {"tiny": 32, "mid": 4, "base": 2, "paper": 1}


def sample(path: str, model: GPT, cond: torch.Tensor, s: Sampling, cache_dtype, bucket: int) -> torch.Tensor:
    """One call of ``path`` (see the module doc)."""
    cuda = cond.device.type == "cuda"
    if path == "plain":
        return sample_tokens(model, cond, s, cache_dtype=cache_dtype)
    if path == "graph" and cuda:
        return sample_tokens_graphed(model, cond, s, cache_dtype=cache_dtype)
    attention = {"graph": "auto", "graph-whole": "bucket"}.get(path, path.removeprefix("graph-"))
    if path == "graph-whole":
        bucket = model.shape.seq_len
    return sample_tokens_graphed(model, cond, s, cache_dtype=cache_dtype, attention=attention, bucket=bucket,
                                 graphs=cuda)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def conditions(batch: int, dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)


def bound(shape: GPTShape, step_parameters: int, batch: int, cfg_scale: float, bytes_per_value: int,
          bandwidth: float, peak_flops: float) -> dict:
    """The fastest sampling the hardware allows at this batch size (see the module doc)."""
    rows = batch * (2 if cfg_scale != 1.0 else 1)
    kv_per_position = 2 * shape.n_layer * rows * shape.n_embd * bytes_per_value
    memory = compute = roofline = total_bytes = 0.0
    for position in range(shape.n_prefix, shape.n_prefix + shape.n_tokens - 1):
        filled = position + 1
        step_bytes = step_parameters * bytes_per_value + kv_per_position * filled
        step_flops = 2 * step_parameters * rows + 4 * shape.n_layer * rows * shape.n_embd * filled
        memory, compute = memory + step_bytes / bandwidth, compute + step_flops / peak_flops
        roofline += max(step_bytes / bandwidth, step_flops / peak_flops)
        total_bytes += step_bytes
    return {"images_per_s": round(batch / roofline, 1), "memory_bound_images_per_s": round(batch / memory, 1),
            "compute_bound_images_per_s": round(batch / compute, 1),
            "gb_per_step": round(total_bytes / (shape.n_tokens - 1) / 1e9, 3),
            "bandwidth": bandwidth, "peak_flops": peak_flops}


def bench_preset(preset: str, args, device: torch.device, report: Report) -> None:
    shape = gpt_shape(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(shape).eval()
    cuda = device.type == "cuda"
    batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [CPU_BATCH[preset]]
    step_parameters = decode_step_parameters(model)
    row = {"preset": preset, "parameters": sum(p.numel() for p in model.parameters()),
           "decode_step_parameters": step_parameters, "tokens": shape.n_tokens, "cfg_scale": args.cfg_scale,
           "top_k": args.top_k, "dtype": "bf16" if cuda else "fp32", "bucket": args.bucket,
           "bounds": {}, "reference": None, "paths": {}}
    report.add(row)
    for batch in batches:
        if args.bandwidth:
            row["bounds"][str(batch)] = bound(shape, step_parameters, batch, args.cfg_scale, 2 if cuda else 4,
                                              args.bandwidth, args.peak_flops)
    settings = Sampling(temperature=1.0, top_k=args.top_k, cfg_scale=args.cfg_scale)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    cache_dtype = torch.bfloat16 if cuda else None
    greedy = Sampling(greedy=True, cfg_scale=args.cfg_scale)
    parity_cond = conditions(args.parity_rows, shape.cond_dim, device, seed=1)
    want = sample_tokens_uncached(model, parity_cond, greedy)  # fp32, as every path's parity run
    plain = sample_tokens(model, parity_cond, greedy)  # the same matrix shapes as every cached path
    time_reference = args.time_reference == "yes" or (args.time_reference == "auto" and not cuda)
    if time_reference:
        row["reference"] = {}  # batch size -> images/s
        reference_batches = [int(b) for b in args.reference_batch_sizes.split(",")] if args.reference_batch_sizes \
            else batches[:1]
        for batch in reference_batches:
            cond = conditions(batch, shape.cond_dim, device)
            seconds = timed(lambda cond=cond: sample_tokens_uncached(model, cond, settings), device)  # once: slow
            row["reference"][str(batch)] = round(batch / seconds, 4)
            report.save()
    for path in args.paths.split(","):
        result = row["paths"][path] = {}
        try:
            if path == "graph" and cuda:  # probes the Triton kernel: last, as a crash there ends the process
                row["graph_attention"] = "kernel" if kernel_runs(model.head.weight.device, torch.bfloat16) \
                    else "bucket"
            got = sample(path, model, parity_cond, greedy, None, args.bucket)
            result["greedy_parity"] = bool(torch.equal(got, want))
            # a near-tie can flip one argmax between the reference's matrix shapes and a cached step's;
            # the cached paths share theirs, so this says whether a mismatch is the path's own doing
            result["greedy_matches_plain"] = bool(torch.equal(got, plain))
            for batch in batches:
                cond = conditions(batch, shape.cond_dim, device)

                def call(cond=cond, path=path):
                    with autocast:
                        sample(path, model, cond, settings, cache_dtype, args.bucket)

                call()  # warm-up: compiles and captures
                best = min(timed(call, device) for _ in range(args.repeats))
                entry = {"images_per_s": round(batch / best, 2),
                         "ms_per_step": round(1000 * best / shape.n_tokens, 3)}
                if str(batch) in row["bounds"]:
                    entry["of_bound"] = round(batch / best / row["bounds"][str(batch)]["images_per_s"], 3)
                if row["reference"] and str(batch) in row["reference"]:
                    entry["speedup"] = round(batch / best / row["reference"][str(batch)], 1)
                result[str(batch)] = entry
                report.save()
        except Exception as exc:  # noqa: BLE001 - report it and go on: the other paths' numbers still count
            result["error"] = f"{type(exc).__name__}: {exc}"[:400]
            report.save()
    if args.profile and cuda:
        row["profile"] = profile_sampling(model, conditions(batches[-1], shape.cond_dim, device), settings, autocast)
        report.save()


def profile_sampling(model: GPT, cond: torch.Tensor, s: Sampling, autocast) -> dict:
    """Kernel times of one batch through the library's graphed path, and through the same static steps run
    eagerly (every kernel visible to the profiler, whatever it sees inside graphs)."""
    out = {"batch_size": len(cond)}
    for name, graphs in (("graphed", True), ("static_steps_eager", False)):
        try:
            with autocast:
                out[name] = kernel_times(lambda graphs=graphs: sample_tokens_graphed(
                    model, cond, s, cache_dtype=torch.bfloat16, graphs=graphs))
        except Exception as exc:  # noqa: BLE001 - a diagnosis only
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--batch-sizes", default="", help="comma-separated; default 64,256 on CUDA, "
                        f"one per preset on CPU {CPU_BATCH}")
    parser.add_argument("--paths", default="", help=f"comma-separated from {list(PATHS)}; default: all on "
                        "CUDA, plain,graph-bucket,graph-exact on CPU")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--bucket", type=int, default=16, help="positions per graph for graph-bucket")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parity-rows", type=int, default=2)
    parser.add_argument("--time-reference", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--reference-batch-sizes", default="", help="comma-separated batch sizes to time the "
                        "reference at (each once: it is slow); default the first of --batch-sizes")
    parser.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in B/s for the bound; "
                        "default 4.8e12 (H200) on CUDA, none on CPU")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 FLOP/s for the bound")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="on CUDA, also record the kernel times of one "
                        "call at the largest batch size (graphed, and the same steps eagerly)")
    parser.add_argument("--out", default=None, help="also write the JSON here (rewritten after every path)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        args.batch_sizes = args.batch_sizes or "64,256"
        args.bandwidth = 4.8e12 if args.bandwidth is None else args.bandwidth
    args.paths = args.paths or (",".join(PATHS) if device.type == "cuda" else "plain,graph-bucket,graph-exact")
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {list(PATHS)}")
    report = Report("sample", device, {"bandwidth": args.bandwidth, "peak_flops": args.peak_flops}, args.out)
    for preset in args.presets.split(","):
        bench_preset(preset, args, device, report)
    report.print()


if __name__ == "__main__":
    main()

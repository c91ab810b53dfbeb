"""Benchmark: transformer training throughput (tokens/s, MFU) and the share of step time spent on data.

Runs the real training loop (:func:`clipgen.train.gpt_trainer.fit`) on in-memory pairs shaped like the caches
(unit-norm embeddings, random token grids) for each gpt preset (shapes from :mod:`gpt_shapes`), at each
batch size (``--batch-sizes``, the global batch of one optimiser step) and micro-batch (``--micro-batch``:
0 = the whole batch at once, else gradient accumulation over micro-batches of that size), with and without
``train.compile`` (``--compile no,yes``). The first half of ``--steps`` is warm-up (compilation included);
the numbers are the loop's own means over the second half.

MFU (model FLOP utilisation) is ``6 x parameters x tokens/s`` over ``--peak-flops`` (default 989e12, the
dense bf16 peak of an H100 or H200): the forward and backward matrix products of every parameter once per
token, not counting attention's own products (``attention_flops_share`` says how much those add).
``speed_options`` lists what the loop used: precision, fused AdamW, whether SDPA's causal attention can run
FlashAttention at this width (checked by running it with only that kernel allowed), compilation, pinned
batches and the host waits per step (none: losses are read once per log window). ``--profile`` adds the
kernels a few eager steps ran (:mod:`kernel_profile`). Prints one JSON line; ``--out`` also writes it,
after every row.

    python benchmarks/train_gpt.py [--presets tiny,mid] [--steps 20] [--batch-sizes 64] [--micro-batch 0]
                                   [--precisions auto] [--compile no] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from gpt_shapes import gpt_shape  # beside this script
from kernel_profile import kernel_times
from run_info import Report

from clipgen.config import GPTConfig, TrainConfig
from clipgen.data.images_array import ArrayBatches
from clipgen.host_memory import keep_freed_memory
from clipgen.models.gpt import GPT
from clipgen.presets import PRESETS
from clipgen.train import loop
from clipgen.train.gpt_trainer import Pairs, _step, fit, make_optimizer, token_cross_entropy
from clipgen.train.overlap import PinnedRows

CPU_BATCH = {"tiny": 64, "mid": 8, "base": 4, "paper": 2}


def flash_attention_runs(preset: str, device: torch.device) -> bool | None:
    """Whether the training attention (causal, no mask) runs with FlashAttention as the only SDPA kernel
    allowed, at this preset's width and heads, in bf16; None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = gpt_shape(preset)
    one_layer = GPT(dataclasses.replace(shape, n_layer=1)).to(device)
    cond = F.normalize(torch.randn(2, shape.cond_dim, device=device), dim=-1)
    tokens = torch.randint(0, shape.vocab_size, (2, shape.n_tokens), device=device)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            one_layer(cond, tokens).float().square().mean().backward()
        return True
    except RuntimeError:
        return False


def profile_training(preset: str, batch: int, device: torch.device, steps: int = 3) -> dict:
    """Kernel times of ``steps`` eager training steps of the loop's own step function, after two warm-up
    steps: which kernels the step's time goes to, and how long the GPU idled (wall minus busy)."""
    shape = gpt_shape(preset)
    cfg, train = GPTConfig(**{**PRESETS["gpt"][preset], "batch_size": batch}), TrainConfig()
    info = loop.DistInfo(0, 1, device, False)
    model = GPT(shape).to(device).train()
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)
    n = 4 * batch
    rows = PinnedRows((F.normalize(torch.randn(n, shape.cond_dim, generator=g), dim=-1),
                       torch.randint(0, shape.vocab_size, (n, shape.n_tokens), generator=g)), batch, device)
    batches = ArrayBatches(torch.arange(n).numpy(), batch, 0, 0, 1, None)
    step = lambda: _step(model, model, opt, cfg.lr, rows, batches, cfg, train, info, None, token_cross_entropy)  # noqa: E731
    for _ in range(2):
        step()
    times = kernel_times(lambda: [step() for _ in range(steps)])
    # any wait for the device inside a step, ours or PyTorch's own (at these sizes, not the test's)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = sorted({f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}" for w in caught
                    if "synchroniz" in str(w.message).lower()})
    return {"preset": preset, "batch_size": batch, "steps": steps, "host_waits_in_a_step": waits, **times}


def bench(preset: str, batch: int, micro: int, precision: str, compiled: bool, steps: int, peak: float,
          tmp: Path) -> dict:
    shape = gpt_shape(preset)
    n = max(4 * batch, 512)
    g = torch.Generator().manual_seed(0)
    pairs = Pairs([f"k{i:06d}" for i in range(n)], F.normalize(torch.randn(n, shape.cond_dim, generator=g), dim=-1),
                  torch.randint(0, shape.vocab_size, (n, shape.n_tokens), generator=g))
    cfg = GPTConfig(**{**PRESETS["gpt"][preset], "steps": steps, "batch_size": batch, "warmup_steps": 1})
    grad_accum = batch // micro if micro else 1
    if compiled:
        torch.compiler.reset()  # compile for these shapes alone, as a fresh training process would
    train = TrainConfig(log_every=max(1, steps // 2), ckpt_every=10**9, precision=precision,
                        grad_accum=grad_accum, compile=compiled)
    # all cores, whatever the load average says (free_cpu_threads would read the previous run as load)
    result = fit(cfg, train, pairs, tmp, vocab_size=shape.vocab_size, progress=False, cpu_threads=os.cpu_count())
    last = json.loads((tmp / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(tmp)  # the final checkpoint: ~4 GB at paper size
    parameters = result.summary["parameters"]
    attention = 12 * shape.n_layer * shape.seq_len * shape.n_embd  # per token, forward and backward
    return {"preset": preset, "tokens": shape.n_tokens, "batch_size": batch, "micro_batch": batch // grad_accum,
            "parameters": parameters, "tokens_per_s": round(last["tokens_per_s"], 1),
            "step_ms": round(1000 * last["step_seconds"], 1), "data_wait_fraction": round(last["data_fraction"], 4),
            "mfu": round(6 * parameters * last["tokens_per_s"] / peak, 4),
            "attention_flops_share": round(attention / (6 * parameters), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="", help=f"comma-separated; default 64 on CUDA, {CPU_BATCH} on CPU")
    parser.add_argument("--micro-batch", type=int, default=0, help="0: whole batch; else grad accumulation")
    parser.add_argument("--precisions", default="auto",
                        help="comma-separated, each of auto/fp32/bf16; e.g. fp32,auto compares them side by side")
    parser.add_argument("--compile", default="no", help="comma-separated no/yes: train.compile off, on")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 FLOP/s for MFU")
    parser.add_argument("--profile", action="store_true", help="on CUDA, also record the kernel times of a "
                        "few eager steps of the first preset at the first batch size")
    parser.add_argument("--out", default=None, help="also write the JSON here (rewritten after every row)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kept = keep_freed_memory()  # as a pipeline step sets it (CLIPGEN_MALLOC=default leaves glibc's defaults)
    report = Report("train_gpt", device, {"steps": args.steps, "peak_flops": args.peak_flops,
                                          "kept_freed_memory": kept}, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            flash = flash_attention_runs(preset, device)
            batches = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else \
                [64 if device.type == "cuda" else CPU_BATCH[preset]]
            for precision in args.precisions.split(","):
                for compiled in (c == "yes" for c in args.compile.split(",")):
                    for batch in batches:
                        options = {"precision": precision, "compile": compiled, "fused_adamw": True,
                                   "flash_attention": flash, "pinned_batches": device.type == "cuda",
                                   "host_waits_per_step": 0}
                        out = Path(tmp) / f"{preset}-{precision}-{compiled}-{batch}"
                        try:
                            row = bench(preset, batch, args.micro_batch, precision, compiled, args.steps,
                                        args.peak_flops, out)
                        except Exception as exc:  # noqa: BLE001 - report it; the other rows still count
                            row = {"preset": preset, "batch_size": batch, "error": f"{type(exc).__name__}: {exc}"[:400]}
                        report.add({**row, "speed_options": options})
            if args.profile and device.type == "cuda" and "profile" not in report.body:
                try:
                    report.body["profile"] = profile_training(preset, batches[0], device)
                except Exception as exc:  # noqa: BLE001 - a diagnosis only
                    report.body["profile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                report.save()
    report.print()


if __name__ == "__main__":
    main()

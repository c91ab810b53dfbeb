"""``fit()`` for the conditional transformer, from the embedding and token caches only.

Training pairs are (CLIP image embedding, token grid), joined by key; no image is decoded and no caption
is read. Each step:

* bridges the embedding (:func:`clipgen.models.gpt.bridge`) and drops a fraction of conditions to the
  learned null embedding (for classifier-free guidance);
* takes the next-token cross-entropy over all image tokens;
* every ``consistency_every`` steps, when ``consistency_weight > 0``, adds the paper's second loss: the
  predicted token distribution is decoded differentiably (straight-through Gumbel-softmax through the
  frozen VQGAN decoder), encoded by the frozen CLIP image encoder, and ``1 - cos`` to the (un-bridged)
  conditioning embedding is penalised. Rows whose condition was dropped are left out of it.

AdamW (no decay on biases, norms, embeddings of position and null), linear warm-up then cosine, gradient
clipping, bf16 autocast on CUDA and on CPUs with AMX, DDP under torchrun, exact resume (weights, optimiser,
step, RNG, data position), a progress bar, validation loss on held-out keys and ``metrics.jsonl``. The output
folder holds ``model.safetensors`` + ``config.json`` (:func:`clipgen.models.gpt.load_gpt`) and ``summary.json``.

Speed on a GPU: a step is queued without the host ever waiting for it (batches from pinned memory, losses
summed on the device and read once per log window: :mod:`clipgen.train.overlap`), attention is SDPA's
causal kernel with no mask (FlashAttention on CUDA), AdamW is fused, and ``train.compile`` compiles the
blocks and the loss with ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from clipgen.config import GPTConfig, TrainConfig, to_dict
from clipgen.data.images_array import ArrayBatches
from clipgen.models.gpt import GPT, GPTShape, bridge, save_gpt
from clipgen.train import loop
from clipgen.train.ema import WeightAverage
from clipgen.train.overlap import PinnedRows, WindowMeans

CODE_VERSION = "1"
VAL_MAX = 1024  # held-out pairs scored for the validation loss


class Pairs(NamedTuple):
    keys: list[str]
    cond: torch.Tensor  # float32 [N, D], unit norm
    tokens: torch.Tensor  # int64 [N, T]


def join_by_key(emb_keys: list[str], emb: np.ndarray, tok_keys: list[str], tokens: np.ndarray
                ) -> tuple[Pairs, dict[str, int]]:
    """Inner join of the two caches on ``key`` (sorted by key); counts what either side lacks."""
    row_of = {k: i for i, k in enumerate(tok_keys)}
    shared = sorted(k for k in emb_keys if k in row_of)
    emb_row = {k: i for i, k in enumerate(emb_keys)}
    e_idx = np.array([emb_row[k] for k in shared], dtype=np.int64)
    t_idx = np.array([row_of[k] for k in shared], dtype=np.int64)
    pairs = Pairs(shared, torch.from_numpy(np.ascontiguousarray(emb[e_idx], dtype=np.float32)),
                  torch.from_numpy(np.ascontiguousarray(tokens[t_idx], dtype=np.int64)))
    return pairs, {"pairs": len(shared), "only_embedding": len(emb_keys) - len(shared),
                   "only_tokens": len(tok_keys) - len(shared)}


class Consistency(NamedTuple):
    """The frozen models the embedding-consistency loss runs through."""

    vqgan: torch.nn.Module  # clipgen.models.vqgan.VQGAN
    clip: Any  # clipgen.clip.ClipModel
    tau: float = 1.0


def consistency_loss(logits: torch.Tensor, target: torch.Tensor, parts: Consistency) -> torch.Tensor:
    """``1 - cos(CLIP(decode(gumbel_st(logits))), target)``, averaged; differentiable in ``logits``."""
    onehot = F.gumbel_softmax(logits.float(), tau=parts.tau, hard=True, dim=-1)  # straight-through
    images = parts.vqgan.decode_soft(onehot)  # [-1, 1]
    pixels = parts.clip.normalize_pixels(images.float().add(1).div(2))
    emb = F.normalize(parts.clip.net.encode_image(pixels).float(), dim=-1)
    return (1 - (emb * target).sum(-1)).mean()


class FitResult(NamedTuple):
    path: Path
    step: int
    summary: dict[str, Any]
    model: GPT  # unwrapped, eval mode, on every rank


def model_shape(cfg: GPTConfig, vocab_size: int, n_tokens: int, cond_dim: int) -> GPTShape:
    return GPTShape(vocab_size=vocab_size, n_tokens=n_tokens, cond_dim=cond_dim, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_embd=cfg.n_embd, n_prefix=cfg.n_prefix, dropout=cfg.dropout,
                    add_cond_to_tokens=cfg.add_cond_to_tokens, rope_2d=cfg.rope_2d)


def _run_config(cfg: GPTConfig, train: TrainConfig, shape: GPTShape) -> dict[str, Any]:
    return {"code_version": CODE_VERSION, "shape": dataclasses.asdict(shape), "gpt": dataclasses.asdict(cfg),
            "train": to_dict(train, output_only=True)}  # runtime-only keys may change on resume


def make_optimizer(model: GPT, cfg: GPTConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in ("pos_emb",)]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in ("pos_emb",))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)


def fit(cfg: GPTConfig, train: TrainConfig, data: Pairs, out_dir: Path, *, vocab_size: int,
        heldout: Pairs | None = None, consistency: Consistency | None = None,
        on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
        cpu_threads: int | None = None) -> FitResult:
    """Train (or resume) the transformer into ``out_dir``; see the module docstring."""
    with loop.training_process(cpu_threads) as info:
        return _fit(cfg, train, data, Path(out_dir), vocab_size, heldout, consistency, on_step, progress, info)


def _fit(cfg, train, data: Pairs, out_dir: Path, vocab_size, heldout, consistency, on_step, progress,
         info: loop.DistInfo) -> FitResult:
    if len(data.keys) == 0:
        raise ValueError("no training pairs: the embedding and token caches share no key")
    micro = loop.micro_batch_size(cfg.batch_size, "gpt.batch_size", train.grad_accum, info.world_size)
    shape = model_shape(cfg, vocab_size, data.tokens.shape[1], data.cond.shape[1])
    run_config = _run_config(cfg, train, shape)
    loop.seed_everything(train.seed)  # the same seed on every rank: identical initial weights
    raw = GPT(shape).to(info.device)
    opt = make_optimizer(raw, cfg)
    average = WeightAverage(raw, cfg.weight_average) if cfg.weight_average > 0 else None
    step, position, seconds = 0, None, 0.0
    ckpt = loop.latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        loop.check_same_config(ckpt, run_config)
        raw.load_state_dict(loop.load_weights(ckpt, "model"))
        if average is not None:
            average.load_state_dict(loop.load_weights(ckpt, "ema"))
        state = loop.load_train_state(ckpt)
        opt.load_state_dict(state["optimizers"]["gpt"])
        rngs = state["rng"]
        loop.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        step, position, seconds = int(state["step"]), state["data"], float(state.get("train_seconds", 0.0))
    model = DDP(raw) if info.world_size > 1 else raw
    cross_entropy = torch.compile(token_cross_entropy) if train.compile else token_cross_entropy
    batches = ArrayBatches(np.arange(len(data.keys)), micro, train.seed, info.rank, info.world_size, position)
    rows = PinnedRows((data.cond, data.tokens), micro, info.device)
    metrics = loop.MetricsLog(out_dir / "metrics.jsonl", info.is_main, resume_step=step)
    window = WindowMeans(info.device)
    bar = tqdm(total=cfg.steps, initial=step, desc="train-gpt", disable=not (progress and info.is_main),
               mininterval=2.0)
    model.train()
    with compiled_blocks(raw, train.compile):
        while step < cfg.steps:
            lr = loop.cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            with_consistency = consistency is not None and cfg.consistency_weight > 0 \
                and step % cfg.consistency_every == 0
            logs, data_seconds = _step(model, raw, opt, lr, rows, batches, cfg, train, info,
                                       consistency if with_consistency else None, cross_entropy)
            if average is not None:
                average.update(raw)
            step += 1
            window.add(logs, data_seconds)  # stays on the device: no wait here
            bar.update(1)
            if step % train.log_every == 0 or step == cfg.steps:
                means, window_seconds = window.flush(cfg.batch_size * shape.n_tokens)
                seconds += window_seconds
                record = {"step": step, "lr": lr, "train_seconds": seconds, **means}
                if heldout is not None and len(heldout.keys) and info.is_main and \
                        loop.evaluation_due(step, cfg.steps, train.log_every):
                    record["val_loss"] = validation_loss(raw, heldout, info.device, train.precision)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['ce']:.3f}", val=f"{record.get('val_loss', float('nan')):.3f}")
            if step % train.ckpt_every == 0 or step == cfg.steps:
                window.pause()
                _save(raw, average, opt, out_dir, step, run_config, batches.position(), seconds + window.seconds,
                      info)
            if on_step is not None:
                on_step(step, logs)
            window.resume()
    bar.close()
    return _finish(raw, average, out_dir, step, seconds, heldout, run_config, info, train.precision)


def _step(model, raw: GPT, opt, lr: float, rows: PinnedRows, batches: ArrayBatches, cfg: GPTConfig,
          train: TrainConfig, info: loop.DistInfo, consistency: Consistency | None, cross_entropy
          ) -> tuple[dict[str, torch.Tensor], float]:
    """One optimiser step over ``train.grad_accum`` micro-batches, queued without waiting for the device;
    returns its scalars (device tensors) and the seconds spent fetching data."""
    data_seconds, logs = 0.0, {}
    for m in range(train.grad_accum):
        rows.wait_for_buffer()  # the device's own pace, not data time
        t_data = time.perf_counter()
        cond, tokens = rows.take(next(batches))
        data_seconds += time.perf_counter() - t_data
        sync = info.world_size == 1 or m == train.grad_accum - 1
        with (nullcontext() if sync else model.no_sync()):
            loss, logs = _loss(model, cond, tokens, cfg, train, info, consistency, cross_entropy)
            (loss / train.grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {**logs, "grad_norm": grad_norm}, data_seconds


def _loss(model, cond, tokens, cfg: GPTConfig, train: TrainConfig, info: loop.DistInfo,
          consistency: Consistency | None, cross_entropy=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and its parts, as device scalars (read once per log window, never per step)."""
    drop = torch.rand(len(cond), device=cond.device) < cfg.cond_dropout
    with loop.autocast(info.device, train.precision, matmul_bound=True):
        logits = model(bridge(cond, cfg.bridge, cfg.noise_level), tokens, drop)
        ce = (cross_entropy or token_cross_entropy)(logits, tokens)
        loss, logs = ce, {"ce": ce.detach()}
        # the consistency loss needs the kept rows on the host (one wait, on its steps only)
        if consistency is not None and bool((~drop).any()):
            c_loss = consistency_loss(logits[~drop], cond[~drop], consistency)
            loss = loss + cfg.consistency_weight * c_loss
            logs["consistency"] = c_loss.detach()
    logs["loss"] = loss.detach()
    return loss, logs


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())


@contextmanager
def compiled_blocks(model: GPT, enabled: bool):
    """Within: each transformer block runs ``torch.compile``d (``nn.Module.compile``, PyTorch's regional
    compilation recipe: the blocks are alike, so one compilation serves them all, in far less time than
    compiling the whole model). Undone on exit, so the returned model decodes eagerly. Results match the
    eager ones up to rounding."""
    if enabled:
        for block in model.blocks:
            block.compile()
    try:
        yield
    finally:
        if enabled:
            for block in model.blocks:
                block._compiled_call_impl = None  # what nn.Module.compile set: back to the eager forward


@torch.no_grad()
def validation_loss(model: GPT, pairs: Pairs, device: torch.device, precision: str = "auto",
                    batch_size: int = 256) -> float:
    """Mean next-token cross-entropy on up to ``VAL_MAX`` held-out pairs, with their real conditions."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = min(len(pairs.keys), VAL_MAX)
    for start in range(0, n, batch_size):
        cond = pairs.cond[start:min(n, start + batch_size)].to(device)
        tokens = pairs.tokens[start:min(n, start + batch_size)].to(device)
        with loop.autocast(device, precision, matmul_bound=True):
            logits = model(cond, tokens)
        total += F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum").item()
        count += tokens.numel()
    model.train(was_training)
    return total / max(1, count)


def _save(raw: GPT, average: WeightAverage | None, opt, out_dir: Path, step: int, run_config: dict, position: dict,
          seconds: float, info: loop.DistInfo) -> None:
    rngs = loop.all_rng_states(info)  # collective: every rank takes part
    if info.is_main:
        state = {"optimizers": {"gpt": opt.state_dict()}, "rng": rngs, "data": position, "train_seconds": seconds}
        weights = {"model": raw.state_dict(), **({"ema": average.state_dict()} if average is not None else {})}
        loop.save_checkpoint(out_dir / "checkpoints", step, weights, run_config, state)


def _finish(raw: GPT, average: WeightAverage | None, out_dir: Path, step: int, seconds: float,
            heldout: Pairs | None, run_config: dict, info: loop.DistInfo, precision: str) -> FitResult:
    """Save the sampling weights, the weight average where there is one, and the summary."""
    raw.eval()
    summary: dict[str, Any] = {"step": step, "train_seconds": round(seconds, 1),
                               "parameters": sum(p.numel() for p in raw.parameters())}
    if info.device.type == "cpu":  # bf16 results depend on it (summation order), so it is on record
        summary["cpu_threads"] = torch.get_num_threads()
    scored = heldout is not None and len(heldout.keys)
    if average is not None:
        if scored:  # the last step's weights, for comparison with their average
            summary["val_loss_last_weights"] = round(validation_loss(raw, heldout, info.device, precision), 4)
        average.copy_to(raw)  # from here on the model (saved and returned) holds the average
    if scored:
        summary["val_loss"] = round(validation_loss(raw, heldout, info.device, precision), 4)
    if info.is_main:
        save_gpt(raw, out_dir, extra={"step": step, "run": run_config})
        loop.write_summary(out_dir / "summary.json", summary)
    loop.barrier(info)
    return FitResult(out_dir, step, summary, raw)

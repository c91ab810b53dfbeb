"""``fit()`` for the image tokenizer: reconstruction + perceptual + PatchGAN losses, resumable, DDP-ready.

The losses follow VQGAN (Esser et al. 2021): an L1 (+ optional L2) reconstruction term, LPIPS when
``vqgan.perceptual: lpips``, the quantizer's own loss, and, from ``vqgan.disc_start`` on, a PatchGAN
hinge discriminator. The discriminator trains alone for ``vqgan.disc_warmup`` steps before its generator
term (scaled by the adaptive weight) switches on: a cold discriminator switching on at full strength is
what wrecks taming-transformers runs. ``disc_start: 0`` means no GAN at all.

``vqgan.batch_size`` is the global batch of one optimiser step; it is split over DDP ranks and
``train.grad_accum`` micro-batches, so those two only change memory use, not the maths.

The output directory holds ``model.safetensors`` + ``config.json`` (the final tokenizer, see
:func:`clipgen.models.vqgan.load_vqgan`), ``metrics.jsonl``, ``samples/*.png`` reconstruction grids and
``checkpoints/`` (see :mod:`clipgen.train.loop`). Run ``fit`` again on the same directory after a kill
and it continues from the last checkpoint to the same final step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image
from tqdm.auto import tqdm

from clipgen.config import TrainConfig, VQGANConfig, to_dict
from clipgen.data.images_array import ArrayImages, ShardStream, to_model_input
from clipgen.models import discriminator as losses
from clipgen.models.lpips import load_lpips
from clipgen.models.quantizer import CodebookUsage, codebook_stats
from clipgen.models.vqgan import VQGAN
from clipgen.train import loop

CODE_VERSION = "vqgan-1"
USAGE_WINDOW = 100  # steps over which codebook usage and perplexity are measured


class FitResult(NamedTuple):
    path: Path
    step: int
    summary: dict[str, Any]
    model: VQGAN  # the trained model (unwrapped, eval mode) on every rank


class ReconStats(NamedTuple):
    psnr: float  # dB, images in [0, 1]
    code_usage: float  # fraction of codes used at least once
    perplexity: float


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB of [-1, 1] images (computed on the [0, 1] scale, per image, then averaged)."""
    mse = ((recon.float().clamp(-1, 1) - target.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()


@torch.no_grad()
def evaluate_reconstruction(model: VQGAN, images: np.ndarray, batch_size: int = 256) -> ReconStats:
    """PSNR and codebook usage of ``model`` on uint8 [N, H, W, 3] images (e.g. the held-out split)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, counts = 0.0, torch.zeros(model.codebook_size, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = to_model_input(torch.from_numpy(images[start: start + batch_size])).to(device)
        recon, indices, _ = model(x)
        total += float(psnr(recon, x)) * len(x)
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.codebook_size).double()
    model.train(was_training)
    usage, perplexity = codebook_stats(counts)
    return ReconStats(total / max(1, len(images)), usage, perplexity)


def _run_config(cfg: VQGANConfig, train: TrainConfig, image_size: int) -> dict[str, Any]:
    return {"code_version": CODE_VERSION, "image_size": image_size, "vqgan": dataclasses.asdict(cfg),
            "train": to_dict(train, output_only=True)}  # runtime-only keys may change on resume


class _Parts(NamedTuple):
    model: VQGAN
    disc: losses.PatchDiscriminator | None
    perceptual: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None


def _build(cfg: VQGANConfig, image_size: int, device: torch.device) -> _Parts:
    perceptual = load_lpips(cfg.lpips_weights).to(device) if cfg.perceptual == "lpips" else None
    model = VQGAN(cfg, image_size).to(device)  # channels-last, see VQGAN
    gan = cfg.disc_start > 0
    # Adam(0.5, 0.9) as in taming when a GAN is in play; plain (0.9, 0.99) for a pure autoencoder.
    # fused: one kernel for all parameters (the per-tensor loop costs more than the tiny model on CPU).
    adam = dict(lr=cfg.lr, betas=(0.5, 0.9) if gan else (0.9, 0.99), fused=True)
    opt_g = torch.optim.Adam(model.parameters(), **adam)
    disc = None
    if gan:
        disc = losses.PatchDiscriminator(n_layers=losses.disc_layers_for(image_size))
        disc = disc.to(device, memory_format=torch.channels_last)
    opt_d = torch.optim.Adam(disc.parameters(), **adam) if gan else None
    return _Parts(model, disc, perceptual, opt_g, opt_d)


def _resume(parts: _Parts, ckpt: Path, run_config: dict, info: loop.DistInfo) -> tuple[int, dict, float]:
    """Load a checkpoint into ``parts``; returns (step, data position, train seconds so far)."""
    loop.check_same_config(ckpt, run_config)
    parts.model.load_state_dict(loop.load_weights(ckpt, "model"))
    state = loop.load_train_state(ckpt)
    parts.opt_g.load_state_dict(state["optimizers"]["generator"])
    if parts.disc is not None:
        parts.disc.load_state_dict(loop.load_weights(ckpt, "discriminator"))
        parts.opt_d.load_state_dict(state["optimizers"]["discriminator"])
    rngs = state["rng"]
    loop.set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    return int(state["step"]), state["data"], float(state.get("train_seconds", 0.0))


def _save(parts: _Parts, out_dir: Path, step: int, run_config: dict, position: dict, seconds: float,
          info: loop.DistInfo) -> None:
    rngs = loop.all_rng_states(info)  # collective: every rank takes part
    if not info.is_main:
        return
    weights = {"model": parts.model.state_dict()}
    optimizers = {"generator": parts.opt_g.state_dict()}
    if parts.disc is not None:
        weights["discriminator"] = parts.disc.state_dict()
        optimizers["discriminator"] = parts.opt_d.state_dict()
    state = {"optimizers": optimizers, "rng": rngs, "data": position, "train_seconds": seconds}
    loop.save_checkpoint(out_dir / "checkpoints", step, weights, run_config, state)


def _save_grid(model: VQGAN, batch: torch.Tensor, path: Path) -> None:
    """uint8 images [8, H, W, 3] in the top row, their reconstructions below."""
    device = next(model.parameters()).device
    images = to_model_input(batch).to(device)
    model.eval()
    with torch.no_grad():
        recon = model(images)[0].clamp(-1, 1)
    model.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([images, recon]).float().add(1).div(2).cpu()  # originals above, reconstructions below
    save_image(grid, path, nrow=len(images))


def _generator_loss(parts: _Parts, x: torch.Tensor, recon: torch.Tensor, q_loss: torch.Tensor,
                    gan_on: bool, cfg: VQGANConfig) -> tuple[torch.Tensor, dict[str, float]]:
    recon = recon.float()
    l1 = (recon - x).abs().mean()
    l2 = F.mse_loss(recon, x)
    rec = l1 + cfg.l2_weight * l2
    logs = {"l1": l1.item(), "l2": l2.item(), "q_loss": q_loss.item()}
    if parts.perceptual is not None:
        p_loss = parts.perceptual(recon, x).mean()
        rec = rec + cfg.perceptual_weight * p_loss
        logs["lpips"] = p_loss.item()
    loss = rec + q_loss
    if gan_on:
        parts.disc.requires_grad_(False)  # the generator term must not train the discriminator
        g_loss = losses.generator_adv_loss(parts.disc(recon))
        parts.disc.requires_grad_(True)
        weight = losses.adaptive_weight(rec, g_loss, parts.model.decoder.last_layer) * cfg.disc_weight
        loss = loss + weight * g_loss
        logs.update(g_loss=g_loss.item(), d_weight=weight.item())
    return loss, logs


def fit(cfg: VQGANConfig, train: TrainConfig, data: ArrayImages | ShardStream | np.ndarray, out_dir: Path, *,
        heldout: np.ndarray | None = None, on_step: Callable[[int, dict], None] | None = None,
        progress: bool = True, cpu_threads: int | None = None) -> FitResult:
    """Train (or resume training) the tokenizer into ``out_dir``; see the module docstring.

    ``data``: the training images (:func:`clipgen.data.images_array.open_images`, or a uint8 array).
    ``heldout``: uint8 images to report PSNR and codebook usage on at the end. ``on_step(step, logs)`` is
    called after every step (a test uses it to kill a run). ``cpu_threads``: torch threads on CPU; None
    takes the cores that are free when training starts (see :func:`clipgen.cores.free_cpu_threads`).
    """
    with loop.training_process(cpu_threads) as info:
        return _fit(cfg, train, data if not isinstance(data, np.ndarray) else ArrayImages(data),
                    Path(out_dir), heldout, on_step, progress, info)


def _fit(cfg, train, data, out_dir, heldout, on_step, progress, info: loop.DistInfo) -> FitResult:
    micro = loop.micro_batch_size(cfg.batch_size, "vqgan.batch_size", train.grad_accum, info.world_size)
    run_config = _run_config(cfg, train, data.image_size)
    loop.seed_everything(train.seed)  # the same seed on every rank: identical initial weights
    parts = _build(cfg, data.image_size, info.device)
    step, position, seconds = 0, None, 0.0
    ckpt = loop.latest_checkpoint(out_dir / "checkpoints")
    if ckpt is not None:
        step, position, seconds = _resume(parts, ckpt, run_config, info)
    # Buffers (the VQ codebook) are kept equal by the quantizer's own all-reduce, so no broadcast needed.
    wrap = (lambda m: DDP(m, broadcast_buffers=False)) if info.world_size > 1 else (lambda m: m)
    model, disc = wrap(parts.model), (wrap(parts.disc) if parts.disc is not None else None)
    batches = data.batches(micro, train.seed, info.rank, info.world_size, position)
    metrics = loop.MetricsLog(out_dir / "metrics.jsonl", info.is_main, resume_step=step)
    rolling, usage = loop.RollingMean(train.log_every), CodebookUsage(cfg.codebook_size, USAGE_WINDOW)
    warmup = max(1, min(200, cfg.steps // 20))
    preview = torch.from_numpy(heldout[:8]) if heldout is not None and len(heldout) else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train-vqgan", disable=not (progress and info.is_main),
               mininterval=2.0)
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = loop.cosine_lr(step, cfg.steps, cfg.lr, warmup)
        disc_on = cfg.disc_start > 0 and step >= cfg.disc_start
        gan_on = disc_on and step >= cfg.disc_start + cfg.disc_warmup
        for m in range(train.grad_accum):
            batch = next(batches)
            preview = batch[:8].clone() if preview is None else preview
            sync = info.world_size == 1 or m == train.grad_accum - 1  # all-reduce grads on the last only
            logs = _micro_step(parts, model, disc, to_model_input(batch).to(info.device), usage, cfg, train,
                               info, disc_on, gan_on, sync)
        _optimizer_step(parts, lr)
        step += 1
        seconds += time.perf_counter() - t0
        rolling.update(**logs, step_seconds=time.perf_counter() - t0)
        bar.update(1)
        if step % train.log_every == 0 or step == cfg.steps:
            code_usage, perplexity = usage.stats()
            record = {"step": step, "lr": lr, "code_usage": code_usage, "perplexity": perplexity,
                      "train_seconds": seconds, **rolling.means()}
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.1f}", usage=f"{code_usage:.0%}")
        if step % train.ckpt_every == 0 or step == cfg.steps:
            _save(parts, out_dir, step, run_config, batches.position(), seconds, info)
            if info.is_main:
                _save_grid(parts.model, preview, out_dir / "samples" / f"recon_{step:07d}.png")
        if on_step is not None:
            on_step(step, logs)
    bar.close()
    batches.close()
    return _finish(parts.model, out_dir, step, seconds, heldout, info)


def _micro_step(parts: _Parts, model, disc, x: torch.Tensor, usage: CodebookUsage, cfg: VQGANConfig,
                train: TrainConfig, info: loop.DistInfo, disc_on: bool, gan_on: bool, sync: bool) -> dict:
    """Forward and backward of one micro-batch for the generator (and the discriminator once it is on)."""
    with (nullcontext() if sync else model.no_sync()):
        with loop.autocast(info.device, train.precision):
            recon, indices, q_loss = model(x)
        loss, logs = _generator_loss(parts, x, recon, q_loss, gan_on, cfg)
        (loss / train.grad_accum).backward()
    usage.update(indices)
    logs.update(loss=loss.item(), psnr=psnr(recon.detach(), x).item())
    if disc_on:
        with (nullcontext() if sync else disc.no_sync()):
            with loop.autocast(info.device, train.precision):
                # one forward over real and fake together: DDP expects one forward per backward
                real_logits, fake_logits = disc(torch.cat([x, recon.detach().float()])).chunk(2)
                d_loss = losses.hinge_d_loss(real_logits.float(), fake_logits.float())
            (d_loss / train.grad_accum).backward()
        logs["d_loss"] = d_loss.item()
    return logs


def _optimizer_step(parts: _Parts, lr: float) -> None:
    for opt in (parts.opt_g, parts.opt_d):
        if opt is None:
            continue
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)


def _finish(model: VQGAN, out_dir: Path, step: int, seconds: float, heldout: np.ndarray | None,
            info: loop.DistInfo) -> FitResult:
    model.eval()
    summary: dict[str, Any] = {"step": step, "train_seconds": round(seconds, 1),
                               "grid_size": model.grid_size, "codebook_size": model.codebook_size}
    if heldout is not None and len(heldout):
        stats = evaluate_reconstruction(model, heldout)
        summary["heldout"] = {"psnr": round(stats.psnr, 3), "code_usage": round(stats.code_usage, 4),
                              "perplexity": round(stats.perplexity, 1), "images": len(heldout)}
    if info.is_main:
        model.save_pretrained(out_dir, extra={"step": step, "code_version": CODE_VERSION})
        loop.write_summary(out_dir / "summary.json", summary)
    loop.barrier(info)
    return FitResult(out_dir, step, summary, model)

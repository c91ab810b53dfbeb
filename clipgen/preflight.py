"""What a pipeline needs from outside its config, checked once before the first stage starts.

:func:`clipgen.validate.validate` catches impossible values; this catches a config that is valid but cannot
run here: data that cannot be read, weights files that are missing, more devices than GPUs, evaluation with
nothing to prompt. Each failure is one :class:`ConfigError` line that names the key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from clipgen.clip import ClipLoadError, check_clip_model, check_clip_source
from clipgen.config import PipelineConfig
from clipgen.data.ingest import IngestError, check_source
from clipgen.errors import ConfigError
from clipgen.metrics import MIN_IMAGES_PER_SET, check_inception_weights
from clipgen.pipeline import STAGES, plan


def check_inputs(cfg: PipelineConfig, stages: Iterable[str] = STAGES) -> None:
    """Raise ConfigError if one of ``stages`` would fail on its inputs; builds and writes nothing. Only the
    stages asked for are checked: ``--stages ingest`` runs on a download host without the CLIP weights."""
    stages = set(stages)
    if "ingest" in stages and not plan(cfg)["shards"].is_complete():  # once ingested, the source may go
        try:
            check_source(cfg.data)
        except IngestError as exc:
            raise ConfigError(str(exc)) from exc
    if stages & {"embed", "train-gpt", "generate", "evaluate"}:  # the stages that load the CLIP
        _check_clip("clip", cfg.clip.model, cfg.clip.pretrained)
    v = cfg.vqgan
    if "train-vqgan" in stages and v.perceptual == "lpips" and not Path(v.lpips_weights).expanduser().exists():
        raise ConfigError(f"vqgan.lpips_weights: {v.lpips_weights} does not exist; give the LPIPS-VGG weights "
                          "file or folder (clipgen/models/lpips.py), or set vqgan.perceptual: none")
    if stages & {"train-vqgan", "train-gpt"}:
        _check_devices(cfg.train.devices)
    if "evaluate" in stages:
        if cfg.eval.scoring_clip:
            _check_clip("eval.scoring_clip", cfg.eval.scoring_clip, cfg.eval.scoring_clip_pretrained)
        if cfg.eval.inception_weights:
            try:
                check_inception_weights(cfg.eval.inception_weights)
            except (OSError, ValueError) as exc:
                raise ConfigError(str(exc)) from exc
        _check_eval_prompts(cfg)


def _check_devices(devices: int) -> None:
    """One training process per device: a GPU each, or on a machine without GPUs a core each."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if devices > gpus:
            raise ConfigError(f"train.devices: {devices} asked for, but this machine has {gpus} GPU(s)")
    elif devices > (os.cpu_count() or 1):
        raise ConfigError(f"train.devices: {devices} asked for, but this machine has no GPU and {os.cpu_count()} "
                          "cores (each device is a CPU training process there); set train.devices: 1")


def _check_clip(key: str, model: str, pretrained: str | None) -> None:
    """``key`` names the model (clip.model, eval.scoring_clip); its weights are ``key`` + _pretrained."""
    model_key, weights_key = (f"{key}.model", f"{key}.pretrained") if key == "clip" else (key, f"{key}_pretrained")
    for name, check in ((model_key, lambda: check_clip_model(model)),
                        (weights_key, lambda: check_clip_source(model, pretrained))):
        try:
            check()
        except ClipLoadError as exc:
            raise ConfigError(f"{name}: {exc}") from exc


def _check_eval_prompts(cfg: PipelineConfig) -> None:
    """World data has its own prompts and URL lists their captions; a folder has only what the config lists."""
    d = cfg.data
    if cfg.eval.protocol == "captions":
        if d.source != "world" and d.caption_column is None:
            raise ConfigError(f"eval.protocol: captions draws an image for each held-out caption, and data.source "
                              f"{d.source!r} has none (set data.caption_column for a captioned URL list); use "
                              "eval.protocol: prompts with eval.prompts or sample.prompts")
        if cfg.eval.captions < MIN_IMAGES_PER_SET:
            raise ConfigError(f"eval.captions: {cfg.eval.captions} is under the {MIN_IMAGES_PER_SET} images per set "
                              "that FD, KID and precision/recall need")
        return
    listed = cfg.eval.prompts or ([] if d.source == "world" or d.caption_column is not None else cfg.sample.prompts)
    if listed and len(listed) * cfg.eval.images_per_prompt < MIN_IMAGES_PER_SET:
        raise ConfigError(f"eval.images_per_prompt: {cfg.eval.images_per_prompt} image(s) for each of "
                          f"{len(listed)} prompt(s) is under the {MIN_IMAGES_PER_SET} per set that FD, KID and "
                          "precision/recall need; raise it or list more prompts")
    if listed or d.source == "world" or d.caption_column is not None:
        return
    raise ConfigError(f"eval.prompts: empty, and data.source {d.source!r} has no captions to evaluate with "
                      "(set data.caption_column for a captioned URL list); list the evaluation prompts under "
                      "eval.prompts or sample.prompts")

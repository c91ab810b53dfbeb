"""Every impossible config value, found before any stage runs, in one line that names the key.

:func:`validate` reads only the config (it runs on every load); :func:`check_inputs` also looks at what the
config points at outside itself (data, weights files, GPUs) and runs once before a pipeline starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from clipgen.errors import ConfigError

if TYPE_CHECKING:
    from clipgen.config import PipelineConfig, SampleConfig

# A run name becomes a folder under runs/: one plain path component, never '.', '..' or a separator.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# a clip.pretrained / eval.scoring_clip_pretrained value that names a file rather than an open_clip tag
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: PipelineConfig) -> None:
    """Impossible values, checked across fields. Each message names the key and what would be valid."""
    check(RUN_NAME.fullmatch(cfg.name) is not None and cfg.name not in (".", ".."), "name",
          f"{cfg.name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/'); it becomes "
          "runs/<name>. To put a run elsewhere set run_dir")
    _validate_data(cfg)
    _validate_vqgan(cfg)
    _validate_gpt(cfg)
    _validate_training(cfg)
    validate_sample(cfg.sample, lambda name: f"sample.{name}")
    check(cfg.sample.bridge != "noise" or (cfg.gpt.bridge == "noise" and cfg.gpt.noise_level > 0), "sample.bridge",
          "noise adds the transformer's training noise (gpt.noise_level with gpt.bridge: noise), and this "
          "transformer is trained without it; choose none or knn, or train with gpt.bridge: noise")
    e = cfg.eval
    check(e.images_per_prompt >= 1, "eval.images_per_prompt", "must be >= 1")
    check(e.held_out_images_per_prompt >= 0, "eval.held_out_images_per_prompt", "must be >= 0")
    check(e.captions >= 1, "eval.captions", "must be >= 1")
    check(e.max_reference_images >= 1, "eval.max_reference_images", "must be >= 1")
    check(-1.0 <= e.memorisation_threshold <= 1.0, "eval.memorisation_threshold", "is a cosine: must be in [-1, 1]")
    check(e.r_precision_distractors >= 1, "eval.r_precision_distractors", "must be >= 1")
    check(e.nn_pairs >= 0, "eval.nn_pairs", "must be >= 0")
    check(cfg.orchestration.max_workers >= 1, "orchestration.max_workers", "must be >= 1")


def _validate_data(cfg: PipelineConfig) -> None:
    d = cfg.data
    check(d.source == "world" or d.path is not None, "data.path", f"required when data.source is {d.source!r}")
    check(d.image_size >= 8 and d.image_size % cfg.vqgan.downsample == 0, "data.image_size",
          f"must be >= 8 and a multiple of the VQGAN downsampling factor {cfg.vqgan.downsample}")
    check(d.shard_size > 0, "data.shard_size", "must be > 0")
    check(0.0 <= d.heldout_fraction < 1.0, "data.heldout_fraction", "must be in [0, 1)")
    check(d.source == "world" or d.heldout_fraction > 0, "data.heldout_fraction",
          "must be > 0 for folder and URL data: evaluation needs held-out images")
    check(d.max_pixels >= 1 and d.min_side >= 1, "data.min_side", "min_side and max_pixels must be >= 1")
    for name in ("workers", "download_part_size", "download_timeout"):
        check(getattr(d, name) >= 1, f"data.{name}", "must be >= 1")
    for i, combo in enumerate(d.world.held_out_combos):
        check(len(combo.split()) == 2, f"data.world.held_out_combos[{i}]", f"{combo!r} must be 'COLOUR SHAPE'")
    for name in ("n_captioned", "n_train", "n_heldout", "n_judge"):
        check(getattr(d.world, name) > 0, f"data.world.{name}", "must be > 0")
    check(cfg.clip.batch_size >= 1, "clip.batch_size", "must be >= 1")
    check(cfg.clip.ivfpq_min_size >= 1, "clip.ivfpq_min_size", "must be >= 1")


def _validate_vqgan(cfg: PipelineConfig) -> None:
    v = cfg.vqgan
    check(v.base_channels >= 1, "vqgan.base_channels", "must be >= 1")
    check(len(v.channel_mult) >= 1 and min(v.channel_mult) >= 1, "vqgan.channel_mult",
          "needs at least one entry, each >= 1")
    check(all(r >= 1 for r in v.attn_resolutions), "vqgan.attn_resolutions", "each entry must be >= 1")
    check(v.n_res_blocks >= 1, "vqgan.n_res_blocks", "must be >= 1")
    check(v.codebook_size >= 2, "vqgan.codebook_size", "must be >= 2")
    check(v.code_dim >= 1, "vqgan.code_dim", "must be >= 1")
    if v.quantizer == "fsq":
        check(len(v.fsq_levels) >= 1 and min(v.fsq_levels) >= 2, "vqgan.fsq_levels", "needs entries, each >= 2")
        product = 1
        for level in v.fsq_levels:
            product *= level
        check(product == v.codebook_size, "vqgan.codebook_size",
              f"with quantizer fsq it must equal the product of vqgan.fsq_levels {v.fsq_levels} = {product}")
    check(0.0 <= v.ema_decay < 1.0, "vqgan.ema_decay", "must be in [0, 1)")
    for name in ("beta", "dead_code_threshold", "l2_weight", "perceptual_weight", "disc_weight", "disc_start",
                 "disc_warmup"):
        check(getattr(v, name) >= 0, f"vqgan.{name}", "must be >= 0")
    check(v.perceptual == "none" or v.lpips_weights is not None, "vqgan.lpips_weights",
          "required when vqgan.perceptual is 'lpips' (weights cannot be downloaded); or set perceptual: none")


def _validate_gpt(cfg: PipelineConfig) -> None:
    g = cfg.gpt
    for name in ("n_layer", "n_head", "n_embd", "n_prefix", "consistency_every"):
        check(getattr(g, name) >= 1, f"gpt.{name}", "must be >= 1")
    check(g.n_embd % g.n_head == 0, "gpt.n_embd", f"{g.n_embd} must be divisible by gpt.n_head={g.n_head}")
    check(not g.rope_2d or g.n_embd // g.n_head % 4 == 0, "gpt.rope_2d",
          f"needs a head width (gpt.n_embd / gpt.n_head = {g.n_embd / g.n_head:g}) divisible by 4")
    check(0.0 <= g.dropout < 1.0, "gpt.dropout", "must be in [0, 1)")
    check(0.0 <= g.cond_dropout < 1.0, "gpt.cond_dropout", "must be in [0, 1)")
    check(0.0 <= g.noise_level <= 2.0, "gpt.noise_level", "must be in [0, 2]")
    check(0.0 <= g.weight_average < 1.0, "gpt.weight_average", "must be in [0, 1) (0 = no weight average)")
    for name in ("weight_decay", "warmup_steps", "consistency_weight"):
        check(getattr(g, name) >= 0, f"gpt.{name}", "must be >= 0")
    check(g.grad_clip > 0, "gpt.grad_clip", "must be > 0 (the largest gradient norm kept)")


def _validate_training(cfg: PipelineConfig) -> None:
    t = cfg.train
    check(t.devices >= 1, "train.devices", "must be >= 1")
    check(t.nodes >= 1, "train.nodes", "must be >= 1")
    check(t.nodes == 1 or t.rdzv_endpoint is not None, "train.rdzv_endpoint",
          "required when train.nodes > 1 (HOST:PORT of the first node)")
    for name in ("grad_accum", "log_every", "ckpt_every"):
        check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
    check(t.cpu_threads is None or t.cpu_threads >= 1, "train.cpu_threads", "must be >= 1 or null")
    trained = {"vqgan": cfg.vqgan, "gpt": cfg.gpt, "data.judge": cfg.data.judge, "clip.toy": cfg.clip.toy}
    for name, section in trained.items():
        check(section.steps > 0, f"{name}.steps", "must be > 0")
        check(section.batch_size > 0, f"{name}.batch_size", "must be > 0")
        check(section.lr > 0, f"{name}.lr", "must be > 0")
    parts = t.devices * t.nodes * t.grad_accum
    for name in ("vqgan", "gpt"):  # trained data-parallel: each rank and micro-step takes an equal share
        batch = trained[name].batch_size
        check(batch % parts == 0, f"{name}.batch_size", f"{batch} must be divisible by train.devices x train.nodes "
              f"x train.grad_accum = {parts}")


def validate_sample(s: SampleConfig, key: Callable[[str], str]) -> None:
    """Sampling settings, named by ``key(field)``: the config key, or the CLI flag that set it."""
    check(s.n_per_prompt >= 1, key("n_per_prompt"), "must be >= 1")
    check(s.temperature > 0, key("temperature"), "must be > 0 (lower is more conservative; 1 = the model's own)")
    check(0.0 < s.top_p <= 1.0, key("top_p"), "must be in (0, 1] (1 = off)")
    check(s.top_k >= 0, key("top_k"), "must be >= 0 (0 = off)")
    check(s.cfg_scale >= 0, key("cfg_scale"), "must be >= 0 (1 = no guidance)")
    check(s.rerank_candidates >= 0, key("rerank_candidates"), "must be >= 0 (0 = off)")
    check(0.0 <= s.knn_spread <= 1.0, key("knn_spread"), "must be in [0, 1] (0 = the text unchanged)")
    check(s.knn_temperature > 0, key("knn_temperature"), "must be > 0")
    check(s.knn_shrink >= 0, key("knn_shrink"), "must be >= 0 (0 = off)")
    check(0 <= s.knn_centre_margin <= 2, key("knn_centre_margin"), "must be in [0, 2] (a cosine margin; 0 = off)")
    check(s.knn_centre_prior >= 0, key("knn_centre_prior"), "must be >= 0")
    check(s.knn_variation == "weighted" or s.knn_centre_margin > 0, key("knn_variation"),
          "own needs sample.knn_centre_margin > 0 (the text's own images are those within that margin)")
    check(s.rerank_prompt_weight >= 0, key("rerank_prompt_weight"), "must be >= 0")
    check(0 <= s.rerank_prompt_margin <= 2, key("rerank_prompt_margin"), "must be in [0, 2] (a cosine margin)")
    check(s.knn_k >= 1, key("knn_k"), "must be >= 1")

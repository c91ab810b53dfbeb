"""Typed pipeline configuration: one dataclass per YAML section, one loader, dotted overrides, presets.

A pipeline file (``pipelines/*.yaml``) maps 1:1 onto :class:`PipelineConfig`. Every key is checked before
any work starts: an unknown key, a wrong type or an impossible value raises :class:`ConfigError` naming
the dotted key and what is allowed. Sections may name a ``preset`` (see :mod:`clipgen.presets`); the
preset's values are applied first and explicit keys override them.

Fields whose metadata says ``affects_output=False`` (worker counts, log intervals) are excluded from the
content-addressed stage ids, so changing them never invalidates a cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipgen.errors import ConfigError
from clipgen.presets import expand_presets
from clipgen.validate import validate


def runtime_only(default: Any) -> Any:
    """A field that changes how a stage runs, never what it produces (excluded from stage ids)."""
    return field(default=default, metadata={"affects_output": False})


# ----------------------------------------------------------------------------------------- sections
@dataclass
class WorldConfig:
    """The synthetic shapes world. Only used when ``data.source: world``."""

    n_captioned: int = 20000  # toy-CLIP pretraining split (captions used)
    n_train: int = 30000  # CLIP-GEN training split (captions never read by the generator)
    n_heldout: int = 2000  # evaluation split
    n_judge: int = 20000  # labeled split for the attribute judge
    # (colour, shape) combinations that never appear in the caption-free training split
    held_out_combos: list[str] = field(default_factory=lambda: ["red triangle", "blue star", "yellow circle", "purple square"])
    seed: int = 0


@dataclass
class JudgeConfig:
    """The attribute classifier that scores generated shapes-world images (independent of CLIP)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass
class DataConfig:
    source: Literal["world", "folder", "urls"] = "world"
    path: str | None = None  # folder of images, or URL list (.csv/.tsv/.parquet) for source=urls
    url_column: str = "url"
    caption_column: str | None = None  # copied into the shard json for evaluation only; never trained on
    image_size: int = 32
    shard_size: int = 2000  # samples per tar; folders and URL lists: about half to all of it (key ranges)
    heldout_fraction: float = 0.02  # folder/urls: fraction of keys reserved for evaluation
    max_pixels: int = 89_478_485  # larger images are skipped as decompression bombs (PIL's own limit)
    min_side: int = 8  # images with a smaller side are skipped as too small to be useful
    workers: int = runtime_only(2)
    download_part_size: int = runtime_only(10000)  # urls: rows per img2dataset call; a killed run keeps finished parts
    download_timeout: int = 10  # urls: seconds per request before it counts as failed
    world: WorldConfig = field(default_factory=WorldConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class ToyClipConfig:
    """Contrastive pretraining of the bundled toy CLIP on the captioned world split."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@dataclass
class ClipConfig:
    model: str = "toy-clip"  # an open_clip architecture name, or 'toy-clip' for the bundled one
    pretrained: str | None = None  # open_clip tag ('openai'), a local checkpoint path, or null
    batch_size: int = runtime_only(256)
    # the embed stage's image decoder: OpenCV on Python threads, or nvImageCodec (JPEGs on the GPU; clipgen[gpu])
    decoder: Literal["opencv", "nvimgcodec"] = "opencv"
    index: Literal["auto", "flat", "ivfpq"] = "auto"  # faiss index type; auto = flat below ivfpq_min_size
    ivfpq_min_size: int = 200_000
    toy: ToyClipConfig = field(default_factory=ToyClipConfig)


@dataclass
class VQGANConfig:
    preset: str | None = None
    base_channels: int = 16
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4])  # len-1 halvings => f4
    n_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    quantizer: Literal["vq", "fsq"] = "fsq"
    codebook_size: int = 1000  # VQ: entries; FSQ: must equal the product of fsq_levels
    code_dim: int = 8  # VQ: l2-normalised low-dimensional code size
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    beta: float = 0.25  # VQ commitment weight
    ema_decay: float = 0.99  # VQ EMA codebook decay
    dead_code_threshold: float = 0.1  # VQ: restart codes used less than this share of a uniform code's use
    l2_weight: float = 1.0  # reconstruction = L1 + l2_weight * L2
    perceptual: Literal["none", "lpips"] = "none"
    perceptual_weight: float = 1.0
    lpips_weights: str | None = None  # LPIPS-VGG weights: a file or folder (clipgen/models/lpips.py); no download
    disc_start: int = 0  # step at which the discriminator starts training; 0 = no GAN loss
    disc_warmup: int = 500  # discriminator-only steps before its generator term switches on
    disc_weight: float = 0.8
    steps: int = 2000
    batch_size: int = 16  # global batch per optimiser step (split over ranks and grad_accum)
    lr: float = 2e-3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class GPTConfig:
    preset: str | None = None
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192
    n_prefix: int = 2  # projected CLIP-embedding prefix tokens
    add_cond_to_tokens: bool = True  # also add a projection of the embedding to every token embedding
    rope_2d: bool = False  # also rotate attention's queries and keys by each token's grid row and column
    dropout: float = 0.0
    cond_dropout: float = 0.1  # rate of replacing the condition by the learned null embedding (CFG)
    bridge: Literal["none", "noise"] = "noise"  # train-time modality-gap bridging
    noise_level: float = 0.2
    consistency_weight: float = 0.0  # the paper's embedding-consistency loss; 0 = off
    consistency_every: int = 4
    steps: int = 3000
    batch_size: int = 64
    lr: float = 6e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_average: float = 0.0  # decay of an exponential moving average of the weights, which then sample; 0 = off


@dataclass
class TrainConfig:
    """Settings shared by every training stage."""

    devices: int = runtime_only(1)
    nodes: int = runtime_only(1)
    rdzv_endpoint: str | None = runtime_only(None)  # HOST:PORT of the first node's torchrun rendezvous (nodes > 1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA; on CPU see loop.autocast
    grad_accum: int = 1
    seed: int = 0
    log_every: int = runtime_only(50)
    ckpt_every: int = runtime_only(500)
    # torch threads per training process on CPU; null = the cores that are free when training starts. Pin it
    # for reproducible bf16 results (their summation order depends on it) or beside other work.
    cpu_threads: int | None = runtime_only(None)
    # train-gpt: torch.compile the transformer's blocks and loss (a GPU speed-up; needs Triton and a C
    # compiler, costs a minute or so of compilation; results differ from eager only by rounding)
    compile: bool = runtime_only(False)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    n_per_prompt: int = 8
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    cfg_scale: float = 1.0
    bridge: Literal["none", "noise", "knn"] = "knn"
    knn_k: int = 2048  # train image embeddings a text's ``knn`` draws come from (clipgen.generate.bridge_text)
    knn_temperature: float = 0.05  # their weights: softmax(cos / temperature); lower keeps the closest ones
    knn_spread: float = 0.25  # how far a draw's neighbour moves the text: spread * (neighbour - mean) / RMS of that
    # a text's step is spread * n / (n + knn_shrink), n = 1 / sum(weight ** 2) its neighbours' effective count:
    # short for a text that few train images match (a held-out combination); 0 = off
    knn_shrink: float = 0.0
    # the draws' centre moves from the text towards the plain mean of its neighbours within this cosine of the
    # nearest one, by c / (c + knn_centre_prior) for c of them; 0 = the text is the centre
    knn_centre_margin: float = 0.0
    knn_centre_prior: float = 500.0
    # weighted: every draw's variation comes from a neighbour picked by weight; own: the share of draws that the
    # centre moved by (c / (c + prior)) takes it from the text's own images, picked uniformly
    knn_variation: Literal["weighted", "own"] = "weighted"
    rerank_candidates: int = 0  # sample this many per image and keep the CLIP-best; 0 = off
    # CLIP-best against the text, the draw's own bridged condition, the two together, or the condition among
    # those near the best match to the text (clipgen.generate)
    rerank_against: Literal["prompt", "condition", "both", "prompt_then_condition"] = "prompt"
    rerank_prompt_weight: float = 1.0  # both: the prompt's weight beside the condition's 1 (clipgen.generate)
    rerank_prompt_margin: float = 0.08  # prompt_then_condition: how far (cosine) below the best match to the text
    seed: int = 0


@dataclass
class EvalConfig:
    # prompts: images_per_prompt images for each of eval.prompts (empty: every colour-shape pair on the world, else
    # held-out captions) against the first max_reference_images held-out images. captions: the zero-shot protocol
    # of captioned data (COCO-30k style): one image for each of the first eval.captions held-out captions, scored
    # against the real images of the same keys
    protocol: Literal["prompts", "captions"] = "prompts"
    captions: int = 30000  # captions protocol: up to this many held-out images and their captions
    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 16
    # shapes world: held-out accuracy is scored on this many images of each held-out colour-shape combination,
    # the samples' own plus more drawn with the next seed (a few combinations of 16 images are ±5 points);
    # every other figure reads the samples alone
    held_out_images_per_prompt: int = 48
    max_reference_images: int = 10000  # held-out real images the samples are compared with (the first ones)
    inception_weights: str | None = None  # local Inception weights: adds standard FID/IS
    scoring_clip: str | None = None  # a second, independent open_clip model for CLIP score and R-precision
    scoring_clip_pretrained: str | None = None
    memorisation_threshold: float = 0.95
    r_precision_distractors: int = 99
    nn_pairs: int = 8  # most-memorised samples shown beside their nearest training image


@dataclass
class OrchestrationConfig:
    task_runner: Literal["threads", "dask"] = runtime_only("threads")
    max_workers: int = runtime_only(2)
    dask_address: str | None = runtime_only(None)  # null = start a local Dask cluster
    # a run that reaches an artifact another process is building waits for it and reuses it; false: fail at once
    wait_for_locks: bool = runtime_only(True)
    # on a CPU host, run the independent chains (judge; pretrain-clip + embed; train-vqgan + tokenize) at once, each
    # in a process on cores of its own (clipgen.side_by_side); false: one after the other, on every core
    side_by_side: bool = runtime_only(True)


@dataclass
class PipelineConfig:
    name: str = "shapes"
    run_dir: str | None = None  # default: runs/<name> beside the working directory
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    @property
    def run_path(self) -> Path:
        """Absolute: task runners whose workers start elsewhere (Dask) must find the same folder."""
        return (Path(self.run_dir) if self.run_dir else Path("runs") / self.name).absolute()


# ------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Load a pipeline YAML (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pipeline file {str(path)!r} not found; pass a file such as pipelines/shapes.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = build(PipelineConfig, expand_presets(raw), "")
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``4``, ``[1, 2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. gpt.n_layer=4")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    where = prefix.rstrip(".") or "the pipeline file"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {prefix}{key!r}{hint}; allowed keys in {where}: {sorted(fields)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` (int/float/str/bool, Optional, list, Literal, dataclass)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose from {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def to_dict(section: Any, output_only: bool = False) -> dict[str, Any]:
    """A section as a plain dict; ``output_only`` drops runtime-only fields (for stage ids)."""
    out = {}
    for f in dataclasses.fields(section):
        if output_only and not f.metadata.get("affects_output", True):
            continue
        value = getattr(section, f.name)
        out[f.name] = to_dict(value, output_only) if dataclasses.is_dataclass(value) else value
    return out


def config_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML, every key in section order: :func:`load_config` reads it back as ``cfg``."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)

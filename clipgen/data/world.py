"""The synthetic shapes world: the embedded, offline dataset of the default pipeline.

Each image shows one coloured shape (circle, square, triangle, star) of varied size, position and
rotation on a dark, desaturated background, with ground-truth attributes and a templated caption. Four
splits are drawn from the same distribution but from separate random streams:

- ``captioned``: toy-CLIP pretraining (the only split whose captions anything trains on);
- ``train``: what CLIP-GEN trains on, caption-free; ``WorldConfig.held_out_combos`` never appear here;
- ``heldout``: evaluation; ``judge``: labeled images for the attribute judge (:mod:`clipgen.judge`).

Sample ``index`` of a split is drawn from its own generator seeded by ``(seed, split, index)``, so every
sample is reproducible on its own: any chunk of a split can be rendered in any process, in any order,
and the bytes never change.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from clipgen.config import DataConfig, WorldConfig
from clipgen.data.shard_parts import ShardPlan, manifest_from_records, worker_pool, write_part, write_plans
from clipgen.data.shards import Sample

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Saturated and far apart in hue, so each stays distinct from the others and from any grey background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 190, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 210),
    "orange": (250, 135, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZE_WORDS: tuple[str, ...] = ("small", "medium-sized", "large")
BACKGROUND_NAMES: tuple[str, ...] = ("black", "dark", "grey")
# every attribute a caption can name, with its values in label-id order (the judge has one head each)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZE_WORDS,
                                          "background": BACKGROUND_NAMES}
SPLITS: tuple[str, ...] = ("captioned", "train", "heldout", "judge")
SHARD_SPLITS: tuple[str, ...] = ("captioned", "train", "heldout")  # the judge split stays in memory

MIN_SIZE, MAX_SIZE = 0.2, 0.42  # circumradius as a fraction of the image side
SMALL_BELOW, LARGE_FROM = 0.27, 0.35  # size-word thresholds on that radius
# Sizes and background levels this close to a word's threshold are redrawn, so every size and background word
# can be read off its image: without the margins a third of a pixel of radius, or the tint, decided the word,
# and even a well-trained judge named only 94% of sizes and 93% of backgrounds as the captions did.
SIZE_MARGIN = 0.012
BACKGROUND_LEVELS = (15.0, 85.0)  # mean grey level before the tint
BLACK_BELOW, GREY_FROM, LEVEL_MARGIN = 35.0, 60.0, 5.0
MARGIN = 0.02  # keeps antialiased edges off the border
SUPERSAMPLE = 4
COLOUR_JITTER = 12  # per-channel, so colour names cover a small range rather than one exact RGB
STAR_INNER_RATIO = 0.42
# Rotational symmetry period per shape (degrees): rotating beyond it would only repeat an image.
ROTATION_PERIOD = {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0}

CAPTION_TEMPLATES = (
    "{a} {colour} {shape}",
    "{a} {size} {colour} {shape}",
    "{a} {colour} {shape} on a {background} background",
    "{a} {size} {colour} {shape} on a {background} background",
    "a picture of {a} {colour} {shape}",
    "a picture of {a} {size} {colour} {shape}",
    "a photo of {a} {colour} {shape} on a {background} background",
    "an image of {a} {size} {colour} {shape}",
    "a drawing of {a} {colour} {shape}",
    "a {background} background with {a} {colour} {shape}",
)


@dataclass(frozen=True)
class Attributes:
    """Everything needed to render one world image; ``render`` is a pure function of it."""

    shape: str
    colour: str
    size: float  # circumradius / image side, in [MIN_SIZE, MAX_SIZE]
    cx: float  # centre, as fractions of the image side; the shape always lies fully inside
    cy: float
    rotation: float  # degrees
    background_rgb: tuple[int, int, int]
    background_name: str  # "black", "dark" or "grey": usable in a caption without a colour word
    fill_rgb: tuple[int, int, int]  # the named colour with a little jitter
    gradient: tuple[float, float]  # background brightness change across the image in x and y

    @property
    def size_word(self) -> str:
        if self.size < SMALL_BELOW:
            return "small"
        return "large" if self.size >= LARGE_FROM else "medium-sized"

    @property
    def combo(self) -> str:
        return f"{self.colour} {self.shape}"

    def label(self, attribute: str) -> str:
        """The word a caption uses for ``attribute`` (a key of ATTRIBUTES)."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size_word,
                "background": self.background_name}[attribute]


class WorldArrays(NamedTuple):
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: dict[str, np.ndarray]  # attribute -> int64 [N], indices into ATTRIBUTES[attribute]


def prompt_attributes(prompt: str) -> dict[str, str]:
    """The world attributes a prompt names, e.g. ``{"size": "small", "colour": "red", "shape": "circle"}``.

    Size words count as written in captions ("medium-sized"; a bare "medium" too); a background word counts
    only when "background" follows it, so "a black ..." never reads as a background.
    """
    words = prompt.lower().replace(",", " ").split()
    named = {}
    for attribute in ("shape", "colour"):
        found = [w for w in words if w in ATTRIBUTES[attribute]]
        if found:
            named[attribute] = found[0]
    size = [w for w in words if w in SIZE_WORDS or w == "medium"]
    if size:
        named["size"] = "medium-sized" if size[0] == "medium" else size[0]
    background = [w for w, after in zip(words, words[1:], strict=False) if w in BACKGROUND_NAMES and after.startswith("background")]
    if background:
        named["background"] = background[0]
    return named


# ------------------------------------------------------------------------------------ attributes
def parse_combos(combos: Sequence[str]) -> frozenset[str]:
    """Check each ``'COLOUR SHAPE'`` combo names a known colour and shape; return them normalised."""
    parsed = set()
    for combo in combos:
        parts = combo.split()
        if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
            raise ValueError(f"held-out combo {combo!r} must be 'COLOUR SHAPE' with COLOUR in "
                             f"{list(COLOURS)} and SHAPE in {list(SHAPES)}")
        parsed.add(" ".join(parts))
    return frozenset(parsed)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one sample; crc32 (not ``hash``) so it is stable across processes."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _away_from(rng: np.random.Generator, low: float, high: float, thresholds: tuple[float, ...],
               margin: float) -> float:
    """Uniform on ``[low, high)`` without the values within ``margin`` of a threshold (redrawn)."""
    while True:
        value = float(rng.uniform(low, high))
        if all(abs(value - t) >= margin for t in thresholds):
            return value


def _background(rng: np.random.Generator) -> tuple[tuple[int, int, int], str]:
    # Dark and only faintly tinted, so every shape colour stands out by both brightness and hue.
    level = _away_from(rng, *BACKGROUND_LEVELS, (BLACK_BELOW, GREY_FROM), LEVEL_MARGIN)
    rgb = tuple(int(round(level + t)) for t in rng.uniform(-8, 8, size=3))
    name = "black" if level < BLACK_BELOW else "dark" if level < GREY_FROM else "grey"
    return rgb, name


def sample_attributes(rng: np.random.Generator, excluded: frozenset[str] = frozenset()) -> Attributes:
    """Draw one image's attributes; (colour, shape) pairs in ``excluded`` are redrawn."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if f"{colour} {shape}" not in excluded:
            break
    size = _away_from(rng, MIN_SIZE, MAX_SIZE, (SMALL_BELOW, LARGE_FROM), SIZE_MARGIN)
    cx, cy = (float(v) for v in rng.uniform(size + MARGIN, 1 - size - MARGIN, size=2))
    rotation = float(rng.uniform(0, ROTATION_PERIOD[shape]))
    background_rgb, background_name = _background(rng)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill_rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter, strict=True))
    gradient = tuple(float(g) for g in rng.uniform(-14, 14, size=2))
    return Attributes(shape, colour, size, cx, cy, rotation, background_rgb, background_name, fill_rgb, gradient)


# ------------------------------------------------------------------------------------- rendering
def _polygon(n_points: int, cx: float, cy: float, radii: Sequence[float], rotation: float) -> list[tuple]:
    """Vertices of a regular polygon (or star, with alternating radii), pointing up before rotation."""
    points = []
    for i in range(n_points):
        angle = math.radians(rotation + 360.0 * i / n_points) - math.pi / 2
        r = radii[i % len(radii)]
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _shape_mask(attrs: Attributes, image_size: int) -> np.ndarray:
    """Antialiased coverage in [0, 1], [H, W]: drawn at SUPERSAMPLE x, then box-filtered down."""
    side = image_size * SUPERSAMPLE
    cx, cy, r = attrs.cx * side, attrs.cy * side, attrs.size * side
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif attrs.shape == "square":
        draw.polygon(_polygon(4, cx, cy, [r], attrs.rotation + 45.0), fill=255)  # 45: axis-aligned at 0
    elif attrs.shape == "triangle":
        draw.polygon(_polygon(3, cx, cy, [r], attrs.rotation), fill=255)
    elif attrs.shape == "star":
        draw.polygon(_polygon(10, cx, cy, [r, r * STAR_INNER_RATIO], attrs.rotation), fill=255)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}; choose from {list(SHAPES)}")
    small = mask.resize((image_size, image_size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_array(attrs: Attributes, image_size: int = 32) -> np.ndarray:
    """The image as uint8 [H, W, 3]."""
    ramp = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    shade = attrs.gradient[0] * ramp[None, :] + attrs.gradient[1] * ramp[:, None]  # [H, W]
    background = np.asarray(attrs.background_rgb, np.float32) + shade[..., None]
    alpha = _shape_mask(attrs, image_size)[..., None]
    image = background * (1.0 - alpha) + np.asarray(attrs.fill_rgb, np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(attrs: Attributes, image_size: int = 32) -> Image.Image:
    """The image as an RGB PIL image of ``image_size`` x ``image_size`` pixels."""
    return Image.fromarray(render_array(attrs, image_size), "RGB")


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A templated caption that always contains the colour and shape words verbatim."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    first_word = attrs.size_word if "{size}" in template else attrs.colour
    article = "an" if first_word[0] in "aeiou" else "a"
    return template.format(a=article, size=attrs.size_word, colour=attrs.colour, shape=attrs.shape,
                           background=attrs.background_name)


# ----------------------------------------------------------------------------------------- splits
def split_size(world: WorldConfig, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown world split {split!r}; choose from {list(SPLITS)}")
    return getattr(world, f"n_{split}")


def _excluded(world: WorldConfig, split: str) -> frozenset[str]:
    combos = parse_combos(world.held_out_combos)  # validated for every split, so typos fail early
    return combos if split == "train" else frozenset()


def split_attributes(world: WorldConfig, split: str, index: int) -> tuple[Attributes, str]:
    """Attributes and caption of sample ``index`` of ``split``."""
    rng = sample_rng(world.seed, split, index)
    attrs = sample_attributes(rng, _excluded(world, split))
    return attrs, caption(attrs, rng)


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _samples_chunk(job: tuple[WorldConfig, str, int, int, int]) -> list[Sample]:
    world, split, image_size, start, stop = job
    combos = parse_combos(world.held_out_combos)
    samples = []
    for index in range(start, stop):
        attrs, text = split_attributes(world, split, index)
        meta = {"split": split, "shape": attrs.shape, "colour": attrs.colour, "size": round(attrs.size, 4),
                "size_word": attrs.size_word, "background": attrs.background_name, "caption": text,
                "held_out_combo": attrs.combo in combos}
        samples.append(Sample(f"{split}-{index:07d}", _encode_png(render_array(attrs, image_size)), "png", meta))
    return samples


def _arrays_chunk(job: tuple[WorldConfig, str, int, int, int]) -> WorldArrays:
    world, split, image_size, start, stop = job
    attrs = [split_attributes(world, split, i)[0] for i in range(start, stop)]
    images = np.stack([render_array(a, image_size) for a in attrs]) if attrs else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    labels = {name: np.array([values.index(a.label(name)) for a in attrs], np.int64)
              for name, values in ATTRIBUTES.items()}
    return WorldArrays(images, labels)


CHUNK = 2000  # samples per worker job: large enough to amortise process start, small enough to stream


def _map_chunks(fn, world: WorldConfig, split: str, image_size: int, n: int, workers: int) -> Iterator:
    """Apply ``fn`` to consecutive index chunks in order; chunks are independent, so workers only add speed."""
    jobs = [(world, split, image_size, start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    # spawn, not fork: callers may hold torch / Prefect threads, which fork would copy half-locked.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(fn, jobs)


def iter_world_split(world: WorldConfig, split: str, image_size: int, workers: int = 1) -> Iterator[Sample]:
    """The samples of one split in index order: key ``{split}-{index:07d}``, PNG image, attribute meta."""
    n = split_size(world, split)
    _excluded(world, split)
    for chunk in _map_chunks(_samples_chunk, world, split, image_size, n, workers):
        yield from chunk


def world_arrays(world: WorldConfig, split: str, image_size: int, n: int | None = None,
                 workers: int = 1) -> WorldArrays:
    """The first ``n`` images of a split with their labels, in memory (for the judge).

    ``n`` defaults to the split's configured size; a larger ``n`` simply continues the split's stream.
    """
    n = split_size(world, split) if n is None else n
    _excluded(world, split)
    chunks = list(_map_chunks(_arrays_chunk, world, split, image_size, n, workers))
    if not chunks:
        return _arrays_chunk((world, split, image_size, 0, 0))
    return WorldArrays(np.concatenate([c.images for c in chunks]),
                       {name: np.concatenate([c.labels[name] for c in chunks]) for name in ATTRIBUTES})


PART_CHUNK = 250  # samples per process-pool job inside one shard's task


def world_plans(world: WorldConfig, shard_size: int) -> list[ShardPlan]:
    """One plan per shard of every shard split: consecutive index ranges of ``shard_size`` samples."""
    plans = []
    for split in SHARD_SPLITS:
        n = split_size(world, split)
        _excluded(world, split)
        for index, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            plans.append(ShardPlan(split, index, (start, stop), (f"{split} {start}-{stop}",)))
    return plans


class WriteWorldShard(NamedTuple):
    """The world's ingest task: render one plan's index range and write its shard (a few bytes to ship)."""

    data: DataConfig
    root: str

    def __call__(self, plan: ShardPlan) -> None:
        start, stop = plan.inputs
        jobs = [(self.data.world, plan.split, self.data.image_size, first, min(first + PART_CHUNK, stop))
                for first in range(start, stop, PART_CHUNK)]
        pool = worker_pool(self.data.workers)
        chunks = pool.map(_samples_chunk, jobs) if pool else map(_samples_chunk, jobs)
        write_part(Path(self.root), plan, (sample for chunk in chunks for sample in chunk), [], Counter())


def ingest_world(data: DataConfig, root: Path, map_fn=None) -> dict:
    """Render the captioned, train and heldout splits into WebDataset shards under ``root`` + manifest, one
    shard per task through ``map_fn`` (serial when None); finished shards of an interrupted run are kept."""
    plans = world_plans(data.world, data.shard_size)
    records = write_plans(root, plans, WriteWorldShard(data, str(root)), map_fn)
    return manifest_from_records(root, "world", SHARD_SPLITS, plans, records, skipped=[])

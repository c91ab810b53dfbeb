"""Text-to-image generation from a finished run: prompts -> CLIP text embeddings -> tokens -> images.

:func:`generate` is a function over loaded models (:class:`Generator`); it never changes them. It

1. encodes the prompts with the CLIP text tower;
2. bridges the text embedding of every draw on its own towards the image embeddings the transformer was
   trained on: ``none``; ``noise`` (the training-time LAFITE perturbation at the transformer's level, fresh
   noise per draw); or ``knn``: each draw takes one of the ``k`` train image embeddings nearest the text
   (faiss index), picked with weight ``softmax(cos / temperature)``, and keeps the text as the mean but the
   neighbour's offset from the weighted mean of the ``k`` (scaled to RMS length ``spread``, shortened for a text
   that few train images match) as its variation: ``normalize(text + spread * (neighbour - mean) / rms)``,
   optionally around a centre moved from the text towards the mean of its own images (``knn_centre_margin``),
   and with as large a share of the draws taking their variation from those own images, unweighted
   (``knn_variation: own``);
3. samples token grids with the KV cache, temperature, top-k, top-p and classifier-free guidance;
4. decodes them with the VQGAN;
5. optionally draws ``rerank_candidates`` per image and keeps the one whose CLIP image embedding is
   closest to the prompt (``rerank_against: prompt``), to the draw's own bridged condition (``condition``:
   the candidates compete on matching the variation the bridge drew, so re-ranking keeps the spread), or to
   the two together (``both``: ``normalize(rerank_prompt_weight * prompt + condition)``; the text embedding
   sits nearest the smallest shapes of what it names, so a full weight keeps too many small ones), or
   ``prompt_then_condition``: of the candidates whose cosine to the prompt is within
   ``rerank_prompt_margin`` of the best one's, the closest to the draw's condition. The prompt then only
   gates (is it the right thing?) and the condition chooses among those that pass, so the pull toward the
   text's favourite sizes stops at the gate;
6. scores every image (CLIP score = 100 * max(cos, 0); the judge's verdict where the shapes world has one).

One generator seeded with ``sample.seed`` draws fixed batches in order, so the same seed and settings
(batch size included) give the same images. :func:`write_outputs` writes the PNGs and a table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipgen.config import ConfigError, SampleConfig
from clipgen.data.images_array import to_uint8
from clipgen.data.world import ATTRIBUTES
from clipgen.index import search
from clipgen.judge import accuracy_of, prompt_hits
from clipgen.models.gpt import bridge as noise_bridge
from clipgen.sample import Sampling, sample_tokens

MAX_PROMPT_CHARS = 1000


class Generator(NamedTuple):
    """The loaded models of a finished run (see :func:`load_generator`)."""

    clip: Any  # clipgen.clip.ClipModel
    vqgan: torch.nn.Module
    gpt: torch.nn.Module
    noise_level: float  # the transformer's training-time bridge level (for the ``noise`` bridge)
    index: Any = None  # clipgen.index.NeighbourIndex over the train image embeddings (``knn`` bridge)
    index_vectors: np.ndarray | None = None  # [N, D] the indexed embeddings, in index order
    judge: Any = None  # clipgen.judge.Judge on the shapes world


class Generated(NamedTuple):
    images: np.ndarray  # uint8 [P * n, H, W, 3], prompt-major
    prompts: list[str]  # one per image
    draws: list[int]  # each image's position in the run's sequence of draws (its file name's number)
    clip_scores: np.ndarray  # [P * n]
    verdict: Any  # clipgen.judge.JudgeVerdict (shape, colour, size, background per image), where a judge exists
    settings: dict[str, Any]


class PromptError(ConfigError):
    """A prompt that cannot be used, with what to change."""


def check_prompts(prompts: list[str]) -> list[str]:
    """Clean prompts (whitespace collapsed), or a PromptError that says which one is wrong and why."""
    if not prompts:
        raise PromptError("no prompts given; pass at least one, e.g. \"a red circle\"")
    cleaned = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(f"prompt {i + 1} is empty; every prompt needs some text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from the command line arrive as lone surrogates
            raise PromptError(f"prompt {i + 1} is not valid UTF-8 text: {prompt!r}") from None
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt {i + 1} has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        cleaned.append(" ".join(prompt.split()))
    return cleaned


def warn_truncated(clip, prompts: list[str]) -> list[int]:
    """Warn about each prompt longer than the CLIP's context (it reads only the start); their indices."""
    long = []
    for i, prompt in enumerate(prompts):
        count = clip.token_count(prompt)
        if count is not None and count > clip.context_length:
            long.append(i)
            warnings.warn(f"prompt {i + 1} has {count} tokens; the CLIP reads only the first {clip.context_length} "
                          f"and ignores the rest: {prompt[:60]!r}...", stacklevel=3)
    return long


def bridge_text(gen: Generator, text: torch.Tensor, s: SampleConfig, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Move unit-norm text embeddings ``[R, D]`` towards the image-embedding distribution, each row on its own
    draw, so that the draws of one prompt spread over the images it describes instead of repeating one picture.

    ``noise`` adds fresh noise per row at the transformer's training level. ``knn`` treats the ``knn_k`` train
    image embeddings nearest a text as samples of the images that text describes, weighted by
    ``softmax(cos / knn_temperature)``: each row draws one of them by weight, and its condition is the text
    moved by that neighbour's offset from their weighted mean, ``normalize(text + knn_spread * (e - mean) /
    rms)``, where ``rms`` is the weighted RMS length of the offsets. The text fixes what is drawn (the mean),
    the neighbour how this draw varies from it (size, place, background); a blend towards the neighbour itself
    would also pull towards the neighbour's own shape and colour. Dividing by ``rms`` gives every prompt steps
    of one typical length ``knn_spread``: a prompt whose combination no train image shows (a held-out pair)
    has neighbours of mixed shapes and colours, twice as spread, and unscaled steps would carry it off.

    Such a text also sits far from every train image, and its weights fall on a handful of them (an effective
    count ``n = 1 / sum(w ** 2)`` of 7-35 on the shapes run, against 500-1200 for a shown combination), whose
    offsets say more about those few images' own shape and colour than about how the text's images vary. With
    ``knn_shrink`` ``n0`` > 0 the step is trusted as an average of ``n`` samples against a prior of ``n0``:
    its length is ``knn_spread * n / (n + n0)``.

    The text need not sit at the centre of its images. A toy CLIP's "a red star" sits nearest the small red
    stars (over the shown combinations, cosine 0.825 on average against 0.803 for the large ones), so draws
    around it come out small too often. With ``knn_centre_margin`` ``m`` > 0 the draws' centre moves from the
    text towards the plain mean of the ``c`` neighbours whose cosine is within ``m`` of the nearest one's (the
    text's own images, each size as often as the train split has it), by ``t = c / (c + knn_centre_prior)``:
    ``normalize(text + t * (centre_mean - text) + step)``. A held-out pair has a few dozen such neighbours, of
    other shapes, and barely moves; a shown one has a thousand or more.

    The weights favour some of a text's own images over others (on the shapes run, the small ones and those of
    one background level or another, by prompt), and a step of ``knn_spread`` RMS lengths spans only part of
    how its images vary, so the draws also keep to the middle sizes and background levels. With
    ``knn_variation: own`` the neighbours are picked, and their mean and RMS taken, with the weights
    ``(1 - t) * w + t / c`` on the ``c`` own images: a shown combination's draws vary mostly as its own images
    do, and a held-out one (``t`` near 0) keeps its weighted neighbours."""
    if s.bridge == "none":
        return text
    if s.bridge == "noise":
        return noise_bridge(text, "noise", gen.noise_level, generator)
    if s.bridge != "knn":
        raise ValueError(f"unknown sample.bridge {s.bridge!r}; choose none, noise or knn")
    if gen.index is None or gen.index_vectors is None:
        raise ValueError("sample.bridge: knn needs the embedding cache's faiss index; none was loaded")

    unique, row_of = torch.unique(text, dim=0, return_inverse=True)  # search each distinct text once
    found = search(gen.index, unique.float().cpu().numpy(), min(s.knn_k, len(gen.index_vectors)))
    rows = np.where(found.rows >= 0, found.rows, 0)  # faiss marks missing neighbours with -1: weight 0
    cos = torch.from_numpy(found.scores).float().masked_fill(torch.from_numpy(found.rows < 0), -torch.inf)
    weights = torch.softmax(cos / s.knn_temperature, dim=-1)  # [U, k]
    trust = effective_count(weights)  # how many neighbours the softmax weights fall on (for knn_shrink)

    def neighbours(index_rows: np.ndarray) -> torch.Tensor:
        return F.normalize(torch.from_numpy(gen.index_vectors[index_rows]).float(), dim=-1)

    inside = cos >= cos.amax(-1, keepdim=True) - s.knn_centre_margin  # [U, k]: the text's own images
    count = inside.sum(-1).float()
    moved = count / (count + s.knn_centre_prior) if s.knn_centre_margin > 0 else torch.zeros_like(count)  # [U]
    if s.knn_variation == "own":  # that share of the draws vary as the text's own images do, unweighted
        own_weights = inside.float() / count[:, None]
        weights = (1 - moved[:, None]) * weights + moved[:, None] * own_weights
    # per distinct text, one at a time: the weighted mean, the RMS distance from it, the plain mean of its own
    mean, rms, own = [], [], []
    for w, r, keep in zip(weights, rows, inside, strict=True):
        vectors = neighbours(r)
        mean.append(w @ vectors)
        rms.append((w @ (vectors - mean[-1]).pow(2).sum(-1)).sqrt())
        own.append(vectors[keep].mean(0))
    mean, rms = torch.stack(mean), torch.stack(rms).clamp_min(1e-6)
    if s.knn_shrink > 0:  # shorter steps where few neighbours carry the weight
        rms = rms * (trust + s.knn_shrink) / trust
    centre = text.float()
    if s.knn_centre_margin > 0:  # towards the plain mean of its own images, by c / (c + prior) for c of them
        shift = moved[:, None] * (torch.stack(own) - unique.float().cpu())
        centre = centre + shift.to(text.device)[row_of]
    pick = torch.multinomial(weights.to(text.device)[row_of], 1, generator=generator)[:, 0].cpu()  # [R]
    row_of = row_of.cpu()
    offset = (neighbours(rows[row_of.numpy(), pick.numpy()]) - mean[row_of]) / rms[row_of, None]
    return F.normalize(centre + s.knn_spread * offset.to(text.device), dim=-1).to(text.dtype)


def effective_count(weights: torch.Tensor) -> torch.Tensor:
    """How many neighbours weights ``[..., k]`` (summing to 1) spread over: ``1 / sum(w ** 2)``."""
    return 1.0 / weights.pow(2).sum(-1)


def sampling_of(s: SampleConfig) -> Sampling:
    return Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=s.cfg_scale)


@torch.no_grad()
def generate(gen: Generator, prompts: list[str], s: SampleConfig, batch_size: int = 256) -> Generated:
    """``s.n_per_prompt`` images per prompt (see the module doc)."""
    prompts = check_prompts(prompts)
    warn_truncated(gen.clip, prompts)
    device = next(gen.gpt.parameters()).device
    text = gen.clip.encode_texts(prompts).to(device)
    rows = torch.arange(len(prompts), device=device).repeat_interleave(s.n_per_prompt * max(1, s.rerank_candidates))
    cond = bridge_text(gen, text[rows], s, torch.Generator(device=device).manual_seed(s.seed))
    prompt = text[rows]
    target = {"prompt": prompt, "condition": cond, "prompt_then_condition": cond,
              "both": F.normalize(s.rerank_prompt_weight * prompt + cond, dim=-1)}[s.rerank_against]
    gate = prompt if s.rerank_against == "prompt_then_condition" else None
    images, scores, draws = draw(gen, cond, target, s, batch_size, gate=gate)
    if s.rerank_against != "prompt":  # the CLIP score reported is always against the prompt
        scores = clip_scores(gen.clip, images, prompt[draws].cpu())
    verdict = gen.judge.predict(images) if gen.judge is not None else None
    settings = {k: v for k, v in dataclasses.asdict(s).items() if k != "prompts"} | {"batch_size": batch_size}
    return Generated(images, [p for p in prompts for _ in range(s.n_per_prompt)], draws, scores.numpy(),
                     verdict, settings)


@torch.no_grad()
def draw(gen: Generator, cond: torch.Tensor, target: torch.Tensor, s: SampleConfig, batch_size: int = 256,
         gate: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor, list[int]]:
    """One image per condition row ``cond`` ``[R, D]``: uint8 images, their CLIP scores against ``target``
    ``[R, D]`` (the prompt's text embedding, or the conditioning image's), and each kept image's position in
    the sequence of draws. With ``s.rerank_candidates`` > 1, each consecutive group of that many rows is one
    image's candidates, and the one with the best score is kept; with ``gate`` ``[R, D]`` too, only among
    those whose cosine to ``gate`` is within ``s.rerank_prompt_margin`` of their group's best.
    """
    device = cond.device
    candidates = max(1, s.rerank_candidates)
    if len(cond) % candidates:
        raise ValueError(f"{len(cond)} condition rows do not split into groups of {candidates} candidates")
    side = gen.vqgan.grid_size
    generator = torch.Generator(device=device).manual_seed(s.seed)
    images = []
    for start in range(0, len(cond), batch_size):  # fixed batches, drawn in order from one generator
        part = cond[start:start + batch_size]
        tokens = sample_tokens(gen.gpt, part, sampling_of(s), generator)
        images.append(to_uint8(gen.vqgan.decode_indices(tokens.view(len(part), side, side))))
    pixels = torch.cat(images)  # uint8 [R, H, W, 3]
    emb = gen.clip.encode_images(pixels.numpy()).cpu()  # [R, D], unit norm
    scores = 100 * cosines(emb, target).clamp(min=0)
    index = torch.arange(len(cond))
    if candidates > 1:  # keep the best of each consecutive group of candidates
        ranked = scores.view(-1, candidates)  # [R / candidates, candidates]
        if gate is not None:  # only those near their group's best match to the gate compete
            to_gate = cosines(emb, gate).view(-1, candidates)
            ranked = ranked.masked_fill(to_gate < to_gate.max(1, keepdim=True).values - s.rerank_prompt_margin, -1.0)
        index = ranked.argmax(1) + torch.arange(0, len(scores), candidates)
        pixels, scores = pixels[index], scores[index]
    return pixels.numpy(), scores, index.tolist()


def cosines(emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of unit-norm image embeddings ``[R, D]`` with ``text`` ``[R, D]`` (any norm)."""
    return (emb * F.normalize(text.float().cpu(), dim=-1)).sum(-1)


def clip_scores(clip, images: np.ndarray, text: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIP score per image: ``100 * max(cos(image, text), 0)``."""
    return 100 * cosines(clip.encode_images(images).cpu(), text).clamp(min=0)


def write_outputs(result: Generated, out_dir: Path) -> Path:
    """``out_dir/<prompt>_s<seed>_<draw>.png`` per image, ``samples.csv`` and ``samples.json`` (with settings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    seed = result.settings["seed"]
    hits = prompt_hits(result.prompts, result.verdict) if result.verdict is not None else None
    for i, (prompt, draw) in enumerate(zip(result.prompts, result.draws, strict=True)):
        name = f"{_slug(prompt)}_s{seed}_{draw:05d}.png"
        Image.fromarray(result.images[i]).save(out_dir / name)
        row = {"file": name, "prompt": prompt, "seed": seed, "draw": draw,
               "clip_score": round(float(result.clip_scores[i]), 3)}
        if hits is not None:  # what the judge read, and whether it is everything the prompt names
            row.update({f"judge_{attr}": result.verdict.of(attr)[i] for attr in ATTRIBUTES})
            row["judge_match"] = all(h[i] != 0.0 for h in hits.values())
        rows.append(row)
    with open(out_dir / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "samples.json").write_text(json.dumps({"settings": result.settings, "samples": rows}, indent=1))
    return out_dir / "samples.csv"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "prompt"


def judged_per_prompt(result: Generated) -> dict[str, dict[str, float | None]]:
    """Per prompt, the judge's accuracy on each attribute it names (None where it names none) and on shape and
    colour together (``both``). Needs the judge."""
    hits = prompt_hits(result.prompts, result.verdict)
    prompts = np.array(result.prompts, dtype=object)
    return {p: {name: accuracy_of(h[prompts == p]) for name, h in hits.items()} for p in dict.fromkeys(result.prompts)}

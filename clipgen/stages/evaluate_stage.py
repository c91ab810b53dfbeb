"""The ``evaluate`` stage: score a finished run and write ``report/<id>/metrics.json`` and ``index.html``.

It draws images with the run's sampling settings and compares them with held-out real images, by
``eval.protocol`` (:func:`evaluation_set`): ``eval.images_per_prompt`` images for each evaluation prompt, or
(``captions``, the zero-shot protocol of captioned data such as COCO-30k) one image for each held-out caption,
against the real images of the same keys. Three anchor rows put the numbers in scale, each measured
the same way and with as many images as the samples:

* **real images**: fidelity of real *train* images against the held-out reference (the floor), and the
  text metrics and memorisation of real *held-out* images (what a perfect generator would score);
* **VQGAN reconstructions** of held-out images: the best the tokenizer allows;
* **random token grids** decoded by the VQGAN: the ceiling no trained transformer should reach.

Fidelity (FD/KID/precision/recall) is measured in the run's CLIP feature space through torch-fidelity;
CLIP score and R-precision by ``eval.scoring_clip`` where one is configured, else by the run's CLIP
(flagged as flattering: that CLIP also conditioned and re-ranked the samples). On the shapes world the
judge is the independent scorer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from clipgen.artifacts import Artifact, content_digest, weights_identity
from clipgen.config import ConfigError, PipelineConfig, SampleConfig, to_dict
from clipgen.data.images_array import to_model_input, to_uint8
from clipgen.data.world import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, SIZE_WORDS
from clipgen.generate import check_prompts, generate, judged_per_prompt
from clipgen.index import search
from clipgen.judge import accuracy_of, attribute_mix, prompt_hits
from clipgen.metrics import (
    MIN_IMAGES_PER_SET,
    check_inception_weights,
    clip_score,
    fidelity_metrics,
    inception_metrics,
    r_precision,
    register_clip_extractor,
    register_judge_extractor,
    similarity_summary,
)
from clipgen.report import HEADLINE_LABELS, write_report
from clipgen.stages.clip_stage import LabeledImages, read_labeled_split
from clipgen.stages.generate_stage import load_generator

MAX_CAPTION_PROMPTS = 64  # evaluation prompts taken from held-out captions when none are configured


class ImageSet(NamedTuple):
    name: str
    images: np.ndarray  # uint8 [N, H, W, 3]
    texts: list[str]  # the text each image should match (its prompt, or its real label)
    groups: list[Any]  # each text's attribute combination: R-precision never uses a same-group distractor


def evaluate_config(cfg: PipelineConfig) -> dict[str, Any]:
    # the evaluation draws its own prompts, eval.images_per_prompt of each
    sample = {k: v for k, v in to_dict(cfg.sample).items() if k not in ("prompts", "n_per_prompt")}
    weights = {k: weights_identity(getattr(cfg.eval, k)) for k in ("inception_weights", "scoring_clip_pretrained")}
    unread = ("captions",) if cfg.eval.protocol == "prompts" else ("prompts", "max_reference_images")
    e = {k: v for k, v in to_dict(cfg.eval).items() if k not in unread}  # what the other protocol reads
    return {"eval": {**e, **weights}, "sample": sample}


def text_group(text: str, world: bool) -> Any:
    """A text's attribute combination: (colour, shape) words on the shapes world, else the text itself."""
    if not world:
        return text

    words = set(text.lower().replace(",", " ").split())
    return (next((c for c in COLOUR_NAMES if c in words), None), next((s for s in SHAPES if s in words), None))


def world_prompt(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def attribute_prompts() -> list[str]:
    """One prompt per colour-shape pair of the world that also names a size and a background, cycling through
    all nine (size, background) pairs: what the judge's size and background accuracy is measured on."""
    prompts = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOUR_NAMES for s in SHAPES):
        size, background = SIZE_WORDS[i % 3], BACKGROUND_NAMES[(i // 3) % 3]
        prompts.append(f"{'an' if size[0] in 'aeiou' else 'a'} {size} {colour} {shape} on a {background} background")
    return prompts


def eval_prompts(cfg: PipelineConfig, held_meta: list[dict]) -> list[str]:
    if cfg.eval.prompts:
        return check_prompts(cfg.eval.prompts)
    if cfg.data.source != "world" and cfg.sample.prompts and not any(m.get("caption") for m in held_meta):
        return check_prompts(cfg.sample.prompts)  # uncaptioned data: the prompts the run samples
    if cfg.data.source == "world":
        return [world_prompt(c, s) for c in COLOUR_NAMES for s in SHAPES]
    captions = list(dict.fromkeys(m["caption"] for m in held_meta if m.get("caption")))[:MAX_CAPTION_PROMPTS]
    if not captions:
        raise ConfigError("eval.prompts is empty and the held-out shards carry no captions to borrow; "
                          "list the evaluation prompts under eval.prompts or sample.prompts")
    return captions


def evaluation_set(cfg: PipelineConfig, shards: Path) -> tuple[LabeledImages, list[str], SampleConfig]:
    """The held-out reference images, the prompts to draw and the sampling settings, by ``eval.protocol``:

    * ``prompts``: ``eval.images_per_prompt`` draws of each evaluation prompt (:func:`eval_prompts`) against
      the first ``eval.max_reference_images`` held-out images;
    * ``captions``: one draw for each of the first ``eval.captions`` held-out captions, against the real images
      of the same keys (held-out images without a caption are left out of both).
    """
    e, size = cfg.eval, cfg.data.image_size
    held = read_labeled_split(shards, "heldout", size,
                              limit=e.captions if e.protocol == "captions" else e.max_reference_images)
    if not len(held.images):
        raise ConfigError(f"data.heldout_fraction: the held-out split of {shards} is empty, so there is nothing to "
                          "evaluate against; raise data.heldout_fraction or add images")
    if e.protocol == "prompts":
        return held, eval_prompts(cfg, held.meta), dataclasses.replace(cfg.sample, n_per_prompt=e.images_per_prompt)
    captioned = [i for i, m in enumerate(held.meta) if m.get("caption")]
    if len(captioned) < MIN_IMAGES_PER_SET:
        raise ConfigError(f"eval.protocol: captions found {len(captioned)} captioned image(s) among the first "
                          f"{len(held.images)} held-out ones of {shards}, under the {MIN_IMAGES_PER_SET} that FD "
                          "needs; use eval.protocol: prompts")
    held = LabeledImages(held.images[captioned], [held.meta[i] for i in captioned])
    return held, [m["caption"] for m in held.meta], dataclasses.replace(cfg.sample, n_per_prompt=1)


def real_texts(cfg: PipelineConfig, meta: list[dict]) -> list[str]:
    """What each real image shows: its caption under the captions protocol; else phrased like the world's
    evaluation prompts (else its caption, or "")."""
    if cfg.data.source == "world" and cfg.eval.protocol == "prompts":
        return [world_prompt(m["colour"], m["shape"]) for m in meta]
    return [m.get("caption") or "" for m in meta]


def distractor_pool(held_meta: list[dict], prompts: list[str]) -> list[str]:
    """R-precision's wrong answers: held-out captions (the standard pool), else the other prompts."""
    captions = [m["caption"] for m in held_meta if m.get("caption")]
    return captions or prompts


def anchor_sets(cfg: PipelineConfig, gen, held, prompts: list[str], n: int) -> list[ImageSet]:
    """Held-out real images, their VQGAN reconstructions and random token grids, ``n`` of each."""
    world = cfg.data.source == "world"
    n = min(n, len(held.images))  # a small held-out split gives fewer anchors than samples
    texts = real_texts(cfg, held.meta[:n])
    real = held.images[:n]
    vqgan, device = gen.vqgan, next(gen.vqgan.parameters()).device
    recon, noise = [], []
    generator = torch.Generator(device="cpu").manual_seed(cfg.sample.seed)
    side = vqgan.grid_size
    with torch.no_grad():
        for start in range(0, n, 256):
            batch = torch.from_numpy(real[start:start + 256])
            recon.append(to_uint8(vqgan.decode_indices(vqgan.encode(to_model_input(batch).to(device)))))
            tokens = torch.randint(vqgan.codebook_size, (len(batch), side, side), generator=generator)
            noise.append(to_uint8(vqgan.decode_indices(tokens.to(device))))
    cycled = [prompts[i % len(prompts)] for i in range(n)]
    return [ImageSet("real images", real, texts, [text_group(t, world) for t in texts]),
            ImageSet("VQGAN reconstructions", torch.cat(recon).cpu().numpy(), texts, [text_group(t, world) for t in texts]),
            ImageSet("random token grids", torch.cat(noise).cpu().numpy(), cycled, [text_group(t, world) for t in cycled])]


def scoring_clip(cfg: PipelineConfig, run_clip) -> tuple[Any, str, bool]:
    """(the CLIP that scores text alignment, its description, whether it is independent of the run)."""
    if cfg.eval.scoring_clip:
        from clipgen.clip import load_clip

        clip = load_clip(cfg.eval.scoring_clip, cfg.eval.scoring_clip_pretrained, device=run_clip.device)
        return clip, f"{cfg.eval.scoring_clip} ({cfg.eval.scoring_clip_pretrained or 'random init'})", True
    return run_clip, f"{cfg.clip.model}, the run's own CLIP (it also conditioned and re-ranked: flattering)", False


def text_alignment(clip, sets: list[ImageSet], image_emb: dict[str, torch.Tensor], pool_texts: list[str],
                   pool_groups: list[Any], distractors: int, seed: int) -> dict[str, dict[str, Any]]:
    """CLIP score and R-precision of every set, scored by ``clip`` (``image_emb``: each set's images embedded
    by it); None for a set without texts (real images of an uncaptioned folder)."""
    pool = clip.encode_texts(pool_texts).cpu()
    out = {}
    for s in sets:
        if not all(s.texts):
            out[s.name] = {"clip_score": None, "r_precision": None, "distractors": None}
            continue
        images, texts = image_emb[s.name], clip.encode_texts(s.texts).cpu()
        rp = r_precision(images, texts, pool, s.groups, pool_groups, distractors, seed)
        out[s.name] = {"clip_score": clip_score(images, texts), "r_precision": rp.value, "distractors": rp.distractors}
    return out


def held_out_groups(held_combos: list[str]) -> set[tuple[str, ...]]:
    """The held-out combinations ('red triangle') as the (colour, shape) groups of :func:`text_group`."""
    return {tuple(c.lower().split()) for c in held_combos}


def judged(judge, s: ImageSet, held_combos: list[str]) -> dict[str, Any]:
    """Judge accuracy on every attribute the texts name (over the texts that name it; None where none does),
    on shape and colour together (``both``), on both for seen and held-out combinations, and the ``mix`` of
    sizes and backgrounds the judge reads (:func:`clipgen.judge.attribute_mix`)."""
    verdict = judge.predict(s.images)
    hits = prompt_hits(s.texts, verdict)
    held = held_out_groups(held_combos)
    is_held = np.array([g in held for g in s.groups])
    return {**{name: accuracy_of(h) for name, h in hits.items()}, "seen": accuracy_of(hits["both"][~is_held]),
            "held_out": accuracy_of(hits["both"][is_held]), "held_out_images": int(is_held.sum()),
            "mix": attribute_mix(verdict, judge.labels), "images": len(s.texts)}


HELD_OUT_SET = "held-out combinations"


def more_held_out_draws(cfg: PipelineConfig, gen, samples: ImageSet, settings) -> ImageSet | None:
    """The samples' images of held-out colour-shape combinations plus more of each, drawn with the next seed, up
    to ``eval.held_out_images_per_prompt`` per combination; None when that adds none (or no prompt is one)."""
    held = held_out_groups(cfg.data.world.held_out_combos)
    rows = [i for i, g in enumerate(samples.groups) if g in held]
    prompts = list(dict.fromkeys(samples.texts[i] for i in rows))
    extra = cfg.eval.held_out_images_per_prompt - settings.n_per_prompt
    if extra <= 0 or not prompts or cfg.eval.protocol != "prompts":
        return None
    more = generate(gen, prompts, dataclasses.replace(settings, n_per_prompt=extra, seed=settings.seed + 1))
    texts = [samples.texts[i] for i in rows] + more.prompts
    return ImageSet(HELD_OUT_SET, np.concatenate([samples.images[rows], more.images]), texts,
                    [text_group(t, True) for t in texts])


def reference_cache_name(reference: np.ndarray) -> str:
    """The FID reference cache's name, keyed by the reference pixels themselves: another
    eval.max_reference_images, image size or held-out split is another name."""
    digest = hashlib.sha256(np.ascontiguousarray(reference)).hexdigest()[:16]
    return f"heldout{len(reference)}-{digest}"


def fidelity_rows(cfg: PipelineConfig, gen, sets: list[ImageSet], train_real: np.ndarray, reference: np.ndarray,
                  ids: dict[str, str]) -> tuple[dict[str, dict], dict[str, dict] | None]:
    """FD/KID/PR of every set against the held-out ``reference`` (the real-images row measures train images: the
    floor) in the run's CLIP space, and as ``fd_judge`` etc. in the judge's feature space where there is a judge;
    plus Inception FID/IS of samples and real images when configured."""
    cuda = gen.clip.device.type == "cuda"
    root = cfg.run_path / "cache" / "fidelity"
    reference_name = reference_cache_name(reference)
    spaces = {"": (register_clip_extractor(gen.clip, f"clipgen-clip-{ids['embeddings']}"), ids["embeddings"])}
    if gen.judge is not None:
        spaces["_judge"] = (register_judge_extractor(gen.judge, f"clipgen-judge-{ids['judge']}"), ids["judge"])
    fidelity: dict[str, dict] = {s.name: {} for s in sets}
    for suffix, (extractor, space_id) in spaces.items():
        for s in sets:
            found = fidelity_metrics(train_real if s.name == "real images" else s.images, reference, extractor,
                                     cuda=cuda, cache_root=root, reference_cache_name=f"{reference_name}-{space_id}")
            fidelity[s.name].update({f"{k}{suffix}": v for k, v in found.items()})
    inception = None
    if cfg.eval.inception_weights:
        weights = content_digest(cfg.eval.inception_weights).removeprefix("sha256:")[:16]
        inception = {name: inception_metrics(images, reference, cfg.eval.inception_weights, cuda=cuda,
                                             cache_root=root, reference_cache_name=f"{reference_name}-{weights}")
                     for name, images in (("samples", sets[0].images), ("real images", train_real))}
    return fidelity, inception


def build_report(cfg: PipelineConfig, inputs: dict[str, Artifact], out: Path, map_fn) -> dict[str, Any]:
    e, world = cfg.eval, cfg.data.source == "world"
    if e.inception_weights:
        check_inception_weights(e.inception_weights)  # fail before the expensive part
    gen = load_generator(cfg, inputs)
    shards, size = inputs["shards"].path, cfg.data.image_size
    held, prompts, settings = evaluation_set(cfg, shards)
    results = [generate(gen, prompts, settings)]
    result = results[0]
    n = len(result.images)
    samples = ImageSet("samples", result.images, result.prompts, [text_group(p, world) for p in result.prompts])
    sets = [samples, *anchor_sets(cfg, gen, held, prompts, n)]
    train_real = read_labeled_split(shards, "train", size, limit=n).images

    fidelity, inception = fidelity_rows(cfg, gen, sets, train_real, held.images, {k: a.id for k, a in inputs.items()})

    # each set embedded once by the run's CLIP (memorisation, and text alignment unless another CLIP scores)
    run_emb = {s.name: gen.clip.encode_images(s.images).float().cpu() for s in sets}
    scorer, scorer_name, independent = scoring_clip(cfg, gen.clip)
    score_emb = {s.name: scorer.encode_images(s.images).float().cpu() for s in sets} if independent else run_emb
    pool_texts = distractor_pool(held.meta, prompts)
    alignment = text_alignment(scorer, sets, score_emb, pool_texts, [text_group(t, world) for t in pool_texts],
                               e.r_precision_distractors, cfg.sample.seed)
    judge = None
    if gen.judge is not None:  # the shapes world: also prompts that name a size and a background
        attribute_settings = dataclasses.replace(cfg.sample, n_per_prompt=e.images_per_prompt)  # either protocol
        results.append(generate(gen, attribute_prompts(), attribute_settings))
        named = ImageSet("attribute prompts", results[1].images, results[1].prompts,
                         [text_group(p, world) for p in results[1].prompts])
        judge = {s.name: judged(gen.judge, s, cfg.data.world.held_out_combos) for s in [*sets, named]}
        if more := more_held_out_draws(cfg, gen, samples, settings):
            judge[more.name] = judged(gen.judge, more, cfg.data.world.held_out_combos)

    by_prompt = results[1:] if e.protocol == "captions" else results  # one draw per caption: no per-prompt rows
    named_sets = {s.name: s for s in sets}  # reconstructions pair with the real images, one for one
    recon_agreement = gen.judge.agreement(named_sets["real images"].images,
                                          named_sets["VQGAN reconstructions"].images) if gen.judge else None
    neighbours = {name: search(gen.index, emb.numpy(), 1) for name, emb in run_emb.items()}  # nearest train image
    memorisation = {name: similarity_summary(nb.scores[:, 0], e.memorisation_threshold) for name, nb in neighbours.items()}
    rows = {s.name: {**fidelity[s.name], **alignment[s.name],
                     "judge_both": judge[s.name]["both"] if judge else None,
                     "nn_similarity_median": memorisation[s.name].get("median"),
                     "memorised_fraction": memorisation[s.name].get("fraction_above")} for s in sets}
    metrics = {
        "run": cfg.name, "ids": {name: art.id for name, art in inputs.items()}, "settings": evaluate_config(cfg),
        "protocol": e.protocol, "prompts": [p for r in by_prompt for p in dict.fromkeys(r.prompts)],
        "captions": n if e.protocol == "captions" else None, "images_per_set": n,
        "reference_images": len(held.images),
        "feature_space": f"{cfg.clip.model} image embeddings (the run's CLIP): FD here is not Inception FID",
        "scoring_clip": scorer_name, "scoring_clip_independent": independent,
        "rows": rows, "inception": inception, "judge": judge, "memorisation": memorisation,
        "per_prompt": {k: v for r in by_prompt for k, v in judged_per_prompt(r).items()} if judge else None,
        "tokenizer": tokenizer_summary(inputs["vqgan"], fidelity["VQGAN reconstructions"],
                                       recon_agreement),
    }
    metrics["headline"] = headline(metrics)
    write_report(out, cfg, metrics, results, neighbours, held, shards, inputs)
    return {"headline": metrics["headline"], "report": str(out / "index.html")}


def tokenizer_summary(vqgan: Artifact, reconstructions: dict[str, float],
                      judge_agreement: dict[str, float] | None) -> dict[str, Any]:
    held = vqgan.summary().get("heldout", {})
    return {"psnr": held.get("psnr"), "code_usage": held.get("code_usage"), "perplexity": held.get("perplexity"),
            "judge_agreement": judge_agreement, "reconstruction_fd": reconstructions["fd"],
            "reconstruction_fd_judge": reconstructions.get("fd_judge")}


def headline(m: dict[str, Any]) -> dict[str, Any]:
    rows, judge = m["rows"], m["judge"]
    samples, real, random = rows["samples"], rows["real images"], rows["random token grids"]
    values = {"fd_samples": samples["fd"], "fd_floor_real": real["fd"], "fd_ceiling_random": random["fd"],
              "fd_over_floor": samples["fd"] / max(real["fd"], 1e-12),
              "precision": samples["precision"], "recall": samples["recall"],
              "precision_real": real["precision"], "recall_real": real["recall"],
              "clip_score": samples["clip_score"], "r_precision": samples["r_precision"],
              "memorised_fraction": samples["memorised_fraction"],
              "memorised_fraction_real": real["memorised_fraction"]}
    if "fd_judge" in samples:
        values |= {"fd_judge_samples": samples["fd_judge"], "fd_judge_floor_real": real["fd_judge"],
                   "fd_judge_ceiling_random": random["fd_judge"],
                   "fd_judge_over_floor": samples["fd_judge"] / max(real["fd_judge"], 1e-12)}
    if judge:
        named = judge["attribute prompts"]
        held_out = judge.get(HELD_OUT_SET, judge["samples"])
        values |= {"judge_seen": judge["samples"]["seen"], "judge_held_out": held_out["held_out"],
                   "judge_held_out_images": held_out["held_out_images"],
                   "judge_shape": judge["samples"]["shape"], "judge_colour": judge["samples"]["colour"],
                   "judge_size": named["size"], "judge_background": named["background"]}
    return {k: values[k] for k in HEADLINE_LABELS if k in values}

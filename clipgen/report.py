"""The evaluation report: ``metrics.json`` plus ``index.html`` with its figures, all in one folder.

The page links only files beside it (relative paths), so the folder can be copied or served as is:
a grid of samples per prompt, the anchor rows' images, training curves per stage (matplotlib), the
metric table, the memorisation histogram with the most-memorised samples beside their nearest training
image, and the run's resolved config.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipgen.artifacts import Artifact, write_json_atomic, write_text_atomic
from clipgen.config import config_yaml
from clipgen.data.shards import iter_shard, shard_paths

GRID_SCALE = 2  # small world images are upscaled (nearest) so shapes are visible on screen
CAPTION_PAIRS = 32  # captions protocol: draws shown beside the real image of their caption
CURVE_STAGES = {"toyclip": "toy CLIP (contrastive)", "vqgan": "VQGAN tokenizer", "gpt": "transformer"}
TABLE_COLUMNS = (("fd", "FD ↓"), ("kid", "KID ↓"), ("precision", "precision ↑"), ("recall", "recall ↑"),
                 ("fd_judge", "FD, judge space ↓"), ("precision_judge", "precision, judge space ↑"),
                 ("recall_judge", "recall, judge space ↑"), ("clip_score", "CLIP score ↑"),
                 ("r_precision", "R-precision ↑"), ("judge_both", "judge: both ↑"),
                 ("nn_similarity_median", "NN cos (median)"), ("memorised_fraction", "memorised"))

# The report's headline numbers, in the order and with the words the end of a run prints them.
HEADLINE_LABELS = {
    "judge_seen": "judge accuracy (shape and colour), seen combinations",
    "judge_held_out": "judge accuracy (shape and colour), held-out combinations",
    "judge_held_out_images": "held-out combinations: images judged (eval.held_out_images_per_prompt each)",
    "judge_shape": "judge accuracy: shape",
    "judge_colour": "judge accuracy: colour",
    "judge_size": "judge accuracy: size (prompts that name one)",
    "judge_background": "judge accuracy: background (prompts that name one)",
    "fd_samples": "FD of samples (run's CLIP space)",
    "fd_floor_real": "FD of real train images (floor)",
    "fd_ceiling_random": "FD of random token grids (ceiling)",
    "fd_over_floor": "FD of samples / floor",
    "fd_judge_samples": "FD of samples (judge's feature space, never optimised)",
    "fd_judge_floor_real": "FD of real train images, judge space (floor)",
    "fd_judge_ceiling_random": "FD of random token grids, judge space (ceiling)",
    "fd_judge_over_floor": "FD of samples / floor, judge space",
    "precision": "precision (run's CLIP space)",
    "recall": "recall (run's CLIP space)",
    "precision_real": "precision of real train images (reference)",
    "recall_real": "recall of real train images (reference)",
    "clip_score": "CLIP score",
    "r_precision": "CLIP R-precision",
    "memorised_fraction": "samples above the memorisation threshold",
    "memorised_fraction_real": "real held-out images above it (baseline)",
}


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The metric table as one dict per row (samples and anchors), rounded for display."""
    return [{"set": name, **{label: None if row.get(k) is None else round(float(row[k]), 4) for k, label in TABLE_COLUMNS}}
            for name, row in metrics["rows"].items()]


def link_latest(report_dir: Path) -> Path:
    """Point ``<run>/report/latest`` at ``report_dir`` (replaced atomically), so the newest report has one path."""
    report_dir = Path(report_dir)
    link = report_dir.parent / "latest"
    tmp = report_dir.parent / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(report_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = GRID_SCALE) -> str:
    """Tile uint8 images [N, H, W, 3] into one PNG (2-pixel gaps); returns the file name."""
    n, h, w, _ = images.shape
    rows = max(1, -(-n // columns))
    cols = min(columns, max(1, n))
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)
    return path.name


def plot_curves(metrics_file: Path, title: str, path: Path) -> str | None:
    """Loss curves (left) and any quality metric (right) of one training stage's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r]
    if not records:
        return None
    losses = [k for k in ("loss", "eval_loss", "val_loss") if any(k in r for r in records)]
    quality = [k for k in ("psnr", "code_usage", "logit_scale") if any(k in r for r in records)][:1]
    fig, axes = plt.subplots(1, 1 + bool(quality), figsize=(9 if quality else 5, 3.2), squeeze=False)
    for ax, keys in zip(axes[0], (losses, quality), strict=False):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plot_similarity(similarities: dict[str, np.ndarray], threshold: float, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    # zoom on where the mass is: in a small world most nearest neighbours sit close to 1
    low = min(float(np.quantile(v, 0.01)) for v in similarities.values() if len(v))
    low = min(np.floor(low * 20) / 20, threshold - 0.05)
    for name, values in similarities.items():
        ax.hist(np.clip(values, low, 1.0), bins=50, range=(low, 1.0), alpha=0.5, label=name, density=True)
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("cosine similarity to the nearest training image (CLIP space)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def images_by_key(shard_root: Path, split: str, keys: list[str], image_size: int) -> dict[str, np.ndarray]:
    from clipgen.data.images_array import decode_image

    wanted, found = set(keys), {}
    for shard in shard_paths(shard_root, split):
        for key, members in iter_shard(shard):
            if key in wanted and (image := decode_image(members, image_size)) is not None:
                found[key] = image
        if len(found) == len(wanted):
            break
    return found


def write_report(out: Path, cfg, metrics: dict[str, Any], results: list, neighbours: dict[str, Any], held,
                 shards: Path, inputs: dict[str, Artifact]) -> Path:
    """Write every figure, ``metrics.json`` and ``index.html`` into ``out``; returns the page's path.
    ``results`` are the generated sets (clipgen.generate.Generated), the evaluation prompts' first."""
    out = Path(out)
    figures: dict[str, Any] = {"prompts": [], "curves": [], "pairs": []}
    per_prompt = metrics.get("per_prompt") or {}
    held_out = [c.lower() for c in cfg.data.world.held_out_combos] if cfg.data.source == "world" else []
    captions = metrics.get("protocol") == "captions"
    if captions:  # one draw per held-out caption: the first ones beside the real image of the same key
        figures["captions"] = [(save_grid(np.stack([results[0].images[i], held.images[i]]), out / f"caption_{i:03d}.png",
                                          columns=2), results[0].prompts[i])
                               for i in range(min(CAPTION_PAIRS, len(results[0].prompts)))]
    for result in results[1:] if captions else results:  # every draw of each prompt, in the order drawn
        prompts = np.array(result.prompts, dtype=object)
        for prompt in dict.fromkeys(result.prompts):
            name = save_grid(result.images[prompts == prompt], out / f"prompt_{len(figures['prompts']):03d}.png")
            label = f"{prompt} (held-out combination)" if any(c in prompt.lower() for c in held_out) else prompt
            figures["prompts"].append((label, name, per_prompt.get(prompt)))
    result = results[0]
    n_anchor = min(16, len(held.images))
    figures["anchors"] = save_grid(held.images[:n_anchor], out / "real_heldout.png")
    for step, title in CURVE_STAGES.items():
        if step in inputs and (name := plot_curves(inputs[step].path / "metrics.jsonl", title, out / f"curves_{step}.png")):
            figures["curves"].append((title, name))
    samples = neighbours["samples"]
    similarity = samples.scores[:, 0]
    figures["histogram"] = plot_similarity(
        {"samples": similarity, "real held-out images (baseline)": neighbours["real images"].scores[:, 0]},
        cfg.eval.memorisation_threshold, out / "memorisation.png")
    top = np.argsort(-similarity)[:cfg.eval.nn_pairs]
    train = images_by_key(shards, "train", [samples.keys[i][0] for i in top], cfg.data.image_size)
    for rank, i in enumerate(top):
        key = samples.keys[i][0]
        if key in train:
            name = save_grid(np.stack([result.images[i], train[key]]), out / f"nn_{rank:02d}.png", columns=2)
            figures["pairs"].append((name, result.prompts[i], key, float(similarity[i])))
    write_json_atomic(out / "metrics.json", metrics)
    config_text = config_yaml(cfg)
    page = out / "index.html"
    write_text_atomic(page, render_html(metrics, figures, config_text))
    return page


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    return html.escape(str(value))


def _judged_words(accuracy: dict[str, float | None] | None) -> str:
    """A prompt's judge accuracy per attribute it names, e.g. 'judge: shape 100%, colour 94%, size 81%'."""
    if not accuracy:
        return ""
    named = [f"{name} {value:.0%}" for name, value in accuracy.items() if name != "both" and value is not None]
    return "judge: " + ", ".join(named)


def _mix_table(judge: dict[str, dict] | None) -> str:
    """The sizes and backgrounds the judge reads in each image set, as percentages: one row per set."""
    mixes = {name: j["mix"] for name, j in (judge or {}).items() if j.get("mix")}
    if not mixes:
        return ""
    columns = [(attr, label) for attr, labels in next(iter(mixes.values())).items() for label in labels]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{mix[a][label]:.0%}</td>" for a, label in columns)
                   + "</tr>" for name, mix in mixes.items())
    return ("<h3>What the judge reads: sizes and backgrounds</h3><p>The share of each set's images read as each size "
            "and background. The samples' mix beside the real images' shows what is under- or over-drawn where the "
            f"prompt names neither.</p><table><tr><th></th>{head}</tr>{body}</table>")


def render_html(m: dict[str, Any], figures: dict[str, Any], config_text: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(label)}</th>" for _, label in TABLE_COLUMNS)
    body = "".join(f"<tr><th>{e(name)}</th>" + "".join(f"<td>{_fmt(row.get(k))}</td>" for k, _ in TABLE_COLUMNS) + "</tr>"
                   for name, row in m["rows"].items())
    headline = "".join(f"<li>{e(HEADLINE_LABELS.get(k, k))}: <b>{_fmt(v)}</b></li>" for k, v in m["headline"].items())
    grids = "".join(f"<figure><img src='{name}' alt='{e(p)}'><figcaption>{e(p)}<br>{_judged_words(acc)}"
                    "</figcaption></figure>" for p, name, acc in figures["prompts"])
    curves = "".join(f"<figure><img src='{name}' alt='{e(t)}'></figure>" for t, name in figures["curves"])
    samples_html = ("<h2>Samples per prompt</h2><p>Every image drawn for each prompt, in the order drawn (never sorted "
                    "by a score), so diversity shows. The prompts that name a size and a background measure the judge's "
                    f"size and background accuracy.</p>{grids}")
    captioned = ""
    if figures.get("captions"):
        pairs_html = "".join(f"<figure><img src='{name}' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>"
                             for name, c in figures["captions"])
        captioned = (f"<h2>One draw per held-out caption</h2><p>Protocol <i>captions</i>: {m['captions']} held-out "
                     "captions, one image drawn from each and scored against the real images of the same keys. The first "
                     f"ones, as drawn (sample | real image of that caption):</p>{pairs_html}")
    pairs = "".join(f"<figure><img src='{name}'><figcaption>{e(p)} · cos {s:.3f}<br>train {e(k)}</figcaption></figure>"
                    for name, p, k, s in figures["pairs"])
    extra = ""
    if m.get("inception"):
        extra = "<h3>Inception (standard FID / IS)</h3><ul>" + "".join(
            f"<li>{e(k)}: FID {_fmt(v['fid'])}, IS {_fmt(v['is'])} ± {_fmt(v['is_std'])}</li>" for k, v in m["inception"].items()) + "</ul>"
    tok = m["tokenizer"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>clipgen report: {e(m['run'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} figure{{display:inline-block;margin:6px}}
figcaption{{font-size:12px;text-align:center}} pre{{background:#f6f6f6;padding:1em;font-size:12px}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>clipgen evaluation: {e(m['run'])}</h1>
<ul>{headline}</ul>
<h2>Metrics</h2>
<p>{m['images_per_set']} images per row against {m['reference_images']} held-out real images.
Fidelity is measured in {e(m['feature_space'])}. Text alignment is scored by {e(m['scoring_clip'])}.
The <i>real images</i> row measures real train images against the held-out set (the floor) and held-out images
for the other columns; <i>random token grids</i> is the ceiling.</p>
<table><tr><th></th>{head}</tr>{body}</table>{extra}{_mix_table(m.get("judge"))}
<p>Tokenizer: PSNR {_fmt(tok['psnr'])} dB, codebook usage {_fmt(tok['code_usage'])},
reconstruction FD {_fmt(tok['reconstruction_fd'])} (judge space {_fmt(tok.get('reconstruction_fd_judge'))}).</p>
{captioned}
{samples_html if grids else ""}
<h3>Held-out real images</h3><figure><img src='{figures['anchors']}'></figure>
<h2>Training curves</h2>{curves}
<h2>Memorisation</h2>
<p>Each image's cosine similarity to its nearest training image in the run's CLIP space (faiss index of the
embedding cache). Read the samples against the real held-out images, which were never trained on: a sample
set that sits closer to the training images than they do is copying.</p><figure><img src='{figures['histogram']}'></figure>
<h3>Most memorised samples (sample | nearest training image)</h3>{pairs}
<h2>Config</h2><pre>{e(config_text)}</pre>
<p>ids: {e(json.dumps(m['ids']))}</p></body></html>"""

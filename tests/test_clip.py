"""The CLIP face (open_clip names, offline tags, checkpoints, fingerprints) and toy-CLIP pretraining."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipgen import clip as clip_module
from clipgen.clip import ClipLoadError, load_clip, save_clip
from clipgen.config import ToyClipConfig
from clipgen.train import clip_trainer as train_clip
from clipgen.train.clip_trainer import (
    CaptionedImages,
    modality_gap,
    multi_positive_clip_loss,
    pretrain_toy_clip,
    zero_shot_accuracy,
)

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240)}
SHAPES = ("square", "circle")


def shapes_set(n: int, seed: int) -> tuple[CaptionedImages, dict[str, list[str]]]:
    """3 colours x 2 shapes, random size and position, on dark backgrounds, 32 px, drawn with PIL."""
    rng = np.random.default_rng(seed)
    images, captions, labels = [], [], {"colour": [], "shape": []}
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 50, 3)))
        half = int(rng.integers(5, 11))
        cx, cy = (int(v) for v in rng.integers(half, 32 - half, 2))
        box = (cx - half, cy - half, cx + half, cy + half)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        images.append(np.asarray(img))
        captions.append(f"a {'small' if half < 8 else 'large'} {colour} {shape}")
        labels["colour"].append(colour)
        labels["shape"].append(shape)
    return CaptionedImages(np.stack(images), captions), labels


def unit_norm(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-4)


# ------------------------------------------------------------------------------------ clip face
def test_toy_clip_encodes_images_and_texts_to_unit_vectors():
    clip = load_clip("toy-clip")
    data, _ = shapes_set(4, seed=0)
    pil = [Image.fromarray(a) for a in data.images] + [Image.new("RGB", (50, 20), (9, 9, 9))]  # any size
    from_pil = clip.encode_images(pil, batch_size=2)
    from_array = clip.encode_images(data.images)
    texts = clip.encode_texts(data.captions)
    assert clip.embed_dim == 128 and clip.image_size == 32
    assert from_pil.shape == (5, 128) and from_pil.dtype == torch.float32 and texts.shape == (4, 128)
    assert unit_norm(from_pil) and unit_norm(texts)
    assert torch.allclose(from_pil[:4], from_array, atol=1e-5)  # the array fast path matches the PIL path
    assert not from_pil.requires_grad
    pixels = clip.prepare_images(data.images).requires_grad_()  # e.g. decoded images in a consistency loss
    clip.encode_images(pixels, grad=True).sum().backward()
    assert pixels.grad is not None and all(p.grad is None for p in clip.net.parameters())  # CLIP stays frozen


def test_vit_b32_random_init_end_to_end():
    started = time.perf_counter()
    clip = load_clip("ViT-B-32", None)
    images = [Image.new("RGB", size, colour) for size, colour in
              [((224, 224), (255, 0, 0)), ((300, 200), (0, 255, 0)), ((64, 96), (0, 0, 255))]]
    image_features = clip.encode_images(images)
    text_features = clip.encode_texts(["a red square", "a green field", "a blue sky"])
    assert clip.image_size == 224 and clip.embed_dim == 512
    assert image_features.shape == (3, 512) and text_features.shape == (3, 512)
    assert unit_norm(image_features) and unit_norm(text_features)
    assert time.perf_counter() - started < 60


def test_pretrained_tag_offline_fails_at_once_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # nothing cached
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    started = time.perf_counter()
    with pytest.raises(ClipLoadError) as err:
        load_clip("ViT-B-32", "openai")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "'ViT-B-32'" in message and "'openai'" in message
    assert "local path" in message and "clip.pretrained" in message and "HF_HOME" in message


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(clip_module, "_hf_offline", lambda: False)
    monkeypatch.setattr(clip_module, "_reachable", lambda url, timeout=5.0: False)
    with pytest.raises(ClipLoadError, match="cannot be reached"):
        load_clip("ViT-B-32", "openai")


def test_pretrained_tag_resolves_from_the_hf_cache_offline(monkeypatch, tmp_path):
    """A tag whose weights sit in the HF cache loads offline, through the cache file, with no hub call."""
    snapshot = tmp_path / "hub/models--someone--toy/snapshots/abc123"
    save_clip(load_clip("toy-clip", init_seed=5), tmp_path / "saved")
    snapshot.mkdir(parents=True)
    shutil.copy(tmp_path / "saved/open_clip_model.safetensors", snapshot / "open_clip_model.safetensors")
    (tmp_path / "hub/models--someone--toy/refs").mkdir()
    (tmp_path / "hub/models--someone--toy/refs/main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_tag = {"hf_hub": "someone/toy/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setattr(clip_module.open_clip, "get_pretrained_cfg",
                        lambda model, tag: fake_tag if (model, tag) == ("toy-clip", "mytag") else {})
    clip = load_clip("toy-clip", "mytag")
    assert clip.weights_file.startswith(str(snapshot)) and clip.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)
    reference = load_clip("toy-clip", str(tmp_path / "saved"))
    assert torch.equal(clip.encode_texts(["a red square"]), reference.encode_texts(["a red square"]))


def test_bad_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(ClipLoadError, match=r"unknown CLIP architecture 'ViT-B-33'.*ViT-B-32"):
        load_clip("ViT-B-33")
    with pytest.raises(ClipLoadError, match="neither a pretrained tag of 'toy-clip'"):
        load_clip("toy-clip", "openai")
    with pytest.raises(ClipLoadError, match="not found"):
        load_clip("toy-clip", str(tmp_path / "missing.safetensors"))
    save_clip(load_clip("toy-clip"), tmp_path / "toy")
    with pytest.raises(ClipLoadError, match="set clip.model: toy-clip"):
        load_clip("ViT-B-32", str(tmp_path / "toy"))


def test_save_load_round_trip_and_fingerprint(tmp_path):
    clip = load_clip("toy-clip", init_seed=3)
    data, _ = shapes_set(6, seed=1)
    save_clip(clip, tmp_path / "a")
    assert json.loads((tmp_path / "a/config.json").read_text())["model"] == "toy-clip"
    first, second = load_clip("toy-clip", str(tmp_path / "a")), load_clip("toy-clip", str(tmp_path / "a"))
    assert torch.equal(first.encode_images(data.images), clip.encode_images(data.images))
    assert torch.equal(first.encode_texts(data.captions), clip.encode_texts(data.captions))
    assert first.fingerprint() == second.fingerprint()
    as_file = load_clip("toy-clip", str(tmp_path / "a/open_clip_model.safetensors"))
    assert as_file.fingerprint() == first.fingerprint()  # same weights file, same architecture

    with torch.no_grad():
        next(clip.net.visual.parameters()).add_(0.01)
    save_clip(clip, tmp_path / "b")
    assert load_clip("toy-clip", str(tmp_path / "b")).fingerprint() != first.fingerprint()

    # same weights, different preprocessing: the cache id must change too
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    config_path = tmp_path / "c/open_clip_config.json"
    config = json.loads(config_path.read_text())
    config["preprocess_cfg"]["mean"] = [0.5, 0.5, 0.5]
    config_path.write_text(json.dumps(config))
    assert load_clip("toy-clip", str(tmp_path / "c")).fingerprint() != first.fingerprint()


def test_random_init_is_reproducible_and_seeded():
    assert load_clip("toy-clip").fingerprint() == load_clip("toy-clip").fingerprint()
    assert load_clip("toy-clip", init_seed=1).fingerprint() != load_clip("toy-clip").fingerprint()


# ---------------------------------------------------------------------------------- pretraining
def test_multi_positive_loss_is_clip_loss_without_duplicates():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    target = torch.arange(5)
    clip_loss = (torch.nn.functional.cross_entropy(logits, target) +
                 torch.nn.functional.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(multi_positive_clip_loss(img, txt, target, scale), clip_loss, atol=1e-6)
    # two images with one caption: both aligned with it is the optimum, not a conflict
    aligned = multi_positive_clip_loss(txt[[0, 0, 1]], txt[:2], torch.tensor([0, 0, 1]), torch.tensor(4.0))
    assert aligned < multi_positive_clip_loss(img[:3], txt[:2], torch.tensor([0, 0, 1]), torch.tensor(4.0))


def test_pretrain_toy_clip_learns_and_saves(tmp_path):
    data, _ = shapes_set(480, seed=2)
    held, labels = shapes_set(60, seed=3)
    cfg = ToyClipConfig(steps=60, batch_size=32, lr=2e-3, seed=0)
    result = pretrain_toy_clip(data, cfg, tmp_path / "toy", eval_data=held, log_every=10, progress=False)
    assert set(result) == {"steps", "train_seconds", "final_loss"} and result["steps"] == 60
    rows = [json.loads(line) for line in (tmp_path / "toy/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "lr", "seconds", "eval_loss"} <= set(rows[0])
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"] and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert not (tmp_path / "toy/train_state.pt").exists()

    clip = load_clip("toy-clip", str(tmp_path / "toy"))
    prompts = {"colour": list(COLOURS), "shape": list(SHAPES)}
    acc = zero_shot_accuracy(clip, held.images, labels, prompts, templates={"colour": ["a {} square", "a {} circle"]})
    assert set(acc) == {"colour", "shape"} and all(0.0 <= v <= 1.0 for v in acc.values())
    combos = [f"{c} {s}" for c, s in zip(labels["colour"], labels["shape"], strict=True)]
    gap = modality_gap(clip, held.images, held.captions, combos)
    assert set(gap) == {"cos_image_caption", "cos_image_same_combo", "cos_image_random", "centroid_gap"}
    assert gap["cos_image_same_combo"] > gap["cos_image_random"]
    with pytest.raises(ValueError, match="not among prompts"):
        zero_shot_accuracy(clip, held.images, labels, {"colour": ["red", "green"]})


def test_pretraining_resumes_where_it_was_killed(tmp_path, monkeypatch):
    data, _ = shapes_set(64, seed=4)
    cfg = ToyClipConfig(steps=12, batch_size=16, lr=1e-3, seed=0)
    pretrain_toy_clip(data, cfg, tmp_path / "whole", log_every=4, ckpt_every=4, progress=False)

    real_lr_at = train_clip.lr_at

    def killed_at_step_10(step, cfg):
        if step == 10:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, cfg)

    monkeypatch.setattr(train_clip, "lr_at", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        pretrain_toy_clip(data, cfg, tmp_path / "killed", log_every=4, ckpt_every=4, progress=False)
    assert (tmp_path / "killed/train_state.pt").is_file()
    monkeypatch.setattr(train_clip, "lr_at", real_lr_at)
    pretrain_toy_clip(data, cfg, tmp_path / "killed", log_every=4, ckpt_every=4, progress=False)

    whole, resumed = load_clip("toy-clip", str(tmp_path / "whole")), load_clip("toy-clip", str(tmp_path / "killed"))
    assert torch.allclose(whole.encode_images(data.images), resumed.encode_images(data.images), atol=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_modality_gap_matches_brute_force():
    class Fixed:  # a stand-in encoder with known vectors
        def __init__(self, vectors):
            self.vectors = vectors

        def encode_images(self, images):
            return self.vectors

        def encode_texts(self, texts):
            return torch.nn.functional.normalize(self.vectors + 0.3, dim=-1)

    torch.manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(7, 4), dim=-1)
    combos = ["a", "a", "b", "b", "b", "c", "a"]
    gap = modality_gap(Fixed(vectors), np.zeros((7, 1, 1, 3), np.uint8), ["t"] * 7, combos)
    cos = vectors @ vectors.T
    off = ~torch.eye(7, dtype=torch.bool)
    same = torch.tensor([[x == y for y in combos] for x in combos]) & off
    assert gap["cos_image_random"] == pytest.approx(cos[off].mean().item(), abs=1e-6)
    assert gap["cos_image_same_combo"] == pytest.approx(cos[same].mean().item(), abs=1e-6)

"""The evaluate stage: metrics with known answers, the report on a tiny run, and bad input."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipgen.metrics import (
    check_inception_weights,
    clip_score,
    fidelity_metrics,
    inception_metrics,
    r_precision,
    register_clip_extractor,
    similarity_summary,
)
from clipgen.pipeline import plan
from clipgen.stages.evaluate_stage import attribute_prompts


@pytest.fixture(scope="module")
def extractor():
    from clipgen.clip import load_clip

    torch.manual_seed(0)
    return register_clip_extractor(load_clip("toy-clip", None), "clipgen-test-random-toy")


def world_images(n: int, seed: int) -> np.ndarray:
    from clipgen.data.world import render_array, sample_attributes

    rng = np.random.default_rng(seed)
    return np.stack([render_array(sample_attributes(rng), 32) for _ in range(n)])


def test_fd_is_zero_for_identical_sets_and_grows_with_a_shift(extractor):
    images = world_images(64, seed=1)
    same = fidelity_metrics(images, images, extractor)
    assert abs(same["fd"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = [fidelity_metrics(np.clip(images.astype(int) + d, 0, 255).astype(np.uint8), images, extractor)["fd"]
               for d in (40, 120)]
    assert 1e-4 < shifted[0] < shifted[1]


def test_fd_of_two_draws_is_below_a_shifted_set_and_the_reference_is_cached(extractor, tmp_path):
    a, b = world_images(64, seed=1), world_images(64, seed=2)
    cache = {"cache_root": tmp_path, "reference_cache_name": "ref"}
    fresh = fidelity_metrics(a, b, extractor, **cache)
    assert list(tmp_path.glob("ref-*")), "the reference set's features were not cached"
    again = fidelity_metrics(a, b, extractor, **cache)
    assert again["fd"] == pytest.approx(fresh["fd"], rel=1e-6)
    inverted = fidelity_metrics(255 - a, b, extractor, **cache)["fd"]
    assert fresh["fd"] < inverted


class Trap:
    """Pickled into a cache file, it would write ``hit`` when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled",))


def test_a_fidelity_cache_file_holding_pickled_code_is_deleted_unrun(extractor, tmp_path, caplog):
    a, b = world_images(16, seed=1), world_images(16, seed=2)
    cache = {"cache_root": tmp_path, "reference_cache_name": "ref"}
    fresh = fidelity_metrics(a, b, extractor, **cache)
    hit = tmp_path / "hit"
    planted = sorted(tmp_path.glob("ref-*.pt"))
    assert planted
    for path in planted:  # what someone with write access to the run folder could leave there
        torch.save({"mu": Trap(hit)}, path)
    with caplog.at_level(logging.WARNING, logger="clipgen"):
        again = fidelity_metrics(a, b, extractor, **cache)
    assert not hit.exists() and "not plain tensor or array data" in caplog.text
    assert again["fd"] == pytest.approx(fresh["fd"], rel=1e-6)  # recomputed, then cached again
    assert fidelity_metrics(a, b, extractor, **cache)["fd"] == pytest.approx(fresh["fd"], rel=1e-6)


def test_fidelity_refuses_tiny_sets(extractor):
    with pytest.raises(ValueError, match="at least 4"):
        fidelity_metrics(world_images(3, 0), world_images(8, 1), extractor)


def test_r_precision_on_a_constructed_case():
    eye = torch.eye(8)
    groups = list(range(8))
    # images equal to their own texts: the right prompt always wins
    assert r_precision(eye, eye, eye, groups, groups, n_distractors=99) == (1.0, 7, 8)
    # each image lies closer to the next caption than to its own prompt: never ranked first
    images = eye + 2 * torch.roll(eye, -1, dims=1)
    assert r_precision(images, eye, eye, groups, groups).value == 0.0
    # a same-group caption is never a distractor, even when it is closer than the prompt
    image = torch.tensor([[1.0, 0.0]])
    true_text, pool = torch.tensor([[0.8, 0.6]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert r_precision(image, true_text, pool, ["red circle"], ["red circle", "blue star"]).value == 1.0
    assert r_precision(image, true_text, pool, ["red circle"], ["green star", "blue star"]).value == 0.0
    # a tie with a distractor is a miss
    assert r_precision(image, image, image, ["a"], ["b"]).value == 0.0
    with pytest.raises(ValueError, match="no distractor"):
        r_precision(image, image, image, ["a"], ["a"])


def test_clip_score_and_similarity_summary():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert clip_score(a, b) == pytest.approx(50.0)  # 100 and max(-100, 0)
    s = similarity_summary(np.array([0.5, 0.9, 0.96, 0.99]), threshold=0.95)
    assert s["fraction_above"] == 0.5 and s["max"] == pytest.approx(0.99) and s["images"] == 4


def test_missing_or_unsafe_inception_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights: no file at .*weights-inception"):
        check_inception_weights(tmp_path / "nope.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"fc.weight": torch.zeros(1), "extra": object()}, pickled)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        check_inception_weights(pickled)


def test_inception_fid_and_is_from_a_local_weights_file(tmp_path, monkeypatch):
    """The Inception path end to end, with random weights in torch-fidelity's format (real ones are a download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as patch:  # build the network without its download, then save its weights
        patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    images = world_images(8, seed=3)
    result = inception_metrics(images, world_images(8, seed=4), weights)
    assert np.isfinite(result["fid"]) and result["is"] >= 1.0 - 1e-6


def test_report_builds_and_every_linked_image_exists(tiny_run):
    from clipgen.pipeline import run_step

    cfg = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, images_per_prompt=1, nn_pairs=3))
    result = run_step(cfg, "report")
    out = tiny_run.run_path / "report" / result["id"]
    page = (out / "index.html").read_text()
    links = re.findall(r"src='([^']+)'", page)
    # a grid per prompt (24 colour-shape pairs, 24 that also name a size and a background), the real images,
    # the curves, the histogram
    assert len(links) >= 48 + 1 + 3, links
    assert all((out / link).is_file() for link in links), [link for link in links if not (out / link).is_file()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"samples", "real images", "VQGAN reconstructions", "random token grids"}
    assert len(metrics["prompts"]) == 48 and metrics["images_per_set"] == 24
    head = metrics["headline"]
    for key in ("judge_shape", "judge_colour", "judge_size", "judge_background", "precision", "recall",
                "fd_judge_samples", "fd_judge_floor_real", "fd_judge_ceiling_random", "fd_over_floor"):
        assert head[key] is not None and np.isfinite(head[key]), key
    assert head["fd_judge_over_floor"] == pytest.approx(head["fd_judge_samples"] / head["fd_judge_floor_real"])
    named = metrics["judge"]["attribute prompts"]
    assert named["images"] == 24 and named["size"] is not None and metrics["judge"]["samples"]["size"] is None
    # held-out accuracy: each held-out combination's one sample and 2 more draws; the samples' own figure stays
    held_out = metrics["judge"]["held-out combinations"]
    assert held_out["images"] == head["judge_held_out_images"] == 3 * len(tiny_run.data.world.held_out_combos)
    assert head["judge_held_out"] == held_out["held_out"] and held_out["seen"] is None
    assert metrics["judge"]["samples"]["held_out_images"] == len(tiny_run.data.world.held_out_combos)
    assert set(metrics["per_prompt"]["a small red circle on a black background"]) >= {"size", "background", "both"}
    assert metrics["scoring_clip_independent"] is False and "flattering" in metrics["scoring_clip"]
    assert "not Inception FID" in metrics["feature_space"]
    for row in metrics["rows"].values():
        assert all(np.isfinite(row[k]) for k in ("fd", "kid", "precision", "recall", "clip_score", "r_precision",
                                                  "fd_judge", "precision_judge", "recall_judge"))
    assert metrics["judge"]["real images"]["both"] >= 0 and metrics["memorisation"]["samples"]["images"] == 24
    for mix in (metrics["judge"][name]["mix"] for name in ("samples", "real images")):  # what size/background is drawn
        assert set(mix) == {"size", "background"} and all(sum(m.values()) == pytest.approx(1, abs=1e-3) for m in mix.values())
    assert "What the judge reads: sizes and backgrounds" in page
    assert metrics["ids"]["gpt"] and metrics["tokenizer"]["reconstruction_fd"] >= 0
    assert run_step(cfg, "report")["cached"]  # a second run is cached


def test_captions_protocol_draws_one_image_per_held_out_caption_against_the_same_keys(tiny_run):
    from clipgen.pipeline import run_step
    from clipgen.stages.clip_stage import read_labeled_split

    cfg = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, protocol="captions", captions=12,
                                                                  images_per_prompt=1, nn_pairs=2))
    result = run_step(cfg, "report")
    out = tiny_run.run_path / "report" / result["id"]
    metrics = json.loads((out / "metrics.json").read_text())
    held = read_labeled_split(plan(tiny_run)["shards"].path, "heldout", tiny_run.data.image_size, limit=12)
    assert metrics["protocol"] == "captions" and metrics["captions"] == 12
    assert metrics["images_per_set"] == 12 and metrics["reference_images"] == 12  # the same keys' real images
    assert metrics["prompts"] == list(dict.fromkeys(attribute_prompts()))  # the captions are not listed as prompts
    assert set(metrics["per_prompt"]) == set(attribute_prompts())
    for row in metrics["rows"].values():  # real images are scored against their own captions
        assert np.isfinite(row["clip_score"]) and 0 <= row["r_precision"] <= 1 and np.isfinite(row["fd"])
    assert metrics["judge"]["samples"]["images"] == 12
    page = (out / "index.html").read_text()
    assert "One draw per held-out caption" in page
    for m in held.meta[:3]:
        assert html.escape(m["caption"]) in page
    links = re.findall(r"src='([^']+)'", page)
    assert sum(link.startswith("caption_") for link in links) == 12
    assert all((out / link).is_file() for link in links)
    assert plan(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, captions=8)))["report"].id != result["id"]
    prompts = plan(tiny_run)["report"].id  # a key only the other protocol reads does not move a report's id
    assert plan(dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, captions=8)))["report"].id == prompts
    assert plan(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_reference_images=7)))["report"].id == \
        result["id"]


def test_report_with_missing_inception_weights_fails_before_any_work(tiny_run, tmp_path):
    from clipgen.pipeline import run_step

    cfg = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, inception_weights=str(tmp_path / "x.pth")))
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        run_step(cfg, "report")


def test_uncaptioned_real_images_get_no_text_scores_and_prompts_become_the_distractors():
    from clipgen.clip import load_clip
    from clipgen.stages.evaluate_stage import ImageSet, distractor_pool, text_alignment

    prompts = ["a photo of a dog", "a photo of a cat", "a red car"]
    pool = distractor_pool([{"source": "a.jpg"}, {"source": "b.jpg"}], prompts)
    assert pool == prompts
    assert distractor_pool([{"caption": "x"}, {"caption": ""}], prompts) == ["x"]
    images = world_images(3, seed=5)
    sets = [ImageSet("samples", images, prompts, prompts), ImageSet("real images", images, ["", "", ""], ["", "", ""])]
    clip = load_clip("toy-clip", None)
    embedded = {s.name: clip.encode_images(s.images).cpu() for s in sets}
    scores = text_alignment(clip, sets, embedded, pool, pool, distractors=99, seed=0)
    assert scores["real images"]["clip_score"] is None and scores["real images"]["r_precision"] is None
    assert 0 <= scores["samples"]["clip_score"] <= 100 and scores["samples"]["distractors"] == 2


def test_anchor_sets_shrink_to_a_held_out_split_smaller_than_the_samples(tiny_run):
    from clipgen.pipeline import plan
    from clipgen.stages.evaluate_stage import anchor_sets, eval_prompts, read_labeled_split
    from clipgen.stages.generate_stage import load_generator

    held = read_labeled_split(plan(tiny_run)["shards"].path, "heldout", tiny_run.data.image_size, limit=100)
    prompts = eval_prompts(tiny_run, held.meta)
    sets = anchor_sets(tiny_run, load_generator(tiny_run, plan(tiny_run)), held, prompts, n=len(held.images) + 20)
    for s in sets:  # images and texts agree in every set, and no set invents real images
        assert len(s.images) == len(s.texts) == len(s.groups) == len(held.images), s.name

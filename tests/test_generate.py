"""Generation from a finished (tiny) run: the library call, the CLI, bridges, re-ranking, bad prompts."""

import csv
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipgen.cli import main
from clipgen.config import load_config
from clipgen.generate import PromptError, bridge_text, check_prompts, clip_scores, draw, generate
from clipgen.pipeline import plan, run_step, save_run_config
from clipgen.stages.generate_stage import load_generator


@pytest.fixture(scope="module")
def gen(tiny_run):
    return load_generator(tiny_run, plan(tiny_run))


def test_same_seed_same_images_other_seed_other_images(gen, tiny_run):
    s = dataclasses.replace(tiny_run.sample, n_per_prompt=3, cfg_scale=2.0, bridge="knn", seed=5)
    a, b = generate(gen, ["a red circle", "a blue star"], s), generate(gen, ["a red circle", "a blue star"], s)
    c = generate(gen, ["a red circle", "a blue star"], dataclasses.replace(s, seed=6))
    assert a.images.shape == (6, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.prompts == ["a red circle"] * 3 + ["a blue star"] * 3
    assert a.verdict is not None and len(a.verdict.shapes) == 6 and (a.clip_scores >= 0).all()


def test_rerank_keeps_the_clip_best_of_each_group(gen, tiny_run):
    s = dataclasses.replace(tiny_run.sample, n_per_prompt=2, rerank_candidates=3, rerank_against="prompt", seed=1)
    reranked = generate(gen, ["a green square"], s)
    pool = generate(gen, ["a green square"], dataclasses.replace(s, n_per_prompt=6, rerank_candidates=0))
    assert len(reranked.images) == 2
    best = [pool.clip_scores[i:i + 3].max() for i in (0, 3)]
    assert np.allclose(reranked.clip_scores, best, atol=1e-4)


def test_rerank_against_the_condition_keeps_the_best_match_to_each_draws_own_condition(gen, tiny_run):
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=16, knn_spread=0.5, n_per_prompt=2,
                            rerank_candidates=3, rerank_against="condition", seed=2)
    kept = generate(gen, ["a green square"], s)
    text = gen.clip.encode_texts(["a green square"])
    cond = bridge_text(gen, text.repeat(6, 1), s, torch.Generator().manual_seed(2))
    pool, _, _ = draw(gen, cond, cond, dataclasses.replace(s, rerank_candidates=0))  # all 6 candidates
    against_cond = clip_scores(gen.clip, pool, cond)
    assert kept.draws == [int(against_cond[i:i + 3].argmax()) + i for i in (0, 3)]
    assert np.allclose(kept.clip_scores, clip_scores(gen.clip, pool[kept.draws], text.repeat(2, 1)), atol=1e-4)


@pytest.mark.parametrize("weight", [0.0, 0.25])
def test_rerank_against_both_weights_the_prompt_beside_each_draws_condition(gen, tiny_run, weight):
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=16, knn_spread=0.5, n_per_prompt=4,
                            rerank_candidates=3, rerank_against="both", rerank_prompt_weight=weight, seed=3)
    kept = generate(gen, ["a green square"], s)
    text = gen.clip.encode_texts(["a green square"])
    cond = bridge_text(gen, text.repeat(12, 1), s, torch.Generator().manual_seed(3))
    pool, _, _ = draw(gen, cond, cond, dataclasses.replace(s, rerank_candidates=0))  # all 12 candidates
    scores = clip_scores(gen.clip, pool, F.normalize(weight * text + cond, dim=-1))
    assert kept.draws == [int(scores[i:i + 3].argmax()) + i for i in range(0, 12, 3)]
    if weight == 0:  # the condition alone
        assert kept.draws == generate(gen, ["a green square"], dataclasses.replace(s, rerank_against="condition")).draws


@pytest.mark.parametrize("margin", [0.0, 0.03, 2.0])
def test_rerank_prompt_then_condition_lets_the_condition_choose_among_those_near_the_prompts_best(gen, tiny_run,
                                                                                                  margin):
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=16, knn_spread=0.5, n_per_prompt=4, rerank_candidates=3,
                            rerank_against="prompt_then_condition", rerank_prompt_margin=margin, seed=4)
    kept = generate(gen, ["a green square"], s)
    text = gen.clip.encode_texts(["a green square"])
    cond = bridge_text(gen, text.repeat(12, 1), s, torch.Generator().manual_seed(4))
    pool, _, _ = draw(gen, cond, cond, dataclasses.replace(s, rerank_candidates=0))  # all 12 candidates
    emb = F.normalize(gen.clip.encode_images(pool).float(), dim=-1)
    to_text, to_cond = emb @ F.normalize(text.float(), dim=-1)[0], (emb * F.normalize(cond.float(), dim=-1)).sum(-1)
    expected = []
    for group in (range(i, i + 3) for i in range(0, 12, 3)):
        near = [j for j in group if to_text[j] >= max(to_text[k] for k in group) - margin]
        expected.append(max(near, key=lambda j: to_cond[j]))
    assert kept.draws == expected
    assert np.allclose(kept.clip_scores, clip_scores(gen.clip, pool[kept.draws], text.repeat(4, 1)), atol=1e-4)
    if margin in (0.0, 2.0):  # no room: the prompt's best; room for all: the condition's best
        alone = generate(gen, ["a green square"], dataclasses.replace(s, rerank_against="prompt" if margin == 0 else
                                                                       "condition"))
        assert kept.draws == alone.draws


def test_knn_bridge_keeps_the_text_as_mean_and_a_weighted_neighbour_as_variation(gen, tiny_run):
    from clipgen.index import NeighbourIndex, build_index

    text = F.normalize(torch.randn(1, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    images = F.normalize(text + 0.8 * torch.randn(50, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    g = gen._replace(index=NeighbourIndex(build_index(images.numpy()), [str(i) for i in range(50)]),
                     index_vectors=images.numpy())
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=3, knn_temperature=0.1, knn_spread=0.5, knn_shrink=0.0,
                            knn_centre_margin=0.0)
    assert torch.equal(bridge_text(g, text, dataclasses.replace(s, bridge="none")), text)
    cos, order = (images @ text[0]).topk(3)  # the 3 nearest images and their weights, by hand
    weights = torch.softmax(cos / 0.1, dim=0)
    offsets = images[order] - weights @ images[order]
    rms = (weights @ offsets.pow(2).sum(-1)).sqrt()
    allowed = F.normalize(text + 0.5 * offsets / rms, dim=-1)  # [3, D]
    assert (allowed @ allowed.T).min() < 0.99  # the three possible conditions differ
    cond = bridge_text(g, text.repeat(400, 1), s, torch.Generator().manual_seed(0))
    assert torch.allclose(cond.norm(dim=-1), torch.ones(400), atol=1e-5)
    match = (cond[:, None] - allowed[None]).abs().amax(-1) < 1e-5  # [400, 3]
    assert match.sum(1).eq(1).all()  # every draw is one of the three
    assert torch.allclose(match.float().mean(0), weights, atol=0.08)  # each as often as its weight
    assert torch.allclose(bridge_text(g, text, dataclasses.replace(s, knn_k=1)), text, atol=1e-5)  # no offset
    assert torch.allclose(bridge_text(g, text, dataclasses.replace(s, knn_k=500)).norm(), torch.ones(1))  # k > N


def crowded_and_lonely_texts(gen):
    """A generator whose index holds 60 random unit image embeddings, and two texts: one inside the cloud, with
    many images near it, and one near image 0 above all (a held-out combination's situation)."""
    from clipgen.index import NeighbourIndex, build_index

    images = F.normalize(torch.randn(60, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = gen._replace(index=NeighbourIndex(build_index(images.numpy()), [str(i) for i in range(60)]),
                     index_vectors=images.numpy())
    texts = torch.cat([F.normalize(images[:20].mean(0), dim=0)[None],
                       F.normalize(images[0] + 0.3 * images[1], dim=0)[None]])
    return g, images, texts


def test_knn_centre_margin_moves_the_centre_towards_the_mean_of_the_texts_own_images(gen, tiny_run):
    """With knn_centre_margin m the draws' centre is text + c / (c + prior) * (mean - text), the mean a plain one
    over the c neighbours within m of the nearest one's cosine: a text with many such neighbours moves most of
    the way, one with few barely moves, and the draws still vary around the moved centre."""
    g, images, texts = crowded_and_lonely_texts(gen)
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=60, knn_temperature=0.2, knn_spread=0.0,
                            knn_shrink=0.0, knn_centre_margin=0.3, knn_centre_prior=10.0)
    cos = texts @ images.T  # [2, 60]
    inside = cos >= cos.amax(-1, keepdim=True) - 0.3
    count = inside.sum(-1).float()
    assert count[0] > 3 * count[1]
    means = torch.stack([images[keep].mean(0) for keep in inside])
    trust = count / (count + 10.0)
    expected = F.normalize(texts + trust[:, None] * (means - texts), dim=-1)
    centred = bridge_text(g, texts.repeat_interleave(3, 0), s, torch.Generator().manual_seed(0))
    assert torch.allclose(centred, expected.repeat_interleave(3, 0), atol=1e-5)
    moved = 1 - (centred[::3] * texts).sum(-1)
    assert moved[0] > moved[1] > 0
    off = dataclasses.replace(s, knn_centre_margin=0.0)
    assert torch.allclose(bridge_text(g, texts, off), texts, atol=1e-6)
    # with a spread the draws still vary, now around the moved centre
    spread = dataclasses.replace(s, knn_spread=0.5)
    draws = bridge_text(g, texts[:1].repeat(50, 1), spread, torch.Generator().manual_seed(1))
    assert (draws @ draws.T).min() < 0.99
    assert (draws @ expected[0]).mean() > (draws @ texts[0]).mean()


def test_knn_shrink_shortens_the_steps_of_a_text_with_few_neighbours(gen, tiny_run):
    """With knn_shrink n0, a text whose weights spread over n neighbours (effective count) moves by
    spread * n / (n + n0): a text far from every train image, whose few nearest ones are a poor sample of
    how its own images vary (a held-out combination), keeps closer to what it says."""
    g, images, texts = crowded_and_lonely_texts(gen)
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=60, knn_temperature=0.2, knn_spread=0.5,
                            knn_shrink=0.0, knn_centre_margin=0.0)
    cos = texts @ images.T
    weights = torch.softmax(cos / 0.2, dim=-1)
    count = 1 / weights.pow(2).sum(-1)  # the effective count of neighbours, per text
    assert count[0] > 3 * count[1]
    rows = texts.repeat_interleave(100, 0)
    plain = bridge_text(g, rows, s, torch.Generator().manual_seed(3))
    shrunk = bridge_text(g, rows, dataclasses.replace(s, knn_shrink=5.0), torch.Generator().manual_seed(3))
    for t in range(2):  # the same neighbour drawn for each row, its step scaled by n / (n + 5)
        offsets = images - weights[t] @ images
        steps = 0.5 * offsets / (weights[t] @ offsets.pow(2).sum(-1)).sqrt()  # [60, D], one per neighbour
        match = (plain[100 * t:100 * (t + 1), None] - F.normalize(texts[t] + steps, dim=-1)).abs().amax(-1) < 1e-5
        assert match.sum(1).eq(1).all()
        drawn = match.float().argmax(1)  # which neighbour each row drew
        expected = F.normalize(texts[t] + steps[drawn] * count[t] / (count[t] + 5), dim=-1)
        assert torch.allclose(shrunk[100 * t:100 * (t + 1)], expected, atol=1e-5)
    assert (shrunk * rows).sum(-1).min() > (plain * rows).sum(-1).min()  # nearer the text


def test_knn_variation_own_draws_the_moved_share_of_variations_from_the_texts_own_images(gen, tiny_run):
    """With knn_variation own, a draw's neighbour is picked by (1 - t) * weight + t / c over the c own images
    (t = c / (c + prior), the centre's move), and its offset is from that mixture's mean, over its RMS: a text
    with many own images varies as they do, unweighted; one with few keeps its weighted neighbours."""
    g, images, texts = crowded_and_lonely_texts(gen)
    s = dataclasses.replace(tiny_run.sample, bridge="knn", knn_k=60, knn_temperature=0.05, knn_spread=0.5,
                            knn_shrink=0.0, knn_centre_margin=0.3, knn_centre_prior=10.0, knn_variation="own")
    cos = texts @ images.T  # [2, 60]
    inside = cos >= cos.amax(-1, keepdim=True) - 0.3
    count = inside.sum(-1).float()
    moved = count / (count + 10.0)
    weights = torch.softmax(cos / 0.05, dim=-1)
    mixed = (1 - moved[:, None]) * weights + moved[:, None] * inside.float() / count[:, None]
    rows = texts.repeat_interleave(2000, 0)
    cond = bridge_text(g, rows, s, torch.Generator().manual_seed(4))
    weighted = bridge_text(g, rows, dataclasses.replace(s, knn_variation="weighted"), torch.Generator().manual_seed(4))
    for t in range(2):
        centre = texts[t] + moved[t] * (images[inside[t]].mean(0) - texts[t])
        offsets = images - mixed[t] @ images
        allowed = F.normalize(centre + 0.5 * offsets / (mixed[t] @ offsets.pow(2).sum(-1)).sqrt(), dim=-1)  # [60, D]
        match = (cond[2000 * t:2000 * (t + 1), None] - allowed[None]).abs().amax(-1) < 1e-5  # [2000, 60]
        assert match.any(1).all()  # every draw is one of the 60 allowed conditions
        picked = match.float().argmax(1).bincount(minlength=60) / 2000
        assert (picked - mixed[t]).abs().max() < 0.04  # each as often as its mixed weight
    assert count[0] > 3 * count[1]  # the crowded text draws more from its own images than the lonely one
    assert not torch.equal(cond[:2000], weighted[:2000])


@pytest.mark.parametrize("bridge", ["noise", "knn"])
def test_each_draw_of_a_prompt_gets_its_own_bridged_condition(gen, tiny_run, bridge):
    text = gen.clip.encode_texts(["a red circle", "a blue star"]).repeat_interleave(4, 0)  # 4 draws per prompt
    s = dataclasses.replace(tiny_run.sample, bridge=bridge, knn_k=64, knn_spread=0.25)
    g = gen._replace(noise_level=0.3)
    cond = bridge_text(g, text, s, torch.Generator().manual_seed(0))
    assert cond.shape == text.shape and torch.allclose(cond.norm(dim=-1), torch.ones(8), atol=1e-5)
    for rows in (cond[:4], cond[4:]):  # the draws of one prompt differ from each other ...
        assert len(torch.unique(rows, dim=0)) > 1
        assert (rows @ rows.T).min() > 0.5  # ... but stay near one another
    again = bridge_text(g, text, s, torch.Generator().manual_seed(0))
    assert torch.equal(cond, again)  # and are reproducible from the seed


def test_sampling_noise_without_training_noise_is_a_config_error():
    from clipgen.config import ConfigError

    with pytest.raises(ConfigError, match="sample.bridge: noise adds the transformer's training noise"):
        load_config("pipelines/shapes.yaml", ["gpt.bridge=none", "sample.bridge=noise"])
    assert load_config("pipelines/shapes.yaml", ["gpt.bridge=noise", "sample.bridge=noise"]).sample.bridge == "noise"


def test_bad_prompts_are_refused_with_a_reason():
    with pytest.raises(PromptError, match="no prompts"):
        check_prompts([])
    with pytest.raises(PromptError, match="prompt 2 is empty"):
        check_prompts(["a red circle", "   "])
    with pytest.raises(PromptError, match="limit"):
        check_prompts(["x" * 5000])
    assert check_prompts(["  a   red\tcircle "]) == ["a red circle"]


def test_prompts_over_the_clip_context_warn_that_they_are_truncated(gen):
    from clipgen.generate import warn_truncated

    long = "a red circle on a dark background " * 20
    with pytest.warns(UserWarning, match=r"prompt 2 has \d+ tokens; the CLIP reads only the first"):
        assert warn_truncated(gen.clip, ["a red circle", long]) == [1]


def test_cli_writes_pngs_and_a_table(tiny_run, tmp_path, capsys):
    save_run_config(tiny_run)
    out = tmp_path / "samples"
    code = main(["generate", "--run", str(tiny_run.run_path), "a red circle", "a green triangle", "-n", "2",
                 "--out", str(out), "--cfg-scale", "1.5", "--seed", "3"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert len(rows) == 4 and {r["prompt"] for r in rows} == {"a red circle", "a green triangle"}
    assert all((out / r["file"]).is_file() for r in rows) and "judge_match" in rows[0]
    assert main(["generate", "--run", str(tiny_run.run_path), " ", "--out", str(out)]) == 2
    assert "prompt 1 is empty" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "no-such-run"), "a red circle", "--out", str(out)]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_generate_step_reports_prompt_accuracy_seen_and_held_out(tiny_run):
    cfg = dataclasses.replace(tiny_run, sample=dataclasses.replace(tiny_run.sample, prompts=["a red circle", "a red triangle"]))
    summary = run_step(cfg, "samples")
    assert summary["images"] == 4 and 0 <= summary["seen"] <= 1 and 0 <= summary["held_out"] <= 1
    assert set(summary["per_prompt"]) == {"a red circle", "a red triangle"}
    conditioned = summary["image_conditioned"]  # one sample per held-out image embedding
    assert conditioned["images"] == 24 and 0 <= conditioned["both"] <= 1
    assert len(list(plan(cfg)["samples"].path.glob("*.png"))) == 4


def test_a_missing_stage_is_a_clear_error(tmp_path):
    cfg = load_config("pipelines/shapes.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="no finished 'embeddings' step"):
        load_generator(cfg, plan(cfg))

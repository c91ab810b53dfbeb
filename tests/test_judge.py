"""The attribute judge: training writes a loadable directory, predictions round-trip, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipgen.config import DataConfig, JudgeConfig, WorldConfig
from clipgen.data.world import ATTRIBUTES, COLOUR_NAMES, SHAPES, ingest_world, world_arrays
from clipgen.judge import (
    JudgeVerdict,
    accuracy_of,
    attribute_mix,
    judge_accuracy,
    load_judge,
    prompt_hits,
    train_judge,
)


def tiny_data(**judge) -> DataConfig:
    world = WorldConfig(n_captioned=8, n_train=8, n_heldout=48, n_judge=96, held_out_combos=["red triangle"])
    return DataConfig(shard_size=20, world=world, judge=JudgeConfig(**{"steps": 4, "batch_size": 32, **judge}))


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    summary = train_judge(tiny_data(), out)
    return out, summary


def test_tiny_training_writes_a_self_describing_directory(tiny_judge_dir):
    out, summary = tiny_judge_dir
    assert {p.name for p in out.iterdir()} >= {"judge.safetensors", "config.json", "metrics.json"}
    assert set(summary) == {f"{name}_accuracy" for name in ATTRIBUTES} | {"train_seconds", "n_train", "n_heldout"}
    assert summary["n_train"] == 96 and summary["n_heldout"] == 48
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == {name: list(values) for name, values in ATTRIBUTES.items()}
    assert config["image_size"] == 32 and config["arch"]["widths"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0.0 <= metrics["shape_accuracy"] <= 1.0


def test_predict_accepts_every_documented_input(tiny_judge_dir):
    judge = load_judge(tiny_judge_dir[0])
    images = world_arrays(WorldConfig(), "heldout", 32, n=5).images
    verdict = judge.predict(images)
    assert isinstance(verdict, JudgeVerdict) and len(verdict.shapes) == len(verdict.colours) == 5
    assert set(verdict.shapes) <= set(SHAPES) and set(verdict.colours) <= set(COLOUR_NAMES)
    for name, values in ATTRIBUTES.items():
        assert len(verdict.of(name)) == 5 and set(verdict.of(name)) <= set(values)
    assert judge.features(images).shape == (5, 2 * judge.arch.widths[-1])
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert judge.predict(as_float) == verdict
    assert judge.predict([Image.fromarray(im) for im in images]) == verdict
    bigger = world_arrays(WorldConfig(), "heldout", 64, n=5).images  # resized to the judge's 32 px
    assert len(judge.predict(bigger).shapes) == 5
    ids = judge.predict_ids(images)
    assert set(ids) == set(ATTRIBUTES) and all(v.shape == (5,) and v.dtype == torch.int64 for v in ids.values())


def test_bad_image_batches_are_clear_errors(tiny_judge_dir):
    judge = load_judge(tiny_judge_dir[0])
    with pytest.raises(ValueError, match="add a batch dimension"):
        judge.predict(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        judge.predict(np.zeros((2, 3, 32, 32), np.uint8))


def test_save_load_round_trip_gives_identical_predictions(tiny_judge_dir, tmp_path):
    from clipgen.judge import save_judge

    first = load_judge(tiny_judge_dir[0])
    save_judge(first, tmp_path)
    second = load_judge(tmp_path)
    images = world_arrays(WorldConfig(), "judge", 32, n=16).images
    a, b = first.logits(images), second.logits(images)
    assert set(a) == set(ATTRIBUTES) and all(torch.equal(a[name], b[name]) for name in a)
    assert first.predict(images) == second.predict(images)


def test_missing_judge_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no judge at .*nothing_here.*ingest"):
        load_judge(tmp_path / "nothing_here")


def test_too_small_judge_split_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="n_judge"):
        train_judge(tiny_data(batch_size=500), tmp_path)


def test_judge_accuracy_reads_world_shards(tiny_judge_dir, tmp_path):
    data = tiny_data()
    ingest_world(data, tmp_path)
    result = judge_accuracy(load_judge(tiny_judge_dir[0]), tmp_path, split="heldout")
    assert result["split"] == "heldout" and result["n"] == 48
    assert 0 <= result["shape_correct"] <= 48 and 0.0 <= result["colour_accuracy"] <= 1.0
    # the shards hold exactly the images train_judge scored in memory, so the two measurements agree
    metrics = json.loads((tiny_judge_dir[0] / "metrics.json").read_text())
    for name in ATTRIBUTES:
        assert result[f"{name}_correct"] == metrics[f"{name}_correct"], name


def test_prompt_hits_score_only_the_attributes_a_prompt_names():
    verdict = JudgeVerdict(shapes=["circle", "star", "circle"], colours=["red", "red", "blue"],
                           sizes=["small", "large", "small"], backgrounds=["grey", "dark", "black"])
    hits = prompt_hits(["a red circle", "a small red circle on a dark background", "a blue circle"], verdict)
    assert list(hits["shape"]) == [1.0, 0.0, 1.0] and list(hits["colour"]) == [1.0, 1.0, 1.0]
    assert list(hits["both"]) == [1.0, 0.0, 1.0]
    assert np.isnan(hits["size"][[0, 2]]).all() and hits["size"][1] == 0.0 and hits["background"][1] == 1.0
    assert accuracy_of(hits["size"]) == 0.0 and accuracy_of(hits["background"]) == 1.0
    assert accuracy_of(hits["shape"]) == 2 / 3 and accuracy_of(np.full(2, np.nan)) is None


def test_attribute_mix_counts_every_label_including_the_ones_never_read():
    verdict = JudgeVerdict(shapes=["circle"] * 4, colours=["red"] * 4, sizes=["small", "small", "large", "small"],
                           backgrounds=["grey", "dark", "grey", "grey"])
    labels = {"size": ("small", "medium-sized", "large"), "background": ("black", "dark", "grey")}
    mix = attribute_mix(verdict, labels)
    assert mix == {"size": {"small": 0.75, "medium-sized": 0.0, "large": 0.25},
                   "background": {"black": 0.0, "dark": 0.25, "grey": 0.75}}
    assert attribute_mix(JudgeVerdict([], [], [], []), labels)["size"] == {"small": 0.0, "medium-sized": 0.0, "large": 0.0}


def test_an_old_single_pair_judge_folder_asks_for_a_rerun(tiny_judge_dir, tmp_path):
    import shutil

    for name in ("judge.safetensors", "config.json"):
        shutil.copy(tiny_judge_dir[0] / name, tmp_path / name)
    old = json.loads((tmp_path / "config.json").read_text())
    old.pop("format")
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="rerun the ingest stage"):
        load_judge(tmp_path)


@pytest.mark.slow
def test_default_judge_reads_every_attribute_on_heldout(tmp_path):
    summary = train_judge(DataConfig(), tmp_path)
    assert summary["shape_accuracy"] >= 0.99 and summary["colour_accuracy"] >= 0.99, summary
    assert summary["size_accuracy"] >= 0.95 and summary["background_accuracy"] >= 0.95, summary

"""The synthetic shapes world: determinism, split disjointness, held-out combos, captions, shards."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipgen.config import DataConfig, WorldConfig
from clipgen.data.shards import iter_shard, read_manifest, shard_paths
from clipgen.data.world import (
    ATTRIBUTES,
    BLACK_BELOW,
    COLOUR_NAMES,
    COLOURS,
    GREY_FROM,
    LARGE_FROM,
    LEVEL_MARGIN,
    SHAPES,
    SIZE_MARGIN,
    SMALL_BELOW,
    caption,
    ingest_world,
    iter_world_split,
    parse_combos,
    prompt_attributes,
    render,
    sample_attributes,
    sample_rng,
    split_attributes,
    world_arrays,
)


def small_world(**overrides) -> WorldConfig:
    values = {"n_captioned": 40, "n_train": 300, "n_heldout": 300, "n_judge": 30,
              "held_out_combos": ["red triangle", "blue star"], "seed": 3}
    return WorldConfig(**{**values, **overrides})


def test_constants_name_what_the_brief_requires():
    assert {"circle", "square", "triangle", "star"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLOURS)
    assert COLOUR_NAMES == tuple(COLOURS)


def test_same_seed_gives_identical_bytes_and_seeds_differ():
    world = small_world()
    first = [s.image for s in iter_world_split(world, "heldout", 32)]
    assert first == [s.image for s in iter_world_split(world, "heldout", 32)]
    assert first != [s.image for s in iter_world_split(small_world(seed=4), "heldout", 32)]


def test_parallel_rendering_matches_serial(monkeypatch):
    import clipgen.data.world as world_module

    monkeypatch.setattr(world_module, "CHUNK", 50)  # several chunks, so the pool really splits the work
    world = small_world()
    serial = [(s.key, s.image, s.meta) for s in iter_world_split(world, "train", 32, workers=1)]
    parallel = [(s.key, s.image, s.meta) for s in iter_world_split(world, "train", 32, workers=2)]
    assert serial == parallel


def test_splits_are_different_draws():
    world = small_world()
    images = {split: world_arrays(world, split, 32, n=20).images for split in ("captioned", "train", "heldout", "judge")}
    splits = list(images)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not np.array_equal(images[a], images[b]), f"{a} and {b} drew the same images"


def test_held_out_combos_never_in_train_but_in_heldout():
    world = small_world()
    train = [s.meta for s in iter_world_split(world, "train", 32)]
    heldout = [s.meta for s in iter_world_split(world, "heldout", 32)]
    held = {"red triangle", "blue star"}
    assert not [m for m in train if f"{m['colour']} {m['shape']}" in held]
    assert not any(m["held_out_combo"] for m in train)
    seen = {f"{m['colour']} {m['shape']}" for m in heldout if m["held_out_combo"]}
    assert seen == held
    assert all(m["held_out_combo"] == (f"{m['colour']} {m['shape']}" in held) for m in heldout)


def test_bad_combo_is_a_clear_error():
    with pytest.raises(ValueError, match="'pink triangle'.*COLOUR in"):
        parse_combos(["pink triangle"])
    with pytest.raises(ValueError, match="'red hexagon'"):
        list(iter_world_split(small_world(held_out_combos=["red hexagon"]), "heldout", 32))
    with pytest.raises(ValueError, match="unknown world split 'test'"):
        world_arrays(small_world(), "test", 32)


def test_captions_name_colour_and_shape():
    rng = np.random.default_rng(0)
    captions = set()
    for i in range(200):
        attrs = sample_attributes(sample_rng(0, "captioned", i))
        text = caption(attrs, rng)
        words = text.split()
        assert attrs.colour in words and attrs.shape in words, text
        assert " a orange" not in f" {text}" and " a a" not in f" {text}"
        captions.add(text)
    assert len(captions) > 100  # templates, sizes and backgrounds give variety


def test_render_sizes_and_meta():
    world = small_world()
    for size in (32, 64):
        sample = next(iter_world_split(world, "captioned", size))
        image = Image.open(io.BytesIO(sample.image))
        assert image.mode == "RGB" and image.size == (size, size)
        assert sample.ext == "png" and sample.key == "captioned-0000000" and "." not in sample.key
        assert set(sample.meta) >= {"split", "shape", "colour", "size", "background", "caption", "held_out_combo"}
    attrs, _ = split_attributes(world, "heldout", 0)
    assert render(attrs, 64).size == (64, 64)


def test_shape_pixels_carry_the_named_colour():
    attrs, _ = split_attributes(small_world(), "heldout", 5)
    image = np.asarray(render(attrs, 32)).astype(int)
    centre = image[int(attrs.cy * 32), int(attrs.cx * 32)]
    assert np.abs(centre - np.array(COLOURS[attrs.colour])).max() <= 16  # colour jitter only
    assert np.abs(image[0, 0] - np.array(attrs.background_rgb)).max() <= 16  # a background corner


def test_world_arrays_match_samples():
    world = small_world()
    arrays = world_arrays(world, "heldout", 32, n=10)
    assert arrays.images.shape == (10, 32, 32, 3) and arrays.images.dtype == np.uint8
    assert set(arrays.labels) == set(ATTRIBUTES) and all(v.dtype == np.int64 for v in arrays.labels.values())
    meta_key = {"shape": "shape", "colour": "colour", "size": "size_word", "background": "background"}
    for i, sample in zip(range(10), iter_world_split(world, "heldout", 32), strict=False):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image))), arrays.images[i])
        for name, values in ATTRIBUTES.items():
            assert values[arrays.labels[name][i]] == sample.meta[meta_key[name]]


def test_size_and_background_words_keep_a_margin_from_their_thresholds():
    attrs = [sample_attributes(sample_rng(0, "train", i)) for i in range(3000)]
    sizes = np.array([a.size for a in attrs])
    assert np.abs(sizes[:, None] - np.array([SMALL_BELOW, LARGE_FROM])).min() >= SIZE_MARGIN
    levels = np.array([np.mean(a.background_rgb) for a in attrs])  # the level plus the tint's mean
    for name, low, high in (("black", 0, BLACK_BELOW - LEVEL_MARGIN), ("dark", BLACK_BELOW + LEVEL_MARGIN,
                            GREY_FROM - LEVEL_MARGIN), ("grey", GREY_FROM + LEVEL_MARGIN, 255)):
        chosen = levels[[a.background_name == name for a in attrs]]
        assert len(chosen) > 300 and (chosen > low - 8.5).all() and (chosen < high + 8.5).all(), name
    assert {a.size_word for a in attrs} == {"small", "medium-sized", "large"}


def test_prompt_attributes_reads_every_word_a_caption_can_name():
    assert prompt_attributes("a red circle") == {"colour": "red", "shape": "circle"}
    assert prompt_attributes("A small Blue star on a grey background") == {
        "size": "small", "colour": "blue", "shape": "star", "background": "grey"}
    assert prompt_attributes("a black background with a medium-sized orange square")["background"] == "black"
    assert prompt_attributes("a medium green triangle")["size"] == "medium-sized"
    assert "background" not in prompt_attributes("a dark red circle")  # not followed by "background"
    assert prompt_attributes("a cat") == {}
    rng = np.random.default_rng(1)
    for i in range(100):  # every caption's words are read back
        attrs = sample_attributes(sample_rng(0, "captioned", i))
        for name, word in prompt_attributes(caption(attrs, rng)).items():
            assert attrs.label(name) == word


def test_ingest_world_writes_readable_shards(tmp_path):
    data = DataConfig(shard_size=32, world=small_world(n_train=70, n_heldout=20))
    manifest = ingest_world(data, tmp_path)
    assert manifest["counts"] == {"captioned": 40, "train": 70, "heldout": 20}
    assert read_manifest(tmp_path)["counts"] == manifest["counts"]
    assert [s["count"] for s in manifest["shards"]["train"]] == [32, 32, 6]
    for split, count in manifest["counts"].items():
        paths = shard_paths(tmp_path, split)
        ours = [(key, parts) for p in paths for key, parts in iter_shard(p)]
        assert len(ours) == count and all(set(parts) == {"png", "json"} for _, parts in ours)
        theirs = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
        assert [s["__key__"] for s in theirs] == [key for key, _ in ours]
        assert json.loads(theirs[0]["json"])["split"] == split
        assert Image.open(io.BytesIO(theirs[0]["png"])).size == (32, 32)

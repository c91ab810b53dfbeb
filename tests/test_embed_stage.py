"""The pretrain-clip and embed steps at a tiny size, run through the library (no Prefect)."""

import io
import json

import numpy as np
import pytest
import torch

from clipgen.config import load_config
from clipgen.embed import cache_files, read_embeddings
from clipgen.index import load_index, search
from clipgen.pipeline import plan, run_step

TINY = ["data.world.n_captioned=64", "data.world.n_train=48", "data.world.n_heldout=24", "data.shard_size=16",
        "clip.toy.steps=3", "clip.toy.batch_size=16", "data.workers=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = load_config("pipelines/shapes.yaml", [*TINY, f"run_dir={root}"])
    for step in ("shards", "toyclip", "embeddings"):
        run_step(cfg, step)
    return cfg


def test_embed_writes_every_sample_once_and_an_index(run):
    art = plan(run)["embeddings"]
    train = read_embeddings(cache_files(art.path, "train"))
    held = read_embeddings(cache_files(art.path, "heldout"))
    assert len(train.keys) == 48 and len(set(train.keys)) == 48 and len(held.keys) == 24
    assert train.vectors.shape[1] == art.summary()["embed_dim"]
    found = search(load_index(art.path), train.vectors[:5], k=1)
    assert np.all(found.scores[:, 0] > 0.999)  # each vector finds itself (or an exact twin: weak toy CLIP)
    probe = json.loads((plan(run)["toyclip"].path / "probe.json").read_text())
    assert set(probe["zero_shot"]) == {"colour", "shape"} and "cos_image_caption" in probe["modality_gap"]


def test_rerun_skips_and_an_interrupted_embed_redoes_only_missing_shards(run, monkeypatch):
    art = plan(run)["embeddings"]
    assert run_step(run, "embeddings")["cached"] is True
    files = cache_files(art.path, "train")
    before = {p.name: p.read_bytes() for p in files}
    files[1].unlink()  # as if killed after the other shards finished
    art.marker.unlink()
    calls = []

    import clipgen.stages.clip_stage as clip_stage
    real = clip_stage.embed_shards
    monkeypatch.setattr(clip_stage, "embed_shards", lambda clip, jobs, *a, **k: calls.extend(o.name for _, o in jobs)
                        or real(clip, jobs, *a, **k))
    result = run_step(run, "embeddings")
    assert result["cached"] is False and calls == [files[1].name]
    assert {p.name: p.read_bytes() for p in cache_files(art.path, "train")} == before


def test_embed_id_follows_the_clip_and_nothing_else(run):
    base = plan(run)["embeddings"].id
    assert plan(load_config("pipelines/shapes.yaml", [*TINY, "clip.batch_size=7"]))["embeddings"].id == base
    assert plan(load_config("pipelines/shapes.yaml", [*TINY, "clip.toy.steps=4"]))["embeddings"].id != base
    assert plan(load_config("pipelines/shapes.yaml", [*TINY, "gpt.n_layer=2"]))["embeddings"].id == base
    assert plan(load_config("pipelines/shapes.yaml", [*TINY, "clip.decoder=opencv"]))["embeddings"].id == base
    # a GPU's JPEG decoder may differ in the last bit: its embeddings are another cache
    assert plan(load_config("pipelines/shapes.yaml", [*TINY, "clip.decoder=nvimgcodec"]))["embeddings"].id != base
    real = plan(load_config("pipelines/shapes.yaml", [*TINY, "clip.model=ViT-B-32"]))
    assert "toyclip" not in real and real["embeddings"].id != base


def test_local_checkpoint_digest_is_part_of_the_id(tmp_path):
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"a" * 10)
    first = plan(load_config("pipelines/shapes.yaml", ["clip.model=ViT-B-32", f"clip.pretrained={ckpt}"]))
    ckpt.write_bytes(b"b" * 11)
    second = plan(load_config("pipelines/shapes.yaml", ["clip.model=ViT-B-32", f"clip.pretrained={ckpt}"]))
    assert first["embeddings"].id != second["embeddings"].id


def test_language_free_embeddings_ignore_captions(run, tmp_path):
    """Strip every json member from the shards and embed again: identical embeddings."""
    import tarfile

    from clipgen.clip import load_clip
    from clipgen.embed import embed_shard
    shards = sorted((plan(run)["shards"].path / "train").glob("*.tar"))
    clip = load_clip("toy-clip", str(plan(run)["toyclip"].path))
    for shard in shards[:1]:
        bare = tmp_path / shard.name
        with tarfile.open(shard) as src, tarfile.open(bare, "w") as dst:
            for member in src:
                if not member.name.endswith(".json"):
                    dst.addfile(member, src.extractfile(member))
        a = embed_shard(clip, shard, tmp_path / "a.parquet", threads=0)
        b = embed_shard(clip, bare, tmp_path / "b.parquet", threads=0)
        assert a.count == b.count == 16
        ea, eb = read_embeddings([tmp_path / "a.parquet"]), read_embeddings([tmp_path / "b.parquet"])
        assert ea.keys == eb.keys and np.array_equal(ea.vectors, eb.vectors)


def test_shard_decoding_matches_clip_preprocessing_at_and_off_model_size(run):
    from PIL import Image

    from clipgen.clip import load_clip
    from clipgen.embed import ShardImages

    clip = load_clip("toy-clip", str(plan(run)["toyclip"].path))
    images = ShardImages([], clip.fit_image, clip.image_size, batch_size=4)  # only its decoding is used
    rng = np.random.default_rng(0)
    for size in (clip.image_size, 45):  # at model size (decode only) and off it (CLIP's resize and crop)
        pixels = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        ours = clip.prepare_images(images._decode(buf.getvalue())[None])[0]
        reference = clip.preprocess(Image.fromarray(pixels))
        assert torch.allclose(ours, reference, atol=1e-5), size


def test_the_mapped_tasks_carry_model_names_not_models(run):
    """A Dask task runner pickles each task: the embed and tokenize tasks must not hold the loaded model."""
    import pickle

    from clipgen.pipeline import plan
    from clipgen.stages.clip_stage import EmbedShards, clip_weights, process_clip
    from clipgen.stages.vqgan_stage import TokenizeShard

    task = EmbedShards(run.clip.model, clip_weights(run, plan(run)), run.clip.batch_size, run.clip.decoder)
    assert len(pickle.dumps(task)) < 1000 and len(pickle.dumps(TokenizeShard("/some/vqgan"))) < 1000
    assert process_clip.cache_info().currsize == 0  # a finished build leaves no model behind

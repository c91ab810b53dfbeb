"""The embedding cache and the faiss index, with a deterministic stand-in encoder (fast, no CLIP)."""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipgen.data.shards import Sample, write_shards
from clipgen.embed import embed_shard, embed_shards, read_embeddings
from clipgen.index import build_index, load_index, save_index, search


class MeanColourEncoder:
    """Maps an image to a fixed random projection of its pixels: deterministic and image-dependent."""

    embed_dim = 16
    image_size = 8
    preprocess_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def __init__(self):
        self.proj = torch.randn(3 * 8 * 8, self.embed_dim, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    device = torch.device("cpu")

    def fit_image(self, img):
        return np.asarray(img.resize((8, 8)), dtype=np.uint8)

    def encode_images(self, images, batch_size=256):
        assert images.dtype == torch.uint8 and images.shape[1:] == (8, 8, 3)
        self.calls += 1
        out = images.float().flatten(1) @ self.proj
        return out / out.norm(dim=1, keepdim=True)


def png(colour, size=16):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def make_shard(tmp_path, n=20, corrupt=(), with_meta=True, name="s"):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        data = b"not an image" if i in corrupt else png(colour)
        meta = {"caption": f"caption {i}", "colour": "red"} if with_meta else {}
        samples.append(Sample(f"k{i:03d}", data, "png", meta))
    return write_shards(samples, tmp_path / name, "train", shard_size=n)[0], tmp_path / name / "train/00000.tar"


def test_embed_shard_writes_sorted_unit_float16_rows(tmp_path):
    _, shard = make_shard(tmp_path)
    res = embed_shard(MeanColourEncoder(), shard, tmp_path / "out.parquet", batch_size=6, threads=2)
    assert res.count == 20 and res.skipped_keys == []
    table = pq.read_table(tmp_path / "out.parquet")
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[16]"
    emb = read_embeddings([tmp_path / "out.parquet"])
    assert emb.keys == sorted(emb.keys) and len(set(emb.keys)) == 20
    assert np.allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, atol=2e-3)


def test_corrupt_samples_are_skipped_without_shifting_rows(tmp_path):
    _, clean = make_shard(tmp_path, name="clean")
    _, dirty = make_shard(tmp_path, corrupt={3, 11}, name="dirty")
    enc = MeanColourEncoder()
    embed_shard(enc, clean, tmp_path / "clean.parquet", batch_size=4, threads=0)
    res = embed_shard(enc, dirty, tmp_path / "dirty.parquet", batch_size=4, threads=2)
    assert res.count == 18 and res.skipped_keys == ["k003", "k011"]
    a, b = read_embeddings([tmp_path / "clean.parquet"]), read_embeddings([tmp_path / "dirty.parquet"])
    by_key = dict(zip(a.keys, a.vectors, strict=True))
    for key, vec in zip(b.keys, b.vectors, strict=True):
        assert np.allclose(by_key[key], vec, atol=1e-3)  # batch composition may change the last bit


def test_embeddings_never_read_captions(tmp_path):
    _, with_meta = make_shard(tmp_path, name="meta")
    _, without = make_shard(tmp_path, with_meta=False, name="bare")
    enc = MeanColourEncoder()
    embed_shard(enc, with_meta, tmp_path / "a.parquet", threads=0)
    embed_shard(enc, without, tmp_path / "b.parquet", threads=0)
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_a_crash_mid_shard_leaves_no_file(tmp_path):
    _, shard = make_shard(tmp_path)

    class Crashing(MeanColourEncoder):
        def encode_images(self, images, batch_size=256):
            if self.calls == 1:
                raise KeyboardInterrupt("killed")
            return super().encode_images(images, batch_size)

    with pytest.raises(KeyboardInterrupt):
        embed_shard(Crashing(), shard, tmp_path / "out.parquet", batch_size=5, threads=0)
    assert not any(p.name.endswith(".parquet") or ".tmp" in p.name for p in tmp_path.iterdir())


def test_many_shards_in_one_call_match_shard_by_shard(tmp_path):
    shards = [make_shard(tmp_path, n=n, corrupt=corrupt, name=f"s{i}")[1]
              for i, (n, corrupt) in enumerate([(20, {3}), (3, {0, 1, 2}), (7, ()), (13, {12})])]
    enc = MeanColourEncoder()
    jobs = [(shard, tmp_path / f"many{i}.parquet") for i, shard in enumerate(shards)]
    results = list(embed_shards(enc, jobs, batch_size=4, threads=3))  # batches straddle no shard
    assert [r.path for r in results] == [str(out) for _, out in jobs]
    assert [r.count for r in results] == [19, 0, 7, 12]
    assert [r.skipped_keys for r in results] == [["k003"], ["k000", "k001", "k002"], [], ["k012"]]
    for i, (shard, out) in enumerate(jobs):
        alone = embed_shard(enc, shard, tmp_path / f"one{i}.parquet", batch_size=5, threads=0)
        a, b = read_embeddings([out]), read_embeddings([Path(alone.path)])
        assert a.keys == b.keys == sorted(b.keys) and np.allclose(a.vectors, b.vectors, atol=1e-3)


def test_decoding_into_a_batch_row_gives_the_same_pixels():
    from clipgen.data.images_array import decode_rgb

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    batch = np.zeros((2, 8, 8, 3), np.uint8)
    decode_rgb(buf.getvalue(), batch[1])
    assert np.array_equal(batch[1], pixels) and np.array_equal(decode_rgb(buf.getvalue()), pixels)
    assert not batch[0].any()
    assert np.array_equal(decode_rgb(buf.getvalue(), np.zeros((4, 4, 3), np.uint8)), pixels)  # other size: new array


def test_a_crash_in_a_later_shard_keeps_the_finished_ones(tmp_path):
    shards = [make_shard(tmp_path, n=8, name=f"s{i}")[1] for i in range(3)]

    class Crashing(MeanColourEncoder):
        def encode_images(self, images, batch_size=256):
            if self.calls == 3:  # the first batch of the second shard
                raise KeyboardInterrupt("killed")
            return super().encode_images(images, batch_size)

    jobs = [(shard, tmp_path / "out" / f"{i}.parquet") for i, shard in enumerate(shards)]
    with pytest.raises(KeyboardInterrupt):
        list(embed_shards(Crashing(), jobs, batch_size=4, threads=0))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.parquet"]


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_index_finds_each_vector_itself(tmp_path, kind):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"k{i}" for i in range(2000)]
    save_index(build_index(vectors, kind), keys, tmp_path)
    nn = load_index(tmp_path)
    found = search(nn, vectors[:50], k=3)
    hits = np.mean([row[0] == keys[i] for i, row in enumerate(found.keys)])
    assert hits >= (1.0 if kind == "flat" else 0.8)
    assert found.scores.shape == (50, 3) and np.all(np.diff(found.scores, axis=1) <= 1e-5)


def test_auto_index_switches_to_ivfpq_above_the_threshold():
    vectors = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    assert type(build_index(vectors, "auto", ivfpq_min_size=5000)).__name__ == "IndexFlatIP"
    assert type(build_index(vectors, "auto", ivfpq_min_size=500)).__name__ == "IndexIVFPQ"


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the embed stage"):
        load_index(tmp_path)


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_nvimgcodec_decoder_matches_opencv_sample_for_sample(tmp_path):
    """nvImageCodec's CPU codecs on a CPU device: the same pixels, the same skipped samples, the same rows."""
    pytest.importorskip("nvidia.nvimgcodec", reason="the dev extra installs nvidia-nvimgcodec-cu13")
    rng = np.random.default_rng(1)
    formats = ["PNG", "JPEG", "GIF", "WEBP"]  # GIF: nvImageCodec cannot read it, so decode_rgb takes it
    samples = []
    for i in range(22):
        size = 8 if i % 3 else 13  # off model size: the CLIP's own fit_image
        data = _encoded(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), formats[i % len(formats)])
        data = {5: b"not an image", 9: data[:len(data) // 3], 16: b""}.get(i, data)  # corrupt, truncated, empty
        samples.append(Sample(f"k{i:03d}", data, "jpg" if formats[i % 4] == "JPEG" else "png", {}))
    write_shards(samples, tmp_path / "s", "train", shard_size=22)
    shard = tmp_path / "s/train/00000.tar"
    enc = MeanColourEncoder()
    ref = embed_shard(enc, shard, tmp_path / "cv.parquet", batch_size=5, threads=2)
    got = embed_shard(enc, shard, tmp_path / "nv.parquet", batch_size=5, threads=2, decoder="nvimgcodec")
    assert ref.skipped_keys == got.skipped_keys == ["k005", "k009", "k016"] and got.count == ref.count == 19
    assert pq.read_table(tmp_path / "cv.parquet").equals(pq.read_table(tmp_path / "nv.parquet"))


def test_unknown_decoder_is_refused(tmp_path):
    _, shard = make_shard(tmp_path, n=2)
    with pytest.raises(ValueError, match="unknown embed decoder 'turbo'; choose from"):
        embed_shard(MeanColourEncoder(), shard, tmp_path / "x.parquet", decoder="turbo")


def test_missing_nvimgcodec_names_the_package(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import fails as if not installed
    _, shard = make_shard(tmp_path, n=2)
    with pytest.raises(ImportError, match="nvidia-nvimgcodec-cu13"):
        embed_shard(MeanColourEncoder(), shard, tmp_path / "x.parquet", decoder="nvimgcodec")


def test_nvimgcodec_decoders_are_reused_by_later_pipelines_and_never_held_by_two(monkeypatch, tmp_path):
    """Starting a decoder costs ~0.7 s on a GPU, so the stage's pipelines (a group of shards each) share a pool."""
    pytest.importorskip("nvidia.nvimgcodec", reason="the dev extra installs nvidia-nvimgcodec-cu13")
    import collections

    from clipgen.data import nvdecode
    from clipgen.embed import device_batches

    monkeypatch.setattr(nvdecode, "_idle_decoders", collections.defaultdict(list))
    started = []

    class CountedDecoder(nvdecode.NvImageCodecDecoder):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self)

    monkeypatch.setattr(nvdecode, "NvImageCodecDecoder", CountedDecoder)
    enc, (_, shard) = MeanColourEncoder(), make_shard(tmp_path, n=12)
    for name in ("a", "b"):
        result = embed_shard(enc, shard, tmp_path / f"{name}.parquet", batch_size=5, threads=1, decoder="nvimgcodec")
        assert result.count == 12
    assert len(started) == 1
    first, second = (device_batches(enc, [shard], 5, threads=1, decoder="nvimgcodec") for _ in range(2))
    next(first), next(second)  # two pipelines at once: the second starts a decoder of its own
    assert len(started) == 2
    first.close(), second.close()  # consumers that stop early give their decoders back
    assert sorted(map(id, nvdecode._idle_decoders[("cpu", 1, "bicubic")])) == sorted(map(id, started))


def test_nvimgcodec_sends_square_jpegs_to_the_gpu_decoder_and_the_rest_to_its_cpu_codecs():
    """The routing and the batch assembly of the GPU path, on a CPU: a stand-in GPU decoder returns arrays,
    which become tensors as a GPU decoder's images do. (The GPU decoder itself needs a GPU.)"""
    pytest.importorskip("nvidia.nvimgcodec", reason="the dev extra installs nvidia-nvimgcodec-cu13")
    from PIL import ImageOps

    from clipgen.data.images_array import decode_rgb
    from clipgen.data.nvdecode import NvImageCodecDecoder

    decoder = NvImageCodecDecoder(torch.device("cpu"), cpu_threads=1)
    routed = []

    class StandInGpuDecoder:
        def decode(self, streams, params, cuda_stream):
            routed.extend((s.codec_name, s.height, s.width) for s in streams)
            return [np.asarray(image) for image in decoder._cpu_decoder.decode(streams, params=params)]

    decoder._gpu_decoder = StandInGpuDecoder()
    rng = np.random.default_rng(2)
    image = lambda h, w=None: rng.integers(0, 256, (h, w or h, 3), dtype=np.uint8)  # noqa: E731
    fit = lambda img: np.asarray(ImageOps.fit(img, (8, 8), Image.BICUBIC), dtype=np.uint8)  # noqa: E731
    datas = [_encoded(image(8), "JPEG"), _encoded(image(8), "PNG"), _encoded(image(24), "JPEG"), b"junk",
             _encoded(image(8), "GIF"), None, _encoded(image(8), "JPEG"), _encoded(image(12, 9), "JPEG")]
    pixels, decoded = decoder.decode(datas, 8, fit)
    # rows 0, 2 and 6 are square JPEGs; the 12x9 one takes the CLIP's own crop on the host
    assert routed == [("jpeg", 8, 8), ("jpeg", 24, 24), ("jpeg", 8, 8)]
    assert decoded == [True, True, True, False, True, False, True, True]
    for i in (0, 1, 4, 6, 7):
        want = decode_rgb(datas[i])
        assert np.array_equal(pixels[i].numpy(), want if want.shape[:2] == (8, 8) else fit(Image.fromarray(want))), i
    resized = pixels[2].numpy().astype(int) - fit(Image.fromarray(decode_rgb(datas[2]))).astype(int)
    assert np.abs(resized).max() <= 3  # torch's antialiased bicubic in place of PIL's
    routed.clear()
    pixels, decoded = decoder.decode(datas[:1] + datas[6:7], 8, fit)  # a batch all on the "GPU": one stack
    assert len(routed) == 2 and decoded == [True, True]
    assert np.array_equal(pixels[1].numpy(), decode_rgb(datas[6]))

"""Checks that need a CUDA device: skipped (and reported as skipped) elsewhere. On a GPU host:
``HF_HUB_OFFLINE=1 python -m pytest -q -rs tests/test_gpu.py``."""

import numpy as np
import pytest
import torch
from PIL import Image

from clipgen.data.images import encode_jpeg
from clipgen.data.images_array import decode_rgb
from clipgen.data.shards import Sample, write_shards

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo(rng, size: int) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, unlike pure noise."""
    base = np.linspace(0, 255, size)[None, :, None] * rng.random(3) + np.linspace(0, 90, size)[:, None, None]
    return np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_nvimgcodec_on_the_gpu_gives_opencvs_pixels_within_rounding():
    pytest.importorskip("nvidia.nvimgcodec", reason="install the gpu extra: nvidia-nvimgcodec-cu13[all]")
    from clipgen.data.nvdecode import NvImageCodecDecoder

    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(Image.fromarray(photo(rng, 224))) for _ in range(24)]  # what ingest writes
    datas = [*jpegs, png(photo(rng, 224)), b"junk", encode_jpeg(Image.fromarray(photo(rng, 300)))]
    fit = lambda img: np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.uint8)  # noqa: E731
    pixels, decoded = NvImageCodecDecoder(torch.device("cuda"), cpu_threads=4).decode(datas, 224, fit)
    assert pixels.is_cuda and decoded == [True] * 25 + [False, True]
    got = pixels.cpu().numpy().astype(int)
    diffs = [np.abs(got[i] - decode_rgb(data).astype(int)) for i, data in enumerate(jpegs)]
    worst, mean = max(d.max() for d in diffs), float(np.mean([d.mean() for d in diffs]))
    print(f"GPU JPEG decoding vs libjpeg-turbo: max |diff| {worst}, mean {mean:.3f} levels")
    assert worst <= 8 and mean < 0.5  # IDCTs differ in rounding only
    assert np.array_equal(got[24], decode_rgb(datas[24]))  # PNG: CPU codec, exact
    resized = np.abs(got[26] - fit(Image.fromarray(decode_rgb(datas[26]))).astype(int))  # on the GPU
    print(f"GPU decoding and resizing 300 -> 224 px vs OpenCV + PIL: max |diff| {resized.max()}, "
          f"mean {resized.mean():.3f} levels")
    assert resized.max() <= 16 and resized.mean() < 1.0


def test_embed_with_nvimgcodec_on_the_gpu_matches_opencv(tmp_path):
    pytest.importorskip("nvidia.nvimgcodec", reason="install the gpu extra: nvidia-nvimgcodec-cu13[all]")
    from clipgen.clip import load_clip
    from clipgen.embed import embed_shard, read_embeddings

    rng = np.random.default_rng(1)
    clip = load_clip("toy-clip", None, device="cuda")
    size = clip.image_size
    samples = [Sample(f"k{i:03d}", encode_jpeg(Image.fromarray(photo(rng, size))), "jpg", {}) for i in range(300)]
    samples[7] = Sample("k007", png(photo(rng, size)), "png", {})
    samples[11] = Sample("k011", b"not an image", "jpg", {})
    write_shards(samples, tmp_path / "s", "train", shard_size=300)
    shard = tmp_path / "s/train/00000.tar"
    ref = embed_shard(clip, shard, tmp_path / "cv.parquet", batch_size=64)
    got = embed_shard(clip, shard, tmp_path / "nv.parquet", batch_size=64, decoder="nvimgcodec")
    assert ref.skipped_keys == got.skipped_keys == ["k011"] and ref.count == got.count == 299
    a, b = read_embeddings([tmp_path / "cv.parquet"]), read_embeddings([tmp_path / "nv.parquet"])
    assert a.keys == b.keys
    cosines = (a.vectors * b.vectors).sum(axis=1)
    print(f"embedding cosine, nvimgcodec vs opencv: min {cosines.min():.5f}")
    assert cosines.min() > 0.995

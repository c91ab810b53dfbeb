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


# ----------------------------------------------------------------------------- transformer sampling, training
def small_gpt():
    from clipgen.models.gpt import GPT, GPTShape

    torch.manual_seed(0)
    shape = GPTShape(vocab_size=300, n_tokens=40, cond_dim=32, n_layer=3, n_head=4, n_embd=64, n_prefix=4)
    cond = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    return GPT(shape).cuda().eval(), cond.cuda()


@pytest.mark.parametrize(("attention", "bucket"), [("kernel", 16), ("bucket", 16), ("bucket", 7), ("exact", 1)])
def test_graphed_sampling_gives_the_reference_tokens_under_greedy_decoding(attention, bucket):
    from clipgen.sample import Sampling, sample_tokens_uncached
    from clipgen.sample_graphed import sample_tokens_graphed

    model, cond = small_gpt()
    s = Sampling(greedy=True, cfg_scale=2.0)
    want = sample_tokens_uncached(model, cond, s)
    for _ in range(2):  # the second call replays the graphs the first one captured
        got = sample_tokens_graphed(model, cond, s, attention=attention, bucket=bucket, graphs=True)
        assert torch.equal(got, want)


def test_graphed_seeded_draws_equal_the_plain_loops_and_the_default_runs_in_bf16():
    from clipgen.sample import Sampling, sample_tokens
    from clipgen.sample_graphed import sample_tokens_graphed

    model, cond = small_gpt()
    s = Sampling(top_k=50, top_p=0.95, cfg_scale=2.0)
    seeded = lambda seed: torch.Generator("cuda").manual_seed(seed)  # noqa: E731
    plain = sample_tokens(model, cond, s, seeded(3))
    # exact windows run the plain loop's attention kernel on the same shapes: the same logits, the same draws
    assert torch.equal(sample_tokens_graphed(model, cond, s, seeded(3), attention="exact"), plain)
    assert not torch.equal(sample_tokens_graphed(model, cond, s, seeded(4), attention="exact"), plain)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the library's default path, as the benchmark runs it
        first = sample_tokens_graphed(model, cond, s, seeded(5), cache_dtype=torch.bfloat16)
        again = sample_tokens_graphed(model, cond, s, seeded(5), cache_dtype=torch.bfloat16)
    assert torch.equal(first, again) and first.shape == (3, 40) and 0 <= int(first.min()) <= int(first.max()) < 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_attention_kernel_matches_sdpa_over_the_filled_positions(dtype):
    pytest.importorskip("triton")
    from clipgen.models.gpt_attention_kernel import attend_filled

    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(64, 16, 1, 64, generator=g, device="cuda").to(dtype)
    keys, values = (torch.randn(64, 16, 260, 64, generator=g, device="cuda").to(dtype) for _ in range(2))
    for position in (0, 63, 64, 200, 259):
        got = attend_filled(q, keys, values, torch.tensor([position], device="cuda"))
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), keys[:, :, :position + 1].float(), values[:, :, :position + 1].float())
        assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2), position


def test_training_attention_runs_on_flash_attention():
    """Causal with no mask: SDPA may use FlashAttention, the only kernel allowed here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, cond = small_gpt()
    tokens = torch.randint(0, 300, (3, 40), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()(cond, tokens).float().square().mean().backward()


def test_a_training_step_never_waits_for_the_device():
    """No .item(), no float(tensor), no pageable copy: any of them raises under sync debug mode 'error'."""
    import torch.nn.functional as F

    from clipgen.config import GPTConfig, TrainConfig
    from clipgen.data.images_array import ArrayBatches
    from clipgen.train import loop
    from clipgen.train.gpt_trainer import _step, make_optimizer, token_cross_entropy
    from clipgen.train.overlap import PinnedRows, WindowMeans

    model, _ = small_gpt()
    model.train()
    cfg, train = GPTConfig(batch_size=8, n_prefix=4), TrainConfig(grad_accum=2)
    info = loop.DistInfo(0, 1, torch.device("cuda"), False)
    cond = F.normalize(torch.randn(64, 32), dim=-1)
    rows = PinnedRows((cond, torch.randint(0, 300, (64, 40))), 4, info.device)
    batches = ArrayBatches(np.arange(64), 4, 0, 0, 1, None)
    opt, window = make_optimizer(model, cfg), WindowMeans(info.device)
    step = lambda: _step(model, model, opt, 1e-3, rows, batches, cfg, train, info, None, token_cross_entropy)  # noqa: E731
    window.add(*step())  # first use: lazy set-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            window.add(*step())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    means, _ = window.flush(tokens_per_step=8 * 40)
    assert 0 < means["ce"] < 10 and means["grad_norm"] > 0


def test_faiss_search_on_the_gpu_finds_the_cpu_neighbours(tmp_path):
    import faiss

    from clipgen.index import build_index, load_index, save_index, search

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("this faiss cannot use the GPU: install the gpu extra (faiss-gpu-cu12) in place of faiss-cpu")
    vectors = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    save_index(build_index(vectors, "flat"), [str(i) for i in range(len(vectors))], tmp_path)
    cpu, gpu = load_index(tmp_path), load_index(tmp_path, gpu=True)
    assert "Gpu" in type(gpu.index).__name__
    a, b = search(cpu, vectors[:200], 10), search(gpu, vectors[:200], 10)
    assert (a.rows == b.rows).mean() > 0.999 and np.allclose(a.scores, b.scores, atol=1e-4)

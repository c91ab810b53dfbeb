"""The tokenizer: model shapes, checkpoints, exact resume, DDP, the data sources and the token cache."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipgen.config import TrainConfig, VQGANConfig
from clipgen.data.images_array import ArrayImages, ShardStream, load_split_images, open_images
from clipgen.data.shards import Sample, write_manifest, write_shards
from clipgen.models.vqgan import VQGAN, load_vqgan
from clipgen.tokenize import read_tokens, tokenize_shard, tokenize_shards
from clipgen.train.vqgan_trainer import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and threads that share a busy core spin (5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> VQGANConfig:
    base = dict(base_channels=8, channel_mult=[1, 2], n_res_blocks=1, quantizer="fsq", fsq_levels=[5, 4, 2],
                codebook_size=40, code_dim=4, steps=6, batch_size=8, lr=1e-3)
    return VQGANConfig(**{**base, **overrides})


def images(n=48, size=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def make_shards(root: Path, arrays: np.ndarray, corrupt=(), shard_size=1000) -> Path:
    samples = [Sample(f"k{i:03d}", b"garbage" if i in corrupt else png(a), "png", {}) for i, a in enumerate(arrays)]
    rng = np.random.default_rng(1)
    samples = [samples[i] for i in rng.permutation(len(samples))]  # shard order is not key order
    infos = write_shards(samples, root, "train", shard_size)
    write_manifest(root, "test", {"train": infos}, [])
    return root


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_decode_round_trip_shapes(quantizer):
    torch.manual_seed(0)
    cfg = tiny(quantizer=quantizer, codebook_size=40 if quantizer == "fsq" else 32,
               channel_mult=[1, 2, 2], attn_resolutions=[8])
    model = VQGAN(cfg, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, indices, q_loss = model.train()(x)
    assert recon.shape == x.shape and indices.shape == (2, 8, 8) and q_loss.shape == ()
    model.eval()
    indices = model.encode(x)
    assert indices.shape == (2, 8, 8) and int(indices.max()) < model.codebook_size
    decoded = model.decode_indices(indices)
    assert decoded.shape == (2, 3, 32, 32) and decoded.abs().max() <= 1
    assert torch.allclose(decoded, model(x)[0].clamp(-1, 1), atol=1e-5)


def test_save_and_load_pretrained(tmp_path):
    model = VQGAN(tiny(quantizer="vq", codebook_size=16), 16)
    model.train()(torch.rand(4, 3, 16, 16) * 2 - 1)  # initialise the VQ codebook buffer
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["image_size"] == 16 and meta["grid_size"] == 8 and meta["vqgan"]["quantizer"] == "vq"
    loaded = load_vqgan(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="run the train-vqgan stage"):
        load_vqgan(tmp_path / "missing")


# --------------------------------------------------------------------------------------- training
def weights(path: Path) -> dict:
    return load_vqgan(path).state_dict()


@pytest.mark.parametrize("quantizer,disc_start", [("fsq", 0), ("vq", 2)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, quantizer, disc_start):
    cfg = tiny(quantizer=quantizer, codebook_size=40 if quantizer == "fsq" else 16, disc_start=disc_start,
               disc_warmup=1)
    train = TrainConfig(log_every=2, ckpt_every=2, grad_accum=2)
    data = images()
    full = fit(cfg, train, data, tmp_path / "full", progress=False, cpu_threads=1)

    def crash(step, logs):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, train, data, tmp_path / "resumed", on_step=crash, progress=False, cpu_threads=1)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = fit(cfg, train, data, tmp_path / "resumed", progress=False, cpu_threads=1)
    assert resumed.step == full.step == cfg.steps
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # the killed run's records past its checkpoint were dropped
    assert sorted(p.name for p in (tmp_path / "full" / "samples").iterdir())[-1] == "recon_0000006.png"
    again = fit(cfg, train, data, tmp_path / "full", progress=False, cpu_threads=1)  # finished: nothing to do
    assert again.step == cfg.steps


def test_fit_rejects_indivisible_batch(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        fit(tiny(batch_size=6), TrainConfig(grad_accum=4), images(), tmp_path, progress=False, cpu_threads=1)


def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    """torchrun, 2 gloo ranks, VQ (EMA codebook statistics all-reduced) with the GAN switched on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_vqgan_worker.py"), str(tmp_path), "vq", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] and digests[0].startswith("4 ")
    assert (tmp_path / "run" / "model.safetensors").is_file()  # written by rank 0 only
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------- data
def test_array_batches_resume_exactly():
    data = ArrayImages(images(n=20))
    run = data.batches(4, seed=3)
    seen = [next(run) for _ in range(7)]  # crosses an epoch boundary (5 batches per epoch)
    pos = data.batches(4, seed=3)
    for _ in range(4):
        next(pos)
    resumed = data.batches(4, seed=3, position=pos.position())
    assert all(torch.equal(next(resumed), seen[i]) for i in range(4, 7))
    ranks = [data.batches(2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([next(ranks[0]), next(ranks[1])]).sort(0).values, seen[0].sort(0).values)


def test_shard_stream_resumes_exactly(tmp_path):
    root = make_shards(tmp_path / "shards", images(n=40), corrupt={5}, shard_size=8)
    stream = open_images(root, "train", 16, workers=2, max_in_memory_bytes=0)
    assert isinstance(stream, ShardStream) and len(stream) == 40
    run = stream.batches(4, seed=0)
    seen = [next(run) for _ in range(14)]  # 10 batches per epoch: crosses into the second epoch
    run.close()
    for start in (1, 4, 9):  # odd starts matter: the DataLoader always asks its worker 0 first
        resumed = stream.batches(4, seed=0, position={"batches": start})
        assert all(torch.equal(next(resumed), seen[i]) for i in range(start, 14))
        resumed.close()
    assert all(b.shape == (4, 16, 16, 3) and b.dtype == torch.uint8 for b in seen)


def test_load_split_images_skips_corrupt(tmp_path):
    root = make_shards(tmp_path / "shards", images(n=10), corrupt={2, 7}, shard_size=4)
    split = load_split_images(root, "train", 16)
    assert split.images.shape == (8, 16, 16, 3) and sorted(split.skipped_keys) == ["k002", "k007"]
    assert isinstance(open_images(root, "train", 16), ArrayImages)


# ------------------------------------------------------------------------------------ token cache
def test_tokenize_writes_sorted_keys_smallest_dtype_and_skips_corrupt(tmp_path):
    arrays = images(n=30)
    root = make_shards(tmp_path / "shards", arrays, corrupt={4})
    model = VQGAN(tiny(), 16).eval()
    shard = root / "train" / "00000.tar"
    res = tokenize_shard(model, shard, tmp_path / "tok" / "train" / "00000.parquet", batch_size=7)
    assert res.count == 29 and res.skipped_keys == ["k004"]
    table = pq.read_table(res.path)
    assert str(table.schema.field("tokens").type) == "fixed_size_list<element: uint8>[64]"
    tokens = read_tokens([Path(res.path)])
    assert tokens.keys == sorted(tokens.keys) and "k004" not in tokens.keys
    assert tokens.tokens.shape == (29, 64) and tokens.tokens.dtype == np.int64
    # the same preprocessing as training: tokens equal encoding the decoded array directly
    from clipgen.data.images_array import to_model_input

    i = tokens.keys.index("k010")
    direct = model.encode(to_model_input(torch.from_numpy(arrays[10:11])))
    assert np.array_equal(tokens.tokens[i], direct.flatten().numpy())
    again = tokenize_shards(model, [shard], tmp_path / "tok")  # finished shards are not redone
    assert again[0].count == 29 and again[0].skipped_keys == ["k004"]


def test_token_dtype_grows_with_codebook(tmp_path):
    from clipgen.tokenize import token_dtype

    assert [str(token_dtype(n)) for n in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]

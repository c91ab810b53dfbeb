"""The embedding cache: CLIP image embeddings of every shard, one Parquet file per shard.

Each ``<split>/NNNNN.parquet`` holds ``key`` (string) and ``embedding`` (fixed-size list of float16,
L2-normalised), sorted by key. Rows are joined downstream by key, never by position, so a corrupt
sample is simply absent (and counted) instead of shifting its neighbours. Only image bytes and keys are
read from the shards: captions and attributes never reach this stage (the language-free guarantee).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipgen.artifacts import atomic_path
from clipgen.data.images_array import decode_rgb
from clipgen.data.shards import IMAGE_EXTS, image_bytes, iter_shard, read_list_column


class ShardImages(IterableDataset):
    """One shard as batches ``(keys, uint8 [B, S, S, 3], bad keys)`` at the model's input size.

    DataLoader worker ``w`` of ``n`` decodes batches ``w, w + n, ...``; the tar is read image members only.
    Images already at model size are only decoded; others take the CLIP's own resize and crop
    (``fit_image``). The float conversion and normalisation happen once per batch in the main process.
    """

    def __init__(self, shard: Path, fit_image, size: int, batch_size: int):
        self.shard, self.fit_image, self.size, self.batch_size = Path(shard), fit_image, size, batch_size

    def __iter__(self) -> Iterator[tuple[list[str], torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        samples = iter_shard(self.shard, exts=IMAGE_EXTS)
        for i in itertools.count():
            chunk = list(itertools.islice(samples, self.batch_size))
            if not chunk:
                return
            if i % n_workers == worker:
                yield self._decode_batch(chunk)

    def _decode_batch(self, chunk: list[tuple[str, dict[str, bytes]]]):
        keys, pixels, bad = [], [], []
        for key, members in chunk:
            image = self._decode(members)
            if image is None:
                bad.append(key)
            else:
                keys.append(key)
                pixels.append(image)
        batch = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, self.size, self.size, 3, dtype=torch.uint8)
        return keys, batch, bad

    def _decode(self, members: dict[str, bytes]) -> np.ndarray | None:
        data = image_bytes(members)
        if data is None:
            return None
        try:
            pixels = decode_rgb(data)
            if pixels.shape[:2] == (self.size, self.size):
                return pixels  # CLIP's resize and crop are no-ops at model size
            return self.fit_image(Image.fromarray(pixels))
        except Exception:  # any undecodable sample is skipped and counted, never fatal
            return None


class ShardEmbedding(NamedTuple):
    path: str
    count: int
    skipped_keys: list[str]


def loader_workers(requested: int, device: torch.device) -> int:
    """DataLoader worker processes worth starting for a model on ``device``.

    Workers only help on cores the model leaves free. On a CPU box whose cores all run torch's threads
    they fight the forward pass for them instead (the toy CLIP embedded ~2x slower with 1 or 2 workers
    than in-process on 2 cores), so decoding stays in the main process there.
    """
    if device.type == "cpu" and (os.cpu_count() or 1) <= torch.get_num_threads():
        return 0
    return requested


def embed_shard(clip, shard: Path, out_path: Path, batch_size: int = 256, num_workers: int = 2) -> ShardEmbedding:
    """Embed one shard into ``out_path`` (written atomically). Corrupt samples are listed, not fatal."""
    images = ShardImages(shard, clip.fit_image, clip.image_size, batch_size)
    # batch_size=None: the dataset yields whole uint8 batches; pinned memory speeds the copy to a GPU
    pin = num_workers > 0 and clip.device.type == "cuda"
    loader = DataLoader(images, batch_size=None, num_workers=num_workers, pin_memory=pin)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    skipped: list[str] = []
    for batch_keys, pixels, bad in loader:
        skipped.extend(bad)
        if batch_keys:
            keys.extend(batch_keys)
            chunks.append(clip.encode_images(pixels, batch_size=len(batch_keys)).float().cpu().numpy())
    dim = clip.embed_dim
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, int)
    write_embeddings(out_path, [keys[i] for i in order], emb[order])
    return ShardEmbedding(str(out_path), len(keys), sorted(skipped))


def write_embeddings(path: Path, keys: list[str], embeddings: np.ndarray) -> None:
    """Write (key, float16 embedding) rows to Parquet atomically; embeddings are re-normalised first."""
    emb = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = (emb / np.maximum(norms, 1e-12)).astype(np.float16)
    dim = emb.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float16()), dim)
    table = pa.table({"key": pa.array(keys, type=pa.string()), "embedding": column})
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


class Embeddings(NamedTuple):
    keys: list[str]
    vectors: np.ndarray  # [N, D] float32, unit norm


def read_embeddings(paths: list[Path]) -> Embeddings:
    """Read and concatenate embedding Parquet files (float16 on disk, float32 in memory)."""
    return Embeddings(*read_list_column(paths, "embedding", np.float32))


def cache_files(cache_dir: Path, split: str) -> list[Path]:
    return sorted((Path(cache_dir) / split).glob("*.parquet"))

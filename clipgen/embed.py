"""The embedding cache: CLIP image embeddings of every shard, one Parquet file per shard.

Each ``<split>/NNNNN.parquet`` holds ``key`` (string) and ``embedding`` (fixed-size list of float16,
L2-normalised), sorted by key. Rows are joined downstream by key, never by position, so a corrupt
sample is simply absent (and counted) instead of shifting its neighbours. Only image bytes and keys are
read from the shards: captions and attributes never reach this stage (the language-free guarantee).
"""

from __future__ import annotations

import io
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
from clipgen.data.shards import image_bytes, iter_shard, read_list_column


class ShardImages(IterableDataset):
    """Decoded, preprocessed images of one shard; each DataLoader worker takes every n-th sample."""

    def __init__(self, shard: Path, preprocess, size: int, mean, std):
        self.shard, self.preprocess, self.size = Path(shard), preprocess, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for i, (key, members) in enumerate(iter_shard(self.shard)):
            if i % n_workers != worker:
                continue
            yield key, self._decode(members)

    def _decode(self, members: dict[str, bytes]) -> torch.Tensor | None:
        data = image_bytes(members)
        if data is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    return self.preprocess(img)
                # Already at model size: CLIP's resize and crop are no-ops, so only scale and normalise.
                # Same numbers as the transform, several times faster for small images.
                pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
                return (pixels.float() / 255.0 - self.mean) / self.std
        except Exception:  # any undecodable sample is skipped and counted, never fatal
            return None


def _collate(batch: list[tuple[str, torch.Tensor | None]]) -> tuple[list[str], torch.Tensor | None, list[str]]:
    good = [(k, t) for k, t in batch if t is not None]
    bad = [k for k, t in batch if t is None]
    images = torch.stack([t for _, t in good]) if good else None
    return [k for k, _ in good], images, bad


class ShardEmbedding(NamedTuple):
    path: str
    count: int
    skipped_keys: list[str]


def embed_shard(clip, shard: Path, out_path: Path, batch_size: int = 256, num_workers: int = 2) -> ShardEmbedding:
    """Embed one shard into ``out_path`` (written atomically). Corrupt samples are listed, not fatal."""
    cfg = clip.preprocess_cfg
    images = ShardImages(shard, clip.preprocess, clip.image_size, cfg["mean"], cfg["std"])
    loader = DataLoader(images, batch_size=batch_size, collate_fn=_collate,
                        num_workers=num_workers, persistent_workers=False)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    skipped: list[str] = []
    for batch_keys, images, bad in loader:
        skipped.extend(bad)
        if images is not None:
            keys.extend(batch_keys)
            chunks.append(clip.encode_images(images).float().cpu().numpy())
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

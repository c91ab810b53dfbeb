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

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipgen.artifacts import atomic_path
from clipgen.data.images_array import decode_rgb
from clipgen.data.shards import IMAGE_EXTS, image_bytes, iter_shard_readers, read_list_column


class ShardImages(IterableDataset):
    """Shards as batches ``(shard index, keys, uint8 [B, S, S, 3], bad keys)`` at the model's input size.

    Batches never straddle two shards and are numbered across all of them; DataLoader worker ``w`` of ``n``
    decodes batches ``w, w + n, ...``, so the loader hands them over in shard order and one set of workers
    serves every shard (starting workers per shard cost more than embedding a 2000-image shard on a GPU).
    A worker reads the tar's image members of its own batches only. Images already at model size are only
    decoded; others take the CLIP's own resize and crop (``fit_image``). The float conversion and
    normalisation happen on the model's device, once per batch.
    """

    def __init__(self, shards: list[Path], fit_image, size: int, batch_size: int):
        self.shards, self.fit_image, self.size, self.batch_size = [Path(s) for s in shards], fit_image, size, batch_size

    def __iter__(self) -> Iterator[tuple[int, list[str], torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if info:
            cv2.setNumThreads(1)  # a worker is one decoding thread; OpenCV's own pool would oversubscribe cores
        batch_number = itertools.count()
        for index, shard in enumerate(self.shards):
            samples = iter_shard_readers(shard, exts=IMAGE_EXTS)  # other workers' batches are never read
            while chunk := list(itertools.islice(samples, self.batch_size)):
                if next(batch_number) % n_workers == worker:
                    members = [(key, {ext: read() for ext, read in readers.items()}) for key, readers in chunk]
                    yield (index, *self._decode_batch(members, shared=info is not None))

    def _decode_batch(self, chunk: list[tuple[str, dict[str, bytes]]], shared: bool):
        # decoded straight into the batch; in a worker the batch is born in shared memory, which saves the
        # copy the DataLoader would otherwise make to hand it to the main process
        batch = torch.empty(len(chunk), self.size, self.size, 3, dtype=torch.uint8)
        batch = batch.share_memory_() if shared else batch
        pixels = batch.numpy()
        keys, bad = [], []
        for key, members in chunk:
            row = pixels[len(keys)]  # a failed sample's partial pixels are overwritten by the next good one
            image = self._decode(members, row)
            if image is None:
                bad.append(key)
            else:
                if image is not row:
                    row[...] = image
                keys.append(key)
        return keys, batch[:len(keys)], bad

    def _decode(self, members: dict[str, bytes], out: np.ndarray | None = None) -> np.ndarray | None:
        """The sample's image at model size (written into ``out`` when it can be), or None."""
        data = image_bytes(members)
        if data is None:
            return None
        try:
            pixels = decode_rgb(data, out)
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
    return list(embed_shards(clip, [(shard, out_path)], batch_size, num_workers))[0]


def embed_shards(clip, jobs: list[tuple[Path, Path]], batch_size: int = 256,
                 num_workers: int = 2) -> Iterator[ShardEmbedding]:
    """Embed each ``(shard, out_path)`` of ``jobs`` through one DataLoader, yielding each result once its
    file is written (atomically), so an interruption keeps the finished shards. Corrupt samples are listed."""
    images = ShardImages([shard for shard, _ in jobs], clip.fit_image, clip.image_size, batch_size)
    # batch_size=None: the dataset yields whole uint8 batches; pinned memory speeds the copy to a GPU
    pin = num_workers > 0 and clip.device.type == "cuda"
    loader = DataLoader(images, batch_size=None, num_workers=num_workers, pin_memory=pin)
    done, keys, chunks, skipped = 0, [], [], []
    for index, batch_keys, pixels, bad in itertools.chain(loader, [(len(jobs), [], None, [])]):
        if index < done:  # rows of two shards would mix; ShardImages' batch numbering rules this out
            raise RuntimeError(f"a batch of shard {index} arrived after shard {done - 1} was written")
        while done < index:  # the loader hands batches over in shard order: shard ``done`` is complete
            yield _write_shard(jobs[done][1], keys, chunks, skipped, clip.embed_dim)
            done, keys, chunks, skipped = done + 1, [], [], []
        skipped.extend(bad)
        if batch_keys:
            keys.extend(batch_keys)
            # kept on the device: a copy to the host per batch would make the device wait for the loader
            chunks.append(clip.encode_images(pixels, batch_size=len(batch_keys)))


def _write_shard(out_path: Path, keys: list[str], chunks: list[torch.Tensor], skipped: list[str],
                 dim: int) -> ShardEmbedding:
    emb = torch.cat(chunks).float().cpu().numpy() if chunks else np.zeros((0, dim), np.float32)
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, int)
    write_embeddings(out_path, [keys[i] for i in order], emb[order])
    return ShardEmbedding(str(out_path), len(keys), sorted(skipped))


def write_embeddings(path: Path, keys: list[str], embeddings: np.ndarray) -> None:
    """Write (key, float16 embedding) rows to Parquet atomically; embeddings are re-normalised first.

    torch, not numpy, converts to float16 (numpy's conversion is scalar, ~5x slower), and no column is
    dictionary-encoded (keys are unique and embeddings never repeat): both cut the write of a 20,000-row
    shard by about half, and on a GPU that write is a fixed cost per shard next to a short forward pass.
    """
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    emb = torch.nn.functional.normalize(emb, dim=1, eps=1e-12).half().numpy()
    dim = emb.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float16()), dim)
    table = pa.table({"key": pa.array(keys, type=pa.string()), "embedding": column})
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp, use_dictionary=False)


class Embeddings(NamedTuple):
    keys: list[str]
    vectors: np.ndarray  # [N, D] float32, unit norm


def read_embeddings(paths: list[Path]) -> Embeddings:
    """Read and concatenate embedding Parquet files (float16 on disk, float32 in memory)."""
    return Embeddings(*read_list_column(paths, "embedding", np.float32))


def cache_files(cache_dir: Path, split: str) -> list[Path]:
    return sorted((Path(cache_dir) / split).glob("*.parquet"))

"""Training images for the tokenizer: decoded once into memory when they fit, streamed from shards when not.

Both sources hand out uint8 batches ``[B, H, W, 3]`` for one rank and can say where they are (the *data
position*), so a resumed run sees exactly the batches the killed run would have seen:

* :class:`ArrayImages` holds a whole split in memory (the 32 px shapes world is ~90 MB). Each epoch is a
  permutation seeded by ``(seed, epoch)``; a global batch is a slice of it and each rank takes its part.
  Position = ``(epoch, index)``.
* :class:`ShardStream` streams WebDataset shards (ImageNet scale). Each epoch shuffles the shard order
  with ``(seed, epoch)``, gives rank ``r`` the shards ``order[r::world]`` (what ``wds.split_by_node``
  does) and DataLoader worker ``w`` every ``n``-th of those; samples pass a seeded shuffle buffer.
  Position = batches consumed by this rank; resuming fast-forwards whole epochs by the manifest counts
  and then skips raw samples (no decoding) inside the current epoch.

:func:`open_images` picks one by size. Images are preprocessed the same way everywhere (training and the
token cache): decoded by :func:`decode_rgb`, converted to RGB, resized/cropped to ``image_size`` if needed.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipgen.data.shards import image_bytes, iter_shard, read_manifest, shard_paths

MAX_IN_MEMORY_BYTES = 4 << 30  # splits whose decoded pixels exceed this are streamed from the shards
SHUFFLE_BUFFER = 1000


def decode_rgb(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[H, W, 3]``; raises on undecodable data.

    OpenCV decodes first: it gives PIL's exact pixels for PNG and JPEG (EXIF orientation ignored, as
    PIL does) at ~2x less cost on small images, which keeps 32 px data loading cheap next to the model.
    PIL takes what OpenCV cannot read (GIF, for one) and converts it to RGB. The result is contiguous:
    stacking reversed-channel views copied ~2x slower than decoding a 224 px JPEG on a GPU host. An image of
    ``out``'s shape is written into ``out`` (a batch row, say) and ``out`` returned, saving one more copy.
    """
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags) if data else None
    if bgr is not None:  # the BGR -> RGB swap is a plain channel swap, vectorised
        fits = out is not None and out.shape == bgr.shape
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out) if fits else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def fit_pixels(pixels: np.ndarray, size: int, fit) -> np.ndarray:
    """``pixels`` when they are ``size`` x ``size`` already, else ``fit(PIL image)``: a resize and crop to it."""
    return pixels if pixels.shape[:2] == (size, size) else fit(Image.fromarray(pixels))


def decode_fitted(data: bytes | None, size: int, fit, out: np.ndarray | None = None) -> np.ndarray | None:
    """``data`` decoded (into ``out`` when it can be) and brought to ``size`` by :func:`fit_pixels`; None when
    there is no image or it cannot be decoded: a damaged sample is skipped and counted by the caller, never fatal."""
    if not data:
        return None
    try:
        return fit_pixels(decode_rgb(data, out), size, fit)
    except Exception:
        return None


def _lanczos_fit(size: int):
    return lambda image: np.asarray(ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_image(members: dict[str, bytes], image_size: int) -> np.ndarray | None:
    """A sample's image as uint8 [S, S, 3], or None if it has none or cannot be decoded. Ingest already sizes
    images; foreign shards may not be, and take a Lanczos resize and centre crop."""
    return decode_fitted(image_bytes(members), image_size, _lanczos_fit(image_size))


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], the tokenizer's input everywhere."""
    return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (the inverse of :func:`to_model_input`)."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class SplitImages(NamedTuple):
    keys: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    skipped_keys: list[str]  # samples that could not be decoded


def load_split_images(shard_root: Path, split: str, image_size: int) -> SplitImages:
    """Decode every image of ``split`` into one uint8 array, in shard order; bad samples are listed."""
    keys, arrays, skipped = [], [], []
    for shard in shard_paths(shard_root, split):
        for batch_keys, images, bad in decoded_batches(shard, image_size, batch_size=1024):
            keys += batch_keys
            skipped += bad
            if images is not None:
                arrays.append(images)
    images = np.concatenate(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.uint8)
    return SplitImages(keys, images, skipped)


def decoded_batches(shard: Path, image_size: int, batch_size: int
                    ) -> Iterator[tuple[list[str], np.ndarray | None, list[str]]]:
    """(keys, uint8 images [B, S, S, 3] or None, undecodable keys) per ``batch_size`` good samples."""
    keys, images, bad = [], [], []
    for key, members in iter_shard(shard):
        image = decode_image(members, image_size)
        if image is None:
            bad.append(key)
        else:
            keys.append(key)
            images.append(image)
        if len(keys) == batch_size:
            yield keys, np.stack(images), bad
            keys, images, bad = [], [], []
    if keys or bad:
        yield keys, (np.stack(images) if images else None), bad


# ------------------------------------------------------------------------------------- in memory
class ArrayImages:
    """A split held in memory as uint8 [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, keys: list[str] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        self.images, self.keys = images, keys
        self.image_size = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                position: dict | None = None) -> ArrayBatches:
        return ArrayBatches(self.images, batch_size, seed, rank, world_size, position)


class ArrayBatches:
    """Seeded per-epoch permutations; a global batch of ``batch_size * world_size`` is split over ranks.

    Works on any array indexed by its first axis (images here, row indices in the transformer's loop).
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, rank: int, world_size: int,
                 position: dict | None):
        self.global_batch = batch_size * world_size
        if len(images) < self.global_batch:
            raise ValueError(f"{len(images)} samples cannot fill one global batch of {self.global_batch}; "
                             "lower the batch size or ingest more images")
        self.images, self.batch_size, self.seed, self.rank = images, batch_size, seed, rank
        self.epoch = int((position or {}).get("epoch", 0))
        self.index = int((position or {}).get("index", 0))
        self.order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def __iter__(self) -> ArrayBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.index + self.global_batch > len(self.order):  # drop the ragged tail, start the next epoch
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._permutation(self.epoch)
        start = self.index + self.rank * self.batch_size
        picked = np.sort(self.order[start: start + self.batch_size])  # sorted: faster gather, same set
        self.index += self.global_batch
        return torch.from_numpy(self.images[picked])

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------- streaming
class ShardStream:
    """A split streamed from its WebDataset shards; ``shards`` pairs each tar with its sample count."""

    def __init__(self, shards: list[tuple[str, int]], image_size: int, workers: int = 4):
        self.shards, self.image_size, self.workers = shards, image_size, workers

    def __len__(self) -> int:
        return sum(count for _, count in self.shards)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                position: dict | None = None) -> StreamBatches:
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot be split over {world_size} ranks; "
                             "re-ingest with a smaller data.shard_size")
        workers = max(1, min(self.workers, len(self.shards) // world_size))
        start = int((position or {}).get("batches", 0))
        dataset = _WorkerStream(self.shards, self.image_size, batch_size, seed, rank, world_size, start)
        return StreamBatches(dataset, workers, start)


class StreamBatches:
    def __init__(self, dataset: IterableDataset, workers: int, start: int):
        # batch_size=None: workers yield whole batches; the DataLoader cycles over workers in a fixed
        # order, which is what makes "batches consumed" an exact position.
        # its own generator: creating the iterator must not draw from (and so shift) the global torch RNG
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                                 generator=torch.Generator().manual_seed(0))
        self.iterator = None  # started on the first batch, so a finished run never spawns workers
        self.consumed = start

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self.iterator is None:
            self.iterator = iter(self.loader)
        batch = next(self.iterator)
        self.consumed += 1
        return batch

    def position(self) -> dict:
        return {"batches": self.consumed}

    def close(self) -> None:
        self.iterator = None  # drops the iterator, which stops the worker processes


class _WorkerStream(IterableDataset):
    """One rank's endless stream of uint8 batches; DataLoader worker ``w`` reads its own shards."""

    def __init__(self, shards, image_size, batch_size, seed, rank, world_size, start_batches):
        self.shards, self.image_size, self.batch_size = shards, image_size, batch_size
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start_batches

    def _my_shards(self, epoch: int, worker: int, n_workers: int) -> list[tuple[str, int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.rank::self.world_size][worker::n_workers]]

    def _samples(self, epoch: int, shards: list[tuple[str, int]], worker: int) -> Iterator[dict]:
        import webdataset as wds  # here: only the streaming path needs it, and the GPU host's Python lacks it

        # the shard list is already split by rank and worker and ordered by the seeded epoch shuffle
        urls = [str(path) for path, _ in shards]
        dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")  # str seeds are stable across runs
        buffer: list[dict] = []
        for sample in dataset:  # a seeded shuffle buffer, reset every epoch so resume can replay it
            buffer.append(sample)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader always asks physical worker 0 first, so after ``start`` batches physical worker
        # p plays the part of worker (p + start) % n: the rotation keeps the batch order of the first run.
        worker = (physical + self.start) % n_workers
        skip = len(range(worker, self.start, n_workers))  # batches this worker had already given
        epoch = 0
        while True:
            shards = self._my_shards(epoch, worker, n_workers)
            per_epoch = sum(count for _, count in shards) // self.batch_size  # a ragged tail is dropped
            if per_epoch == 0:
                raise ValueError(f"rank {self.rank} worker {worker} got fewer than {self.batch_size} samples "
                                 f"in epoch {epoch}; use fewer data workers or a smaller batch")
            if skip >= per_epoch:  # fast-forward whole epochs without reading them
                skip, epoch = skip - per_epoch, epoch + 1
                continue
            samples = itertools.islice(self._samples(epoch, shards, worker), skip * self.batch_size, None)
            skip = 0
            yield from self._batches(samples)
            epoch += 1

    def _batches(self, samples: Iterator[dict]) -> Iterator[torch.Tensor]:
        """Exactly ``batch_size`` raw samples per batch; an undecodable one is replaced by a good neighbour."""
        while chunk := list(itertools.islice(samples, self.batch_size)):
            if len(chunk) < self.batch_size:
                return  # ragged end of the epoch: dropped, as in the in-memory path
            decoded = [decode_image({k.lstrip("."): v for k, v in s.items() if isinstance(v, bytes)},
                                    self.image_size) for s in chunk]
            good = [d for d in decoded if d is not None]
            if not good:
                raise ValueError(f"a whole batch of {self.batch_size} samples failed to decode "
                                 f"(e.g. key {chunk[0].get('__key__')}); check the shards")
            yield torch.from_numpy(np.stack([d if d is not None else good[0] for d in decoded]))


def open_images(shard_root: Path, split: str, image_size: int, workers: int = 4,
                max_in_memory_bytes: int = MAX_IN_MEMORY_BYTES) -> ArrayImages | ShardStream:
    """The training images of ``split``: in memory if their decoded pixels fit, else a shard stream."""
    manifest = read_manifest(shard_root)
    counts = [s["count"] for s in manifest["shards"][split]]
    paths = shard_paths(shard_root, split)
    if sum(counts) * image_size * image_size * 3 <= max_in_memory_bytes:
        split_images = load_split_images(shard_root, split, image_size)
        return ArrayImages(split_images.images, split_images.keys)
    return ShardStream([(str(p), c) for p, c in zip(paths, counts, strict=True)], image_size, workers)

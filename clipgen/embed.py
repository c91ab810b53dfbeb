"""The embedding cache: CLIP image embeddings of every shard, one Parquet file per shard.

Each ``<split>/NNNNN.parquet`` holds ``key`` (string) and ``embedding`` (fixed-size list of float16,
L2-normalised), sorted by key. Rows are joined downstream by key, never by position, so a corrupt
sample is simply absent (and counted) instead of shifting its neighbours. Only image bytes and keys are
read from the shards: captions and attributes never reach this stage (the language-free guarantee).

The work is one pipeline in one process: a few threads decode the next batches (OpenCV releases the
GIL) into pinned memory while the device runs the current one, and a writer thread writes each finished
shard's file. DataLoader worker processes lost to it on an H100 host: ~3x slower on 512 images (starting
them costs more than embedding them) and at best ~10% faster on 20,000 32 px images. With
``decoder="nvimgcodec"`` one thread hands whole batches to nvImageCodec instead, which decodes JPEGs on the
GPU (:mod:`clipgen.data.nvdecode`).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clipgen.artifacts import atomic_path
from clipgen.cores import usable_cores
from clipgen.data.images_array import decode_fitted
from clipgen.data.nvdecode import NvImageCodecDecoder, pooled_decoder
from clipgen.data.shards import IMAGE_EXTS, image_bytes, iter_shard_readers, read_list_column

DECODERS = ("opencv", "nvimgcodec")
SLICE = 16  # images per decoding task: small enough that the first batch is ready early
PREFETCH = 3  # batches decoded ahead of the one on the device


class ImageBatch(NamedTuple):
    shard: int  # index of the shard in the list given to ShardImages
    keys: list[str]  # the decoded samples, in row order
    pixels: torch.Tensor  # uint8 [len(keys), S, S, 3]; pinned when the model is on a GPU
    bad: list[str]  # samples that could not be decoded


class ShardImages:
    """Shards as :class:`ImageBatch` es at the model's input size, in shard order; no batch straddles two shards.

    :meth:`batches` decodes on a pool of threads, ``PREFETCH`` batches ahead of its caller. Images already at
    model size are only decoded; others take the CLIP's own resize and crop (``fit_image``). The float
    conversion and normalisation happen on the model's device, once per batch. Given a ``batch_decoder``, one
    thread passes it whole batches instead, and the pixels come back on its device.
    """

    def __init__(self, shards: list[Path], fit_image, size: int, batch_size: int,
                 batch_decoder: NvImageCodecDecoder | None = None):
        self.shards, self.fit_image, self.size, self.batch_size = [Path(s) for s in shards], fit_image, size, batch_size
        self.batch_decoder = batch_decoder

    def batches(self, threads: int, pin: bool = False) -> Iterator[ImageBatch]:
        """``threads=0`` decodes in the calling thread, one batch at a time (a CPU box whose cores run the model).
        A batch decoder runs threads of its own and wants 0 or 1 here (:func:`device_batches` picks)."""
        if threads == 0:
            for pending in self._submit(None, pin):
                yield _finish(*pending)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=cv2.setNumThreads,
                                initargs=(1,)) as pool:  # OpenCV pools of its own would oversubscribe the cores
            ahead: collections.deque = collections.deque()
            try:
                for pending in self._submit(pool, pin):
                    ahead.append(pending)
                    if len(ahead) > PREFETCH:
                        yield _finish(*ahead.popleft())
                while ahead:
                    yield _finish(*ahead.popleft())
            finally:
                for *_, slices in ahead:  # a consumer that stopped early waits for no decoding
                    for future in slices:
                        future.cancel()

    def _submit(self, pool: ThreadPoolExecutor | None, pin: bool):
        """Per batch: (shard index, samples, pixel buffer, one future per ``SLICE`` of it), or with a batch
        decoder (shard index, samples, None, [one future of (pixels, decoded)])."""
        submit = pool.submit if pool else _run_inline
        for index, shard in enumerate(self.shards):
            samples = iter_shard_readers(shard, exts=IMAGE_EXTS)  # reading a member is left to the decoder
            while chunk := list(itertools.islice(samples, self.batch_size)):
                if self.batch_decoder:
                    yield index, chunk, None, [submit(self._decode_batch, chunk)]
                    continue
                pixels = torch.empty(len(chunk), self.size, self.size, 3, dtype=torch.uint8, pin_memory=pin)
                slices = [submit(self._decode_slice, chunk[start:start + SLICE], pixels[start:start + SLICE].numpy())
                          for start in range(0, len(chunk), SLICE)]
                yield index, chunk, pixels, slices

    def _decode_batch(self, chunk) -> tuple[torch.Tensor, list[bool]]:
        return self.batch_decoder.decode([_image_bytes(readers) for _, readers in chunk], self.size, self.fit_image)

    def _decode_slice(self, chunk, rows: np.ndarray) -> list[bool]:
        """Decode each sample of ``chunk`` into its row; False where it could not be."""
        decoded = []
        for (_, readers), row in zip(chunk, rows, strict=True):
            image = self._decode(_image_bytes(readers), row)
            if image is not None and image is not row:
                row[...] = image
            decoded.append(image is not None)
        return decoded

    def _decode(self, data: bytes | None, out: np.ndarray | None = None) -> np.ndarray | None:
        """The image at model size (written into ``out`` when it can be; CLIP's resize and crop are no-ops at
        model size), or None."""
        return decode_fitted(data, self.size, self.fit_image, out)


def _run_inline(fn, *args) -> Future:
    """``fn(*args)`` run now, as a finished future (what a pool's ``submit`` returns)."""
    future = Future()
    future.set_result(fn(*args))
    return future


def _image_bytes(readers: dict) -> bytes | None:
    read = image_bytes(readers)  # the reader of the sample's image member: only that member is read
    return read() if read else None


def _finish(index: int, chunk, pixels: torch.Tensor | None, slices: list[Future]) -> ImageBatch:
    if pixels is None:  # a batch decoder's one future
        pixels, decoded = slices[0].result()
    else:
        decoded = list(itertools.chain.from_iterable(f.result() for f in slices))
    keys = [key for (key, _), ok in zip(chunk, decoded, strict=True) if ok]
    bad = [key for (key, _), ok in zip(chunk, decoded, strict=True) if not ok]
    if bad:  # rare: close the gaps in place, so the batch stays in its (pinned) buffer
        pixels[:len(keys)] = pixels[torch.tensor(decoded)]
    return ImageBatch(index, keys, pixels[:len(keys)], bad)


class ShardEmbedding(NamedTuple):
    path: str
    count: int
    skipped_keys: list[str]


def decode_threads(device: torch.device, image_size: int) -> int:
    """Decoding threads worth running beside a model on ``device``.

    OpenCV decodes without the GIL, but the Python around each image (and the model's own kernel launches)
    holds it, so threads beyond a few only queue for it: on a 16-core H100 host 32 px PNGs (~35 us each to
    decode) embedded fastest with 2 threads and 224 px JPEGs (~700 us) with 8. On a CPU box whose cores all
    run torch's threads, a decoding thread would fight the forward pass for them (the toy CLIP embedded ~2x
    slower with 1 or 2 decoding processes than in-process on 2 cores), so decoding stays inline there.
    """
    if device.type == "cpu":
        return max(usable_cores() - torch.get_num_threads(), 0)
    return max(min(usable_cores() - 1, 2 if image_size <= 64 else 8), 1)


def nvimgcodec_threads(device: torch.device) -> int:
    """nvImageCodec's own CPU threads (they run without the GIL): all cores but the one feeding the GPU, or on a
    CPU device those torch leaves free (at least one)."""
    busy = 1 if device.type == "cuda" else torch.get_num_threads()
    return max(usable_cores() - busy, 1)


def embed_shard(clip, shard: Path, out_path: Path, batch_size: int = 256, threads: int | None = None,
                decoder: str = "opencv") -> ShardEmbedding:
    """Embed one shard into ``out_path`` (written atomically). Corrupt samples are listed, not fatal."""
    return list(embed_shards(clip, [(shard, out_path)], batch_size, threads, decoder))[0]


def embed_shards(clip, jobs: list[tuple[Path, Path]], batch_size: int = 256, threads: int | None = None,
                 decoder: str = "opencv") -> Iterator[ShardEmbedding]:
    """Embed each ``(shard, out_path)`` of ``jobs``, yielding each result once its file is written (atomically),
    so an interruption keeps the finished shards. Corrupt samples are listed. ``threads`` and ``decoder``: as
    for :func:`device_batches`."""
    batches = device_batches(clip, [shard for shard, _ in jobs], batch_size, threads, decoder)
    # on a GPU the writer thread writes shard k while the device embeds shard k + 1 (leaving this block waits
    # for it, so a crash still writes the shards that were complete and never a partial one); on a CPU the
    # write would fight the forward pass for the cores (both run torch's threads), so it runs inline
    with ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        write = writer.submit if clip.device.type == "cuda" else _run_inline
        written: collections.deque[Future] = collections.deque()
        current, keys, chunks, skipped = 0, [], [], []
        for batch in itertools.chain(batches, [ImageBatch(len(jobs), [], None, [])]):
            while current < batch.shard:  # batches come in shard order: shard ``current`` is complete
                written.append(write(_write_shard, jobs[current][1], keys, *_to_host(chunks, clip), skipped))
                current, keys, chunks, skipped = current + 1, [], [], []
            while written and written[0].done():
                yield written.popleft().result()
            skipped.extend(batch.bad)
            if batch.keys:
                keys.extend(batch.keys)
                # kept on the device: a copy to the host per batch would make the device wait for the decoders
                chunks.append(clip.encode_images(batch.pixels, batch_size=len(batch.keys)))
        while written:
            yield written.popleft().result()


def device_batches(clip, shards: list[Path], batch_size: int, threads: int | None = None,
                   decoder: str = "opencv") -> Iterator[ImageBatch]:
    """The shards' images as :class:`ImageBatch` es at ``clip``'s input size, on its device.

    ``decoder``: ``opencv`` decodes on ``threads`` Python threads (by default :func:`decode_threads`);
    ``nvimgcodec`` passes whole batches to :class:`~clipgen.data.nvdecode.NvImageCodecDecoder`, with ``threads``
    its own CPU threads (by default :func:`nvimgcodec_threads`).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown embed decoder {decoder!r}; choose from {list(DECODERS)}")
    if decoder == "nvimgcodec":
        return _nvimgcodec_batches(clip, shards, batch_size, threads or nvimgcodec_threads(clip.device))
    images = ShardImages(shards, clip.fit_image, clip.image_size, batch_size)
    threads = decode_threads(clip.device, clip.image_size) if threads is None else threads
    return _on_device(images.batches(threads, pin=clip.device.type == "cuda"), clip.device)


def _nvimgcodec_batches(clip, shards: list[Path], batch_size: int, cpu_threads: int) -> Iterator[ImageBatch]:
    """:func:`device_batches` through a pooled nvImageCodec decoder, which goes back to the pool only once its
    decoding thread has stopped."""
    interpolation = clip.preprocess_cfg.get("interpolation") or "bicubic"
    threads = 1 if clip.device.type == "cuda" else 0  # one thread feeds the decoder; inline beside a CPU forward
    with pooled_decoder(clip.device, cpu_threads, interpolation) as batch_decoder:
        images = ShardImages(shards, clip.fit_image, clip.image_size, batch_size, batch_decoder)
        with contextlib.closing(images.batches(threads)) as batches:  # its own pixels: none to pin
            yield from _on_device(batches, clip.device)


def _on_device(batches: Iterator[ImageBatch], device: torch.device) -> Iterator[ImageBatch]:
    """``batches`` with their pixels on a GPU, each copied on a side stream while the one before it is embedded."""
    if device.type != "cuda":
        yield from batches
        return
    copies, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    ahead = None
    for batch in batches:
        if batch.pixels.is_cuda:  # a batch decoder's, complete when it came
            pixels = batch.pixels
        else:
            with torch.cuda.stream(copies):
                pixels = batch.pixels.to(device, non_blocking=True)  # from pinned memory: returns at once
        if ahead is not None:
            yield ahead
        compute.wait_stream(copies)
        pixels.record_stream(compute)  # its memory is not reused by the next copy while the model reads it
        ahead = batch._replace(pixels=pixels)
    if ahead is not None:
        yield ahead


def _to_host(chunks: list[torch.Tensor], clip) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A shard's embeddings on their way to host memory, and the event that says they have arrived."""
    if not chunks:
        return torch.zeros(0, clip.embed_dim), None
    embeddings = torch.cat(chunks)
    if embeddings.device.type != "cuda":
        return embeddings.float().cpu(), None
    host = embeddings.float().to("cpu", non_blocking=True)  # into pinned memory, behind the queued batches
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _write_shard(out_path: Path, keys: list[str], embeddings: torch.Tensor, copied: torch.cuda.Event | None,
                 skipped: list[str]) -> ShardEmbedding:
    if copied is not None:
        copied.synchronize()
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, int)
    write_embeddings(out_path, [keys[i] for i in order], embeddings.numpy()[order])
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

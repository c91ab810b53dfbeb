"""Benchmark: the embed stage (shards -> Parquet) against the bare image-encoder forward pass.

For each model, in one run on the same images and batch size: (a) the embed stage's work for one task,
:func:`clipgen.embed.embed_shards` over ``--n`` images in WebDataset shards of ``--shard-size`` (the
pipeline's default), with each decoder of ``--decoders`` on the threads the stage would pick, encoding and
writing one Parquet file per shard; (b) ``ClipModel.encode_images`` on uint8 pixels that are already decoded
and on the model's device, the very call the stage makes (no data loading, no host-to-device copy); and (c) per
decoder, the data loading alone (:func:`clipgen.embed.device_batches`: decode and move to the device, no model).
The ratio a/b says how well data loading is hidden (1.0 = fully); c says what bounds it. The toy CLIP reads
shapes-world PNGs and ViT-B-32 JPEGs made as ingest makes them (quality 95, 4:4:4 chroma: ~2x the decoding
cost of a camera's 4:2:0), the formats each meets in practice; each side runs ``--repeats`` times,
interleaved, and the best run counts. Models are built at random init (pretrained=None), so this runs
offline; speed does not depend on the weights' values. Prints one JSON line.

    python benchmarks/embed.py [--n 5000] [--batch-size 128] [--threads N] [--device cuda]
                               [--models toy-clip,ViT-B-32] [--decoders opencv,nvimgcodec] [--image-size 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipgen.clip import load_clip
from clipgen.config import DataConfig, WorldConfig
from clipgen.data.images import encode_jpeg
from clipgen.data.shards import Sample, write_shards
from clipgen.data.world import iter_world_split
from clipgen.embed import decode_threads, device_batches, embed_shards, nvimgcodec_threads

DISTINCT_JPEGS = 500  # encoding photos is slow; decoding cost does not depend on repeats among them


def make_shards(root: Path, n: int, size: int, fmt: str, shard_size: int) -> list[Path]:
    """``n`` images at model size in the format the model really meets: shapes-world PNGs or photo JPEGs."""
    if fmt == "png":
        world = WorldConfig(n_heldout=n)
        samples = list(itertools.islice(iter_world_split(world, "heldout", size), n))
    else:
        rng = np.random.default_rng(0)
        photos = []
        for _ in range(min(n, DISTINCT_JPEGS)):
            # smooth gradients plus noise: JPEG-compressible like a photo, unlike pure noise
            base = np.linspace(0, 255, size)[None, :, None] * rng.random(3)
            pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            photos.append(encode_jpeg(Image.fromarray(pixels)))
        samples = [Sample(f"img{i:06d}", photos[i % len(photos)], "jpg", {}) for i in range(n)]
    return [root / info.shard for info in write_shards(samples, root, "train", shard_size)]


def bench_model(name: str, n: int, batch_size: int, shard_size: int, threads: int | None, repeats: int,
                device: str, decoders: list[str], stored_size: int | None, tmp: Path) -> dict:
    clip = load_clip(name, None, device=device)
    fmt = "png" if clip.image_size <= 64 else "jpg"
    stored_size = stored_size or clip.image_size  # ingest sizes images for the VQGAN, which may differ
    shards = make_shards(tmp / name, n, stored_size, fmt, shard_size)
    jobs = [(shard, tmp / name / "cache" / f"{shard.stem}.parquet") for shard in shards]
    # what the pipeline hands encode_images, already decoded and on the device: uint8 [N, S, S, 3]. (Float
    # tensors in NCHW order, preprocessed on the host, ran the same model ~20% slower on a CPU: the uint8 path's
    # permute leaves them channels-last, which oneDNN's patch-embedding convolution prefers.)
    pixels = torch.zeros(n, clip.image_size, clip.image_size, 3, dtype=torch.uint8, device=clip.device)

    def timed(work) -> float:  # images per second
        start = time.perf_counter()
        count = work()
        if clip.device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - start)

    def bare() -> int:
        clip.encode_images(pixels, batch_size=batch_size)
        return n

    def pipeline(decoder: str) -> int:
        return sum(result.count for result in embed_shards(clip, jobs, batch_size, threads, decoder))

    def loading(decoder: str) -> int:
        return sum(len(batch.keys) for batch in device_batches(clip, shards, batch_size, threads, decoder))

    sides = {"bare": bare}
    for decoder in decoders:
        sides[decoder], sides[f"{decoder}_loading"] = partial(pipeline, decoder), partial(loading, decoder)
    for work in sides.values():
        timed(work)  # warm-up: first-call allocations, cuDNN autotune, the Parquet writer's import, and the start
        # of the pooled nvImageCodec decoder (~0.7 s on a GPU), which the stage pays once per process
    runs = [{side: timed(work) for side, work in sides.items()} for _ in range(repeats)]  # interleaved
    best = {side: max(run[side] for run in runs) for side in sides}
    default_threads = {"opencv": decode_threads(clip.device, clip.image_size),
                       "nvimgcodec": nvimgcodec_threads(clip.device)}
    return {"model": name, "image_size": clip.image_size, "stored_size": stored_size, "format": fmt,
            "device": str(clip.device), "shards": len(shards), "bare_forward_images_per_s": round(best["bare"], 1),
            "decoders": {d: {"threads": threads if threads is not None else default_threads[d],
                             "pipeline_images_per_s": round(best[d], 1), "ratio": round(best[d] / best["bare"], 3),
                             "loading_only_images_per_s": round(best[f"{d}_loading"], 1)} for d in decoders}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=DataConfig().shard_size)
    parser.add_argument("--threads", type=int, default=None,
                        help="decoding threads; default: what the embed stage picks for each decoder")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; the best counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="toy-clip,ViT-B-32")
    parser.add_argument("--decoders", default="opencv", help="comma-separated: opencv, nvimgcodec")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels per side of the stored images; default: each model's input size "
                             "(pipelines/imagenet.yaml stores 256 px for a 224 px CLIP, so every image is resized)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, args.n, args.batch_size, args.shard_size, args.threads, args.repeats, args.device,
                            args.decoders.split(","), args.image_size, Path(tmp)) for m in args.models.split(",")]
    print(json.dumps({"benchmark": "embed", "n_images": args.n, "batch_size": args.batch_size,
                      "shard_size": args.shard_size,
                      "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "models": rows}))


if __name__ == "__main__":
    main()

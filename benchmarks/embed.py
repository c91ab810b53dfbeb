"""Benchmark: the embed stage (shards -> Parquet) against the bare image-encoder forward pass.

For each model, in one run on the same images and batch size: (a) :func:`clipgen.embed.embed_shard`
reading a WebDataset shard, decoding through a DataLoader with workers, encoding and writing Parquet, and
(b) ``ClipModel.encode_images`` on tensors that are already decoded and preprocessed (no data loading).
The ratio a/b says how well data loading is hidden (1.0 = fully). Models are built at random init
(pretrained=None), so this runs offline; speed does not depend on the weights' values.
Prints one JSON line.

    python benchmarks/embed.py [--n 512] [--batch-size 128] [--workers 2] [--models toy-clip,ViT-B-32]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipgen.clip import load_clip
from clipgen.data.shards import Sample, write_shards
from clipgen.embed import embed_shard


def make_shard(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        samples.append(Sample(f"img{i:06d}", buf.getvalue(), "jpg", {}))
    write_shards(samples, root, "train", shard_size=n)
    return root / "train" / "00000.tar"


def bench_model(name: str, n: int, batch_size: int, workers: int, tmp: Path) -> dict:
    clip = load_clip(name, None)
    shard = make_shard(tmp / name, n, clip.image_size)  # ingest already sized them
    pixels = torch.stack([clip.preprocess(Image.new("RGB", (clip.image_size,) * 2)) for _ in range(n)])
    clip.encode_images(pixels[:batch_size], batch_size=batch_size)  # warm-up at the measured batch size
    start = time.perf_counter()
    clip.encode_images(pixels, batch_size=batch_size)
    bare = n / (time.perf_counter() - start)
    start = time.perf_counter()
    result = embed_shard(clip, shard, tmp / f"{name}.parquet", batch_size=batch_size, num_workers=workers)
    pipeline = result.count / (time.perf_counter() - start)
    return {"model": name, "image_size": clip.image_size, "pipeline_images_per_s": round(pipeline, 1),
            "bare_forward_images_per_s": round(bare, 1), "ratio": round(pipeline / bare, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="toy-clip,ViT-B-32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, args.n, args.batch_size, args.workers, Path(tmp)) for m in args.models.split(",")]
    print(json.dumps({"benchmark": "embed", "n_images": args.n, "batch_size": args.batch_size,
                      "workers": args.workers, "threads": torch.get_num_threads(), "models": rows}))


if __name__ == "__main__":
    main()

"""Benchmark: folder ingest throughput against a bare single-process PIL decode + resize + crop.

Writes ``--n`` seeded 640x480 JPEG photos-like images (smooth gradients, shapes, mild noise), then times,
in one run on the same files: (a) :func:`clipgen.data.ingest.ingest_folder` with ``--workers`` processes
(reading, decoding, resizing, re-encoding and writing shards), and (b) the plain loop a user would write
first: ``Image.open -> convert('RGB') -> resize short side (LANCZOS) -> centre crop``, in one process.
Prints one JSON line: wall-clock images/s of both and their ratio, plus CPU ms per image of both (the
wall-clock ratio needs idle cores to mean anything; the CPU cost does not).

    python benchmarks/ingest.py [--n 2000] [--image-size 256] [--workers 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipgen.config import DataConfig
from clipgen.data.ingest import ingest_folder


def make_photo(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """A smooth, varied, compressible image (random noise would be an unrealistically slow JPEG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    start, slope = rng.uniform(0, 255, 3), rng.uniform(-0.3, 0.3, (2, 3))
    pixels = start + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 4, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = (x0, y0, x0 + int(rng.integers(20, 240)), y0 + int(rng.integers(20, 240)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i // 500:02d}" / f"{i:05d}.jpg"  # a few sub-folders, like a real collection
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            make_photo(rng).save(path, quality=90)
        else:
            make_photo(rng)  # keep the random stream aligned when reusing a --dir
        paths.append(path)
    return paths


def bare_pil(path: Path, image_size: int) -> Image.Image:
    """The naive reference: full decode, Lanczos resize of the short side, centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        width, height = img.size
        scale = image_size / min(width, height)
        resized = img.resize((max(image_size, round(width * scale)), max(image_size, round(height * scale))),
                             Image.LANCZOS)
        left, top = (resized.width - image_size) // 2, (resized.height - image_size) // 2
        return resized.crop((left, top, left + image_size, top + image_size))


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the ingest pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(work: Path, n: int, image_size: int, workers: int) -> dict:
    paths = write_images(work / "images", n)
    data = DataConfig(source="folder", path=str(work / "images"), image_size=image_size, workers=workers,
                      shard_size=1000)
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = ingest_folder(data, work / f"shards-{time.time_ns()}")
    ingest_s, ingest_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert sum(manifest["counts"].values()) == n, manifest["skipped_by_reason"]
    start, cpu = time.perf_counter(), cpu_seconds()
    for path in paths:
        bare_pil(path, image_size)
    bare_s, bare_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {
        "benchmark": "ingest", "n_images": n, "image_size": image_size, "workers": workers,
        "ingest_images_per_s": round(n / ingest_s, 1),
        "bare_pil_single_process_images_per_s": round(n / bare_s, 1),
        "ratio": round(bare_s / ingest_s, 2),
        # CPU time (all processes) per image: what the work costs, whatever else shares the machine
        "ingest_cpu_ms_per_image": round(1000 * ingest_cpu / n, 2),
        "bare_pil_cpu_ms_per_image": round(1000 * bare_cpu / n, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="keep (and reuse) the images here")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args.dir, args.n, args.image_size, args.workers)))
        return
    with tempfile.TemporaryDirectory(prefix="clipgen-bench-") as tmp:
        print(json.dumps(run(Path(tmp), args.n, args.image_size, args.workers)))


if __name__ == "__main__":  # required: the ingest pool starts worker processes with spawn
    main()

"""Benchmark: nvImageCodec alone on photo-like JPEGs, without shards or a model, to say what bounds the embed
stage's ``clip.decoder=nvimgcodec`` path.

In one run, on the same ``--n`` JPEGs (4:4:4 chroma as ingest writes them, and 4:2:0 as cameras do): images/s of
``Decoder.decode`` for each backend choice (``default``: nvImageCodec's own mix; ``hw``: the GPU's hardware JPEG
engines only; ``hybrid``: nvJPEG's CUDA decoder with Huffman decoding on the CPU; ``cpu``: libjpeg-turbo on its
threads) at each of ``--batch-sizes``; then :class:`clipgen.data.nvdecode.NvImageCodecDecoder` as the stage
calls it (device tensors at model size), and the cost of starting one (construction and first batch, less a
warm batch). On a CPU-only host only the ``cpu`` backend runs. Prints one JSON line.

    python benchmarks/nvdecode.py [--n 1024] [--size 224] [--batch-sizes 128,512] [--threads 15]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from clipgen.data.images import encode_jpeg
from clipgen.data.nvdecode import NvImageCodecDecoder, _import_nvimgcodec
from clipgen.embed import nvimgcodec_threads

DISTINCT = 128  # decoding cost does not depend on repeats among them


def photos(n: int, size: int, subsampling: str) -> list[bytes]:
    """Smooth gradients plus noise: JPEG-compressible like a photo, unlike pure noise."""
    rng = np.random.default_rng(0)
    datas = []
    for _ in range(min(n, DISTINCT)):
        base = np.linspace(0, 255, size)[None, :, None] * rng.random(3) + np.linspace(0, 90, size)[:, None, None]
        image = Image.fromarray(np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
        if subsampling == "444":
            datas.append(encode_jpeg(image))
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95, subsampling=2)
            datas.append(buffer.getvalue())
    return [datas[i % len(datas)] for i in range(n)]


def images_per_s(decode_batch, n: int, batch_size: int, sync) -> float:
    decode_batch(0, batch_size)  # warm-up: first-call allocations
    sync()
    start = time.perf_counter()
    for first in range(0, n, batch_size):
        decode_batch(first, min(first + batch_size, n))
    sync()
    return n / (time.perf_counter() - start)


def backend_rate(decoder, streams: list, params, batch_size: int, cuda_stream: int, sync):
    """Images/s of ``decoder`` over ``streams``; with the count of failures beside it when there are any (a
    backend that cannot take these JPEGs is not fast, it is absent)."""
    failed = 0

    def decode_batch(first: int, last: int) -> None:
        nonlocal failed
        found = decoder.decode(streams[first:last], params=params, cuda_stream=cuda_stream)
        failed += sum(image is None for image in found)

    rate = round(images_per_s(decode_batch, len(streams), batch_size, sync), 1)
    return {"images_per_s": rate, "failed": failed} if failed else rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--threads", type=int, default=None, help="nvImageCodec's CPU threads")
    args = parser.parse_args()
    nv = _import_nvimgcodec()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or nvimgcodec_threads(device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    sync = stream.synchronize if stream else (lambda: None)
    cuda_stream = stream.cuda_stream if stream else 0
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB, sample_format=nv.I_RGB)
    backends = {"default": None, "hw": nv.HW_GPU_ONLY, "hybrid": nv.HYBRID_CPU_GPU, "cpu": nv.CPU_ONLY}
    if device.type != "cuda":
        backends = {"cpu": nv.CPU_ONLY}
    sets = {sub: photos(args.n, args.size, sub) for sub in ("444", "420")}
    rates: dict = {}
    for name, kind in backends.items():
        try:
            decoder = nv.Decoder(device_id=0 if stream else nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=threads,
                                 backends=None if kind is None else [nv.Backend(kind)])
        except Exception as exc:  # a GPU without hardware JPEG engines, say
            rates[name] = f"no decoder: {exc}"
            continue
        for sub, datas in sets.items():
            streams = [nv.CodeStream(data) for data in datas]
            for batch_size in map(int, args.batch_sizes.split(",")):
                rates[f"{name}_{sub}_batch{batch_size}"] = backend_rate(decoder, streams, params, batch_size,
                                                                        cuda_stream, sync)
    fit = lambda img: np.asarray(img.resize((args.size, args.size), Image.BICUBIC), dtype=np.uint8)  # noqa: E731
    start = time.perf_counter()
    ours = NvImageCodecDecoder(device, threads)
    ours.decode(sets["444"][:128], args.size, fit)
    first_batch_s = time.perf_counter() - start
    rate = images_per_s(lambda first, last: ours.decode(sets["444"][first:last], args.size, fit), args.n, 128, sync)
    print(json.dumps({"benchmark": "nvdecode", "device": str(device), "n_images": args.n, "size": args.size,
                      "cpu_threads": threads, "cpus": os.cpu_count(), "decode_images_per_s": rates,
                      "NvImageCodecDecoder_444_batch128_images_per_s": round(rate, 1),
                      "decoder_start_s": round(first_batch_s - 128 / rate, 3)}))


if __name__ == "__main__":
    main()

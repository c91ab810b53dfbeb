"""Whole-batch image decoding with NVIDIA nvImageCodec: on a GPU, JPEGs decode on the GPU itself.

The embed stage's default decoder (OpenCV on a few Python threads) is bound by the host's CPU on a GPU box:
a 16-core H100 host decodes 224 px JPEGs at ~20k img/s flat out, about what ViT-B-32 embeds, so data loading
cannot hide behind the model. nvImageCodec takes a whole batch in one call that runs without the GIL: on a
CUDA device it picks, per image, the GPU's hardware JPEG engines (A100, H100), nvJPEG's CUDA decoder, or a CPU
codec on its own C++ threads (PNG, WebP, ...), and the pixels land in device memory. Anything it cannot read
(GIF, say) falls back to :func:`clipgen.data.images_array.decode_rgb`, so both decoders skip the same samples.

On a CPU device it runs only its CPU codecs (libjpeg-turbo and OpenCV, as ``decode_rgb``): the tests check
there that both decoders give the same pixels, which pins down everything but the GPU codecs themselves.
Needs the ``nvidia-nvimgcodec-cu13[all]`` wheels (``pip install clipgen[gpu]``).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import numpy as np
import torch
from PIL import Image

from clipgen.data.images_array import decode_rgb


def _import_nvimgcodec():
    # its per-image "could not parse" warnings would flood the log; skipped samples are counted by the caller
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise ImportError("embed decoder 'nvimgcodec' needs NVIDIA nvImageCodec: "
                          "pip install 'nvidia-nvimgcodec-cu13[all]' (or clipgen[gpu]), "
                          "or set clip.decoder=opencv") from exc
    return nvimgcodec


class NvImageCodecDecoder:
    """Decodes a batch of encoded images into one uint8 ``[N, S, S, 3]`` tensor on ``device``.

    Call :meth:`decode` from one thread at a time (the embed stage keeps one decoding thread for it). On a
    GPU the batch is decoded and assembled on a stream of its own and is complete when :meth:`decode` returns.
    """

    def __init__(self, device: torch.device, cpu_threads: int):
        nvimgcodec = _import_nvimgcodec()
        self.device = device
        self._host_kind = nvimgcodec.ImageBufferKind.STRIDED_HOST
        self._code_stream = nvimgcodec.CodeStream
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.SRGB,
                                               sample_format=nvimgcodec.I_RGB)  # as decode_rgb: no EXIF turn
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
            self._decoder = nvimgcodec.Decoder(device_id=device.index or 0, max_num_cpu_threads=cpu_threads)
        else:
            self._stream = None
            self._decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                               max_num_cpu_threads=cpu_threads,
                                               backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)])

    def decode(self, datas: list[bytes | None], size: int, fit_image) -> tuple[torch.Tensor, list[bool]]:
        """``(pixels, decoded)``: row i holds ``datas[i]`` at ``size`` (refitted with ``fit_image`` when it is
        another size) where ``decoded[i]``; rows that could not be decoded are left as they are."""
        with torch.cuda.stream(self._stream):  # no-op for None (a CPU device)
            pixels = torch.empty(len(datas), size, size, 3, dtype=torch.uint8, device=self.device)
            images = self._decode_all(datas)
            decoded = [self._fill(pixels[i], data, image, size, fit_image)
                       for i, (data, image) in enumerate(zip(datas, images, strict=True))]
            if self._stream is not None:
                self._stream.synchronize()  # the rows are complete, and the decoder's images may be freed
        return pixels, decoded

    def _decode_all(self, datas: list[bytes | None]) -> list:
        """nvImageCodec's image for each of ``datas``, or None where it has none (:meth:`_fill` retries those)."""
        streams = {}
        for i, data in enumerate(datas):
            with contextlib.suppress(Exception):  # unreadable headers mostly surface as None from decode instead
                streams[i] = self._code_stream(data) if data else None
        present = [i for i, stream in streams.items() if stream is not None]
        images = [None] * len(datas)
        if present:
            cuda_stream = self._stream.cuda_stream if self._stream is not None else 0
            found = self._decoder.decode([streams[i] for i in present], params=self._params, cuda_stream=cuda_stream)
            for i, image in zip(present, found, strict=True):
                images[i] = image
        return images

    def _fill(self, row: torch.Tensor, data: bytes | None, image, size: int, fit_image) -> bool:
        """Copy one decoded image into ``row``; images nvImageCodec could not read take ``decode_rgb``."""
        if image is not None and tuple(image.shape) == (size, size, 3):
            if image.buffer_kind == self._host_kind:
                _copy_host(row, np.asarray(image))
            else:
                row.copy_(torch.as_tensor(image, device=row.device))  # device to device, on the decoder's stream
            return True
        try:
            if image is not None:
                pixels = np.asarray(image.cpu())
            elif data:
                pixels = decode_rgb(data)
            else:
                return False
            if pixels.shape[:2] != (size, size):
                pixels = fit_image(Image.fromarray(pixels))
            _copy_host(row, pixels)
            return True
        except Exception:  # any undecodable sample is skipped and counted, never fatal
            return False


def _copy_host(row: torch.Tensor, pixels: np.ndarray) -> None:
    """Host pixels into a host or device row (nvImageCodec's host images are read-only arrays)."""
    if row.is_cuda:
        row.copy_(torch.from_numpy(np.require(pixels, requirements=["C", "W"])))
    else:
        row.numpy()[...] = pixels

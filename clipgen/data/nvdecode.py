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
            images = [self._at_size(data, image, size, fit_image)
                      for data, image in zip(datas, self._decode_all(datas), strict=True)]
            pixels = torch.empty(len(datas), size, size, 3, dtype=torch.uint8, device=self.device)
            self._copy_host_images(images, pixels)
            for row, image in zip(pixels, images, strict=True):
                if isinstance(image, torch.Tensor):
                    row.copy_(image)  # device to device, behind the decoding on this stream
            if self._stream is not None:
                self._stream.synchronize()  # the rows are complete, and the decoder's images may be freed
        return pixels, [image is not None for image in images]

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

    def _at_size(self, data: bytes | None, image, size: int, fit_image) -> torch.Tensor | np.ndarray | None:
        """One image at ``size``: on the device when the GPU decoded it, else a host array, or None. Images
        nvImageCodec could not read take ``decode_rgb``."""
        if image is not None and tuple(image.shape) == (size, size, 3):
            if image.buffer_kind == self._host_kind:
                return np.asarray(image)
            return torch.as_tensor(image, device=self.device)
        try:
            if image is not None:
                pixels = np.asarray(image.cpu())
            elif data:
                pixels = decode_rgb(data)
            else:
                return None
            return pixels if pixels.shape[:2] == (size, size) else fit_image(Image.fromarray(pixels))
        except Exception:  # any undecodable sample is skipped and counted, never fatal
            return None

    def _copy_host_images(self, images: list, pixels: torch.Tensor) -> None:
        """The host arrays among ``images`` into their rows of ``pixels``: through one pinned buffer and, when
        every image is on the host (PNGs, say, which decode on CPU threads), one copy to the device."""
        on_host = [i for i, image in enumerate(images) if isinstance(image, np.ndarray)]
        if not on_host:
            return
        staging = pixels if not pixels.is_cuda else torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        rows = staging.numpy()
        for i in on_host:
            rows[i] = images[i]
        if staging is pixels:
            return
        if len(on_host) == len(images):
            pixels.copy_(staging, non_blocking=True)
        else:
            for i in on_host:
                pixels[i].copy_(staging[i], non_blocking=True)

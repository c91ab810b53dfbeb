"""Whole-batch image decoding with NVIDIA nvImageCodec: on a GPU, JPEGs decode on the GPU itself.

The embed stage's default decoder (OpenCV on a few Python threads) is bound by the host's CPU on a GPU box:
a 16-core H100 host decodes 224 px JPEGs at ~20k img/s flat out, about what ViT-B-32 embeds, so data loading
cannot hide behind the model. nvImageCodec takes a whole batch in one call that runs without the GIL. On a
CUDA device, square JPEGs (what ingest writes) go to its GPU decoder, which prefers the GPU's hardware JPEG
engines (A100, H100) and falls back to nvJPEG's CUDA decoder; those not at the CLIP's input size (256 px
shards for a 224 px CLIP) are resized on the GPU as the CLIP's preprocessing does (for a square, its resize
is the whole of it), with torch's antialiased filter in place of PIL's (0.2 levels apart on average, 7 at
most, on noisy 256 px photos). Everything else (PNG, WebP, JPEGs
that are not square) goes to nvImageCodec's CPU codecs on their own C++ threads and reaches the device in
one copy per batch (its GPU decoder would copy each such image over on its own, with two waits per image).
Anything it cannot read (GIF, say) falls back to :func:`clipgen.data.images_array.decode_rgb`, so both
decoders skip the same samples.

On a CPU device only the CPU codecs run (libjpeg-turbo and OpenCV, as in ``decode_rgb``): the tests check
there that both decoders give the same pixels, which pins down everything but the GPU decoder itself.
Needs the ``nvidia-nvimgcodec-cu13[all]`` wheels (``pip install clipgen[gpu]``).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from clipgen.data.images_array import decode_fitted, fit_pixels


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

    def __init__(self, device: torch.device, cpu_threads: int, interpolation: str = "bicubic"):
        """``interpolation``: the CLIP's resize filter; JPEGs off its input size are resized on the GPU only
        with a filter torch has (``bicubic``, ``bilinear``), else on the host by ``fit_image``."""
        nvimgcodec = _import_nvimgcodec()
        self._gpu_resize = interpolation if interpolation in ("bicubic", "bilinear") else None
        self._code_stream = nvimgcodec.CodeStream
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.SRGB,
                                               sample_format=nvimgcodec.I_RGB)  # as decode_rgb: no EXIF turn
        self._cpu_decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                               max_num_cpu_threads=cpu_threads,
                                               backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)])
        self.device, self._stream, self._cuda_stream, self._gpu_decoder = device, None, 0, None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)  # the stream and the decoder on the same GPU
            self._stream = torch.cuda.Stream(self.device)
            self._cuda_stream = self._stream.cuda_stream
            self._gpu_decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=cpu_threads)

    def decode(self, datas: list[bytes | None], size: int, fit_image) -> tuple[torch.Tensor, list[bool]]:
        """``(pixels, decoded)``: row i holds ``datas[i]`` at ``size`` (refitted with ``fit_image`` when it is
        another size) where ``decoded[i]``; rows that could not be decoded are left as they are."""
        with torch.cuda.stream(self._stream):  # no-op for None (a CPU device)
            images = _fit_on_device(self._decode_all(datas, size), size, self._gpu_resize)
            images = [_at_size(image, data, size, fit_image) for image, data in zip(images, datas, strict=True)]
            pixels = torch.empty(len(datas), size, size, 3, dtype=torch.uint8, device=self.device)
            _copy_host_images(images, pixels)
            _copy_device_images(images, pixels)
            if self._stream is not None:
                self._stream.synchronize()  # the rows are complete, and the decoder's images may be freed
        return pixels, [image is not None for image in images]

    def _decode_all(self, datas: list[bytes | None], size: int) -> list[torch.Tensor | np.ndarray | None]:
        """Per sample: a device tensor (a square JPEG, decoded on the GPU), a host array (what the CPU codecs
        read), either of any size, or None (nothing nvImageCodec can read; :func:`_at_size` retries those)."""
        streams = [self._parsed(data) for data in datas]
        on_gpu = [i for i, stream in enumerate(streams) if stream is not None and self._gpu_decoder is not None
                  and stream.codec_name == "jpeg" and stream.height == stream.width
                  and (stream.height == size or self._gpu_resize)]
        taken = set(on_gpu)
        on_cpu = [i for i, stream in enumerate(streams) if stream is not None and i not in taken]
        images: list = [None] * len(datas)
        for decoder, indices in ((self._gpu_decoder, on_gpu), (self._cpu_decoder, on_cpu)):
            if not indices:
                continue
            cuda_stream = self._cuda_stream if decoder is self._gpu_decoder else 0
            found = decoder.decode([streams[i] for i in indices], params=self._params, cuda_stream=cuda_stream)
            for i, image in zip(indices, found, strict=True):
                if image is not None:  # the tensor keeps the image, and so its memory, alive
                    images[i] = torch.as_tensor(image, device=self.device) if decoder is self._gpu_decoder \
                        else np.asarray(image)
        return images

    def _parsed(self, data: bytes | None):
        """``data`` as a code stream whose header has been read, or None when there is none to read."""
        if not data:
            return None
        try:
            stream = self._code_stream(data)
            stream.codec_name  # noqa: B018 -- the header is parsed on first use; unreadable ones raise here
            return stream
        except Exception:
            return None


_idle_decoders: dict[tuple, list[NvImageCodecDecoder]] = collections.defaultdict(list)
_idle_lock = threading.Lock()


@contextlib.contextmanager
def pooled_decoder(device: torch.device, cpu_threads: int, interpolation: str = "bicubic"
                   ) -> Iterator[NvImageCodecDecoder]:
    """A :class:`NvImageCodecDecoder` that is kept for the next caller with the same arguments.

    Starting one costs ~0.7 s on an H100 or H200 (the hardware decoder and its first buffers), as long as
    decoding ~14,000 224 px JPEGs there, and the embed stage makes one pipeline per group of shards. Each caller
    holds its decoder alone: callers at the same time (the stage's tasks on threads) get decoders of their own.
    """
    key = (str(device), cpu_threads, interpolation)
    with _idle_lock:
        idle = _idle_decoders[key]
        decoder = idle.pop() if idle else None
    decoder = decoder or NvImageCodecDecoder(device, cpu_threads, interpolation)
    try:
        yield decoder
    finally:
        with _idle_lock:
            _idle_decoders[key].append(decoder)


def _fit_on_device(images: list, size: int, mode: str | None) -> list:
    """``images`` with each device tensor not at ``size`` (all square) resized to it on the device, a batch per
    input size."""
    by_side = collections.defaultdict(list)
    for i, image in enumerate(images):
        if isinstance(image, torch.Tensor) and image.shape[0] != size:
            by_side[image.shape[0]].append(i)
    images = list(images)
    for rows in by_side.values():
        batch = torch.stack([images[i] for i in rows]).permute(0, 3, 1, 2).float()
        resized = F.interpolate(batch, size=(size, size), mode=mode, antialias=True, align_corners=False)
        resized = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        for i, image in zip(rows, resized, strict=True):
            images[i] = image
    return images


def _at_size(image: torch.Tensor | np.ndarray | None, data: bytes | None, size: int, fit_image):
    """A decoded image at ``size`` (device tensors already are), or None when it cannot be decoded at all."""
    if isinstance(image, torch.Tensor):
        return image
    if image is None:
        return decode_fitted(data, size, fit_image)
    try:
        return fit_pixels(image, size, fit_image)
    except Exception:  # any unfittable sample is skipped and counted, never fatal
        return None


def _copy_host_images(images: list, pixels: torch.Tensor) -> None:
    """The host arrays among ``images`` into their rows of ``pixels``: on a GPU through one pinned buffer and,
    when every image is on the host (a batch of PNGs, say), one copy."""
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
        pixels.copy_(staging, non_blocking=True)  # the pinned buffer lives until this copy is done (torch tracks it)
    else:
        for i in on_host:
            pixels[i].copy_(staging[i], non_blocking=True)


def _copy_device_images(images: list, pixels: torch.Tensor) -> None:
    """The device tensors among ``images`` into their rows, on the current stream (the decoder's)."""
    on_device = [i for i, image in enumerate(images) if isinstance(image, torch.Tensor)]
    if on_device and len(on_device) == len(images):
        torch.stack(images, out=pixels)  # one kernel for the batch
    else:
        for i in on_device:
            pixels[i].copy_(images[i])

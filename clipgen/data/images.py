"""Safe image reading and decoding for ingest: one input in, a square RGB image (or a reason to skip) out.

Real collections are messy. This module decides, for one input's bytes, whether it is a usable image and
turns every usable one into the same thing: an RGB image of exactly ``image_size`` x ``image_size``
(short side resized with Lanczos, then centre-cropped). The rules:

* Genuinely bad input raises :class:`SkipImage` with a short, stable ``reason`` that the manifest counts:
  empty, not an image, truncated, corrupt, too small, or a decompression bomb (checked from the header,
  before any pixel is decoded).
* Odd but valid input is kept and converted, with a ``note`` the manifest counts: greyscale, CMYK,
  16-bit, palette or alpha (composited onto white), animated (first frame), EXIF-rotated.

:func:`decode_source` is the ingest worker's whole job (read a file, decode, re-encode as JPEG); it
reports skips as values, so one bad file never stops a pool.
"""

from __future__ import annotations

import errno
import io
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees, so width and height trade places
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow's guidance: reducing by an integer factor first, then resampling with a gap of 3x or more,
# is indistinguishable from resampling the full image, and much faster for big photos.
REDUCING_GAP = 3.0


class SkipImage(Exception):
    """An input that is not a usable image. ``reason`` is short and stable (it is counted)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageResult(NamedTuple):
    image: Image.Image  # RGB, exactly image_size x image_size
    note: str | None  # what was done to an odd-but-valid input ("converted from CMYK"), or None
    width: int  # original width as displayed (after EXIF rotation)
    height: int  # original height as displayed


class Decoded(NamedTuple):
    """What a worker sends back for one input (small and picklable)."""

    jpeg: bytes | None  # None when skipped
    reason: str | None  # the skip reason, or None when kept
    note: str | None
    width: int
    height: int


def read_source(path: str, offset: int = 0, length: int = -1) -> bytes:
    """The bytes of a file (or of a byte range inside one); OS failures become :class:`SkipImage`."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    except OSError as exc:
        raise SkipImage(os_reason(exc), str(exc)) from exc


def os_reason(exc: OSError) -> str:
    return "symlink loop" if exc.errno == errno.ELOOP else "unreadable"


def decode_source(source: tuple[str, int, int], image_size: int, max_pixels: int, min_side: int,
                  quality: int = 95) -> Decoded:
    """Worker job: read, decode, resize and re-encode one input. Never raises for a bad input."""
    try:
        result = load_rgb(read_source(*source), image_size, max_pixels, min_side)
    except SkipImage as skip:
        return Decoded(None, skip.reason, None, 0, 0)
    return Decoded(encode_jpeg(result.image, quality), None, result.note, result.width, result.height)


def load_rgb(data: bytes, image_size: int, max_pixels: int, min_side: int) -> ImageResult:
    """Decode ``data`` into a centre-cropped ``image_size`` square RGB image, or raise :class:`SkipImage`."""
    if not data:
        raise SkipImage("empty file")
    # Decompression-bomb warnings become errors here only, not for the whole process.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _load(data, image_size, max_pixels, min_side)
        except SkipImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SkipImage("decompression bomb", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise SkipImage("not an image", str(exc)) from exc
        except (OSError, EOFError) as exc:
            reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
            raise SkipImage(reason, str(exc)) from exc
        except Exception as exc:  # a broken file must never stop the ingest of the others
            raise SkipImage("corrupt", f"{type(exc).__name__}: {exc}") from exc


def _load(data: bytes, image_size: int, max_pixels: int, min_side: int) -> ImageResult:
    img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    width, height = img.size
    if width * height > max_pixels:
        raise SkipImage("decompression bomb", f"{width}x{height} is more than data.max_pixels={max_pixels}")
    if min(width, height) < min_side:
        raise SkipImage("too small", f"{width}x{height} has a side below data.min_side={min_side}")
    notes = ["animated: first frame"] if _is_animated(img) else []
    orientation = _orientation(img)
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    _draft_jpeg(img, image_size)
    img.load()  # decodes every pixel now, so truncation shows here (LOAD_TRUNCATED_IMAGES stays off)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)  # reuses the EXIF that _orientation already parsed
        notes.append("exif orientation applied")
    mode = img.mode
    if mode != "RGB":
        img = to_rgb(img)
        notes.append(f"converted from {mode}")
    square = resize_center_crop(img, image_size)
    return ImageResult(square, "; ".join(notes) or None, width, height)


def _is_animated(img: Image.Image) -> bool:
    """True for multi-frame files; leaves ``img`` on its first frame."""
    try:
        animated = bool(getattr(img, "is_animated", False))
    except Exception:  # a damaged later frame must not cost us a good first frame
        animated = False
    if img.tell() != 0:
        img.seek(0)
    return animated


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when there is none or it is unreadable."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not cost us a good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _draft_jpeg(img: Image.Image, image_size: int) -> None:
    """Let libjpeg decode big JPEGs at 1/2, 1/4 or 1/8 scale, keeping >= 2x the target on each side."""
    if img.format == "JPEG":
        img.draft(None, (2 * image_size, 2 * image_size))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited onto white."""
    if img.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(_sixteen_to_eight(np.asarray(img)), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(_float_to_eight(np.asarray(img)), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ALPHA_MODES:
        return _composite_on_white(img.convert("RGBA"))
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. LAB: Pillow has no direct conversion
        raise SkipImage("unsupported colour mode", f"{img.mode}: {exc}") from exc


def _sixteen_to_eight(pixels: np.ndarray) -> np.ndarray:
    # 16-bit files use the full 0..65535 range; 65535 / 257 = 255 maps black and white exactly.
    scaled = np.clip(pixels.astype(np.float64), 0, 65535) / 257.0
    return np.round(scaled).astype(np.uint8)


def _float_to_eight(pixels: np.ndarray) -> np.ndarray:
    # Float images (TIFF) are either 0..1 or 0..255 by convention; anything else is clipped.
    pixels = np.nan_to_num(pixels.astype(np.float64))
    scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
    return np.round(np.clip(pixels * scale, 0, 255)).astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    # Transparent pixels often hold black (or garbage) colour; dropping alpha would show it.
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Resize the short side to ``image_size`` (Lanczos, antialiased) and keep the centre square."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    # Cropping through ``box`` resamples only the kept square, with sub-pixel accuracy.
    return img.resize((image_size, image_size), Image.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """Encode an RGB image as a baseline JPEG. 4:4:4 chroma keeps colour edges sharp on small images."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()

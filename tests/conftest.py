"""Shared pytest fixtures.

``tiny_run`` builds every step of the shapes pipeline up to the transformer at a toy size (seconds), for
the tests of the later stages.

``bad_folder`` builds, at test time and with Pillow only (no binary files in the repository), an image
folder as messy as real collections are: good images beside broken, odd and hostile files.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)
ROOT = Path(__file__).resolve().parents[1]


def cli_env(prefect_home: Path) -> dict[str, str]:
    """The environment of a ``clipgen`` subprocess: its own Prefect home, offline, no telemetry."""
    return {**os.environ, "PREFECT_HOME": str(prefect_home), "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}


def clipgen(tmp_path: Path, *args: str, timeout: int = 600, logs: bool = False) -> str:
    """Run the ``clipgen`` command line in a subprocess with its own Prefect home; return its stdout
    (followed by its stderr, where the logs go, if ``logs``)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "clipgen.cli", *args], cwd=ROOT, env=cli_env(tmp_path / "prefect"),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + (out.stderr if logs else "")


@dataclass
class BadFolder:
    path: Path
    kept: dict[str, str | None] = field(default_factory=dict)  # relative path -> expected note (or None)
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> expected skip reason
    # EXIF orientation 6 file: stored 60x40 with a red left half; displayed 40x60 with a red top half
    exif_rotated: str = "odd/rotated.jpg"


def noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_bomb() -> bytes:
    """A 60-byte PNG whose header claims 100000 x 100000 pixels (10 gigapixels)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (60, 40), BLUE)
    img.paste(RED, (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return encoded(img, "JPEG", exif=exif, quality=95)


def _odd_files() -> dict[str, tuple[bytes, str | None]]:
    """Valid but unusual images -> (bytes, note the ingest should record)."""
    grey16 = Image.fromarray(np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 30))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (10, 10, 30, 30))
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, BLUE, (0, 255, 0))]
    animation = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    return {
        "odd/grey.png": (encoded(noise_image(10).convert("L"), "PNG"), "converted from L"),
        "odd/cmyk.jpg": (encoded(noise_image(11).convert("CMYK"), "JPEG"), "converted from CMYK"),
        "odd/deep16.png": (encoded(grey16, "PNG"), f"converted from {grey16.mode}"),
        "odd/palette_alpha.png": (encoded(palette, "PNG", transparency=0), "converted from P"),
        "odd/rgba.png": (encoded(rgba, "PNG"), "converted from RGBA"),
        "odd/animated.gif": (encoded(frames[0], "GIF", **animation), "animated: first frame; converted from P"),
        "odd/animated.webp": (encoded(frames[0], "WEBP", lossless=True, **animation), "animated: first frame"),
        "odd/rotated.jpg": (exif_rotated_jpeg(), "exif orientation applied"),
    }


def _good_files() -> dict[str, bytes]:
    return {
        "good/a.jpg": encoded(noise_image(1), "JPEG", quality=90),
        "good/b.png": encoded(noise_image(2, (48, 64)), "PNG"),
        "good/nested/deeper/c.jpg": encoded(noise_image(3, (200, 120)), "JPEG"),
        "album.jpg/inside.png": encoded(noise_image(4), "PNG"),  # a *folder* named like an image
        "no_extension": encoded(noise_image(5), "PNG"),  # Pillow decides, not the file name
        os.fsdecode(b"caf\xe9 latin-1 name.jpg"): encoded(noise_image(8), "JPEG"),  # not valid UTF-8
    }


def _bad_files() -> dict[str, tuple[bytes, str]]:
    jpeg = encoded(noise_image(6, (120, 100)), "JPEG")
    png = encoded(noise_image(7, (120, 100)), "PNG")
    return {
        "bad/empty.jpg": (b"", "empty file"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "bad/truncated.png": (png[: len(png) // 2], "truncated"),
        "bad/text.jpg": (b"this is a text file, not a JPEG\n", "not an image"),
        "bad/tiny.png": (encoded(Image.new("RGB", (1, 1), RED), "PNG"), "too small"),
        "bad/bomb.png": (png_bomb(), "decompression bomb"),
    }


def _links(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Symlinks -> (kept: name -> None-able note, skipped: name -> reason)."""
    (root / "bad/loop.jpg").symlink_to("loop.jpg")  # points at itself
    (root / "bad/cycle_a.jpg").symlink_to("cycle_b.jpg")
    (root / "bad/cycle_b.jpg").symlink_to("cycle_a.jpg")
    (root / "bad/dangling.jpg").symlink_to("no_such_file.jpg")
    (root / "linked_good.jpg").symlink_to("good/a.jpg")  # a link to a file is an input like any other
    (root / "linked_folder").symlink_to("good", target_is_directory=True)  # not followed, but reported
    skipped = {
        "bad/loop.jpg": "symlink loop", "bad/cycle_a.jpg": "symlink loop", "bad/cycle_b.jpg": "symlink loop",
        "bad/dangling.jpg": "unreadable", "linked_folder": "symlinked folder not followed",
    }
    return {"linked_good.jpg": None}, skipped


def write_bad_folder(root: Path) -> BadFolder:
    """Fill ``root`` with good, odd-but-valid and bad inputs; say what the ingest should do with each."""
    folder = BadFolder(root)
    files = {name: (data, None) for name, data in _good_files().items()} | _odd_files()
    for name, (data, note) in files.items():
        _write(root / name, data)
        folder.kept[name] = note
    for name, (data, reason) in _bad_files().items():
        _write(root / name, data)
        folder.skipped[name] = reason
    kept_links, skipped_links = _links(root)
    folder.kept.update(kept_links)
    folder.skipped.update(skipped_links)
    assert os.path.islink(root / "bad/loop.jpg")
    return folder


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def bad_folder(tmp_path: Path) -> BadFolder:
    return write_bad_folder(tmp_path / "images")


# ------------------------------------------------------------------------------------- tiny run
TINY_RUN = ["data.world.n_captioned=64", "data.world.n_train=48", "data.world.n_heldout=24", "data.shard_size=16",
            "data.world.n_judge=64", "data.judge.steps=2", "data.judge.batch_size=16",
            "clip.toy.steps=3", "clip.toy.batch_size=16", "data.workers=1",
            "vqgan.steps=3", "vqgan.batch_size=8", "gpt.steps=4", "gpt.batch_size=8", "gpt.n_layer=1",
            "gpt.n_embd=32", "gpt.n_head=2", "gpt.warmup_steps=1", "train.log_every=2", "sample.n_per_prompt=2",
            "eval.held_out_images_per_prompt=3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A shapes run with shards, judge, toy CLIP, embeddings, VQGAN, tokens and transformer built."""
    from clipgen.config import load_config
    from clipgen.pipeline import run_step

    cfg = load_config("pipelines/shapes.yaml", [*TINY_RUN, f"run_dir={tmp_path_factory.mktemp('tiny_run')}"])
    for step in ("shards", "judge", "toyclip", "embeddings", "vqgan", "tokens", "gpt"):
        run_step(cfg, step)
    return cfg

"""Folder and URL-list ingest: bad files skipped with reasons, odd files kept and noted, reruns identical."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLUE, RED, BadFolder, encoded, noise_image
from PIL import Image

from clipgen.config import DataConfig
from clipgen.data.images import SkipImage, load_rgb, read_source
from clipgen.data.ingest import IngestError, ingest_folder, ingest_urls, make_key
from clipgen.data.shards import iter_shard, shard_paths


def folder_config(path: Path, **overrides) -> DataConfig:
    return DataConfig(source="folder", path=str(path), image_size=32, shard_size=4, **overrides)


def read_samples(root: Path) -> dict[str, tuple[Image.Image, dict]]:
    """key -> (decoded image, meta) over every split; fails on a key written twice."""
    samples = {}
    for split in ("train", "heldout"):
        for shard in shard_paths(root, split):
            for key, members in iter_shard(shard):
                assert key not in samples, f"key {key} written twice"
                meta = json.loads(members["json"])
                assert meta["split"] == split
                samples[key] = (Image.open(io.BytesIO(members["jpg"])), meta)
    return samples


def is_close(pixel, colour, tolerance=40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour, strict=True))


# ------------------------------------------------------------------------------------------ folder
def test_bad_folder_skips_bad_keeps_good_and_notes_odd(bad_folder: BadFolder, tmp_path: Path):
    root = tmp_path / "shards"
    manifest = ingest_folder(folder_config(bad_folder.path, heldout_fraction=0.3), root)

    skipped = {s["input"]: s["reason"] for s in manifest["skipped"]}
    assert skipped == bad_folder.skipped
    samples = read_samples(root)
    assert set(samples) == {make_key(name) for name in bad_folder.kept}
    assert sum(manifest["counts"].values()) == len(bad_folder.kept)
    assert manifest["counts"]["train"] > 0 and manifest["counts"]["heldout"] > 0
    expected_notes: dict[str, int] = {}
    for note in filter(None, bad_folder.kept.values()):
        for part in note.split("; "):
            expected_notes[part] = expected_notes.get(part, 0) + 1
    assert manifest["notes"] == expected_notes
    assert json.loads((root / "manifest.json").read_text())["notes"] == expected_notes
    for name, note in bad_folder.kept.items():
        image, meta = samples[make_key(name)]
        assert image.size == (32, 32) and image.mode == "RGB"
        assert meta["source_path"] == name and meta["note"] == note


def test_exif_rotation_is_applied(bad_folder: BadFolder, tmp_path: Path):
    ingest_folder(folder_config(bad_folder.path, workers=1), tmp_path / "shards")
    image, meta = read_samples(tmp_path / "shards")[make_key(bad_folder.exif_rotated)]
    assert (meta["width"], meta["height"]) == (40, 60)  # as displayed, not as stored
    # displayed: red top half, blue bottom half; the unrotated file would be red left, blue right
    assert is_close(image.getpixel((28, 4)), RED) and is_close(image.getpixel((4, 28)), BLUE)


def test_rerun_is_byte_identical_whatever_the_worker_count(bad_folder: BadFolder, tmp_path: Path):
    first = ingest_folder(folder_config(bad_folder.path, workers=2), tmp_path / "a")
    second = ingest_folder(folder_config(bad_folder.path, workers=1), tmp_path / "b")
    assert first["shards"] == second["shards"] and first["skipped"] == second["skipped"]
    for info in first["shards"]["train"]:
        assert (tmp_path / "a" / info["shard"]).read_bytes() == (tmp_path / "b" / info["shard"]).read_bytes()


def test_missing_empty_and_all_bad_folders_are_clear_errors(tmp_path: Path):
    with pytest.raises(IngestError, match="does not exist; set data.path"):
        ingest_folder(folder_config(tmp_path / "nowhere"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no files"):
        ingest_folder(folder_config(tmp_path / "empty"), tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/a.jpg").write_bytes(b"")
    (tmp_path / "junk/b.txt").write_text("hello")
    with pytest.raises(IngestError, match=r"no usable image among 2 inputs.*'empty file': 1.*'not an image': 1"):
        ingest_folder(folder_config(tmp_path / "junk", workers=1), tmp_path / "out")


def test_reading_a_folder_or_a_missing_file_is_unreadable(tmp_path: Path):
    for path in (tmp_path, tmp_path / "missing.jpg"):
        with pytest.raises(SkipImage) as caught:
            read_source(str(path))
        assert caught.value.reason == "unreadable"


# ------------------------------------------------------------------------------------------ decoder
def test_odd_modes_convert_to_the_right_colours():
    grey16 = Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    assert np.asarray(load_rgb(encoded(grey16, "PNG"), 8, 10**6, 1).image).mean() == pytest.approx(128, abs=1)
    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black must come out white
    assert load_rgb(encoded(clear, "PNG"), 8, 10**6, 1).image.getpixel((4, 4)) == (255, 255, 255)
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    assert is_close(load_rgb(encoded(cyan, "JPEG"), 8, 10**6, 1).image.getpixel((4, 4)), (0, 255, 255))


def test_size_limits_are_checked_before_decoding():
    data = encoded(noise_image(0, (200, 100)), "JPEG")
    with pytest.raises(SkipImage, match="decompression bomb"):
        load_rgb(data, 32, max_pixels=10_000, min_side=8)
    with pytest.raises(SkipImage, match="too small"):
        load_rgb(data, 32, max_pixels=10**6, min_side=101)
    result = load_rgb(data, 32, max_pixels=20_000, min_side=100)
    assert result.image.size == (32, 32) and (result.width, result.height) == (200, 100)


def test_big_jpeg_resize_matches_full_decode():
    """The JPEG draft (DCT-scaled decode) shortcut must not visibly change the result."""
    photo = Image.fromarray(np.kron(np.random.default_rng(0).integers(0, 256, (12, 16, 3)), np.ones((40, 40, 1)))
                            .astype(np.uint8))  # 640x480 of flat 40px blocks
    fast = np.asarray(load_rgb(encoded(photo, "JPEG", quality=95), 48, 10**7, 8).image, dtype=float)
    exact = np.asarray(load_rgb(encoded(photo, "PNG"), 48, 10**7, 8).image, dtype=float)
    assert np.abs(fast - exact).mean() < 3.0


# --------------------------------------------------------------------------------------------- URLs
def write_url_list(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    images = tmp_path / "web"
    images.mkdir(exist_ok=True)
    urls = []
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(encoded(noise_image(20 + i), "JPEG"))
        urls.append((images / f"{i}.jpg").as_uri())
    missing = (images / "missing.jpg").as_uri()
    rows = [(url, f"picture {i}") for i, url in enumerate([*urls, missing])]
    path = tmp_path / f"urls.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"link": [r[0] for r in rows], "text": [r[1] for r in rows]}), path)
    else:
        sep = "\t" if kind == "tsv" else ","
        path.write_text("\n".join(sep.join(r) for r in [("link", "text"), *rows]) + "\n")
    return path, urls


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_url_list_downloads_good_and_records_failures(tmp_path: Path, kind: str):
    url_list, urls = write_url_list(tmp_path, kind)
    data = DataConfig(source="urls", path=str(url_list), url_column="link", caption_column="text",
                      image_size=32, heldout_fraction=0.0, workers=1)
    manifest = ingest_urls(data, tmp_path / "shards")
    samples = read_samples(tmp_path / "shards")
    assert set(samples) == {make_key(url) for url in urls}
    for i, url in enumerate(urls):
        image, meta = samples[make_key(url)]
        assert meta["url"] == url and meta["caption"] == f"picture {i}" and image.size == (32, 32)
    [skip] = manifest["skipped"]
    assert skip["input"].endswith("missing.jpg") and skip["reason"].startswith("download failed: ")
    assert not (tmp_path / "shards/.img2dataset").exists()


def test_url_list_errors_name_the_fix(tmp_path: Path, monkeypatch):
    url_list, _ = write_url_list(tmp_path, "csv")
    with pytest.raises(IngestError, match=r"data.url_column = 'url' is not a column .* \['link', 'text'\]"):
        ingest_urls(DataConfig(source="urls", path=str(url_list)), tmp_path / "out")
    with pytest.raises(IngestError, match="unknown URL list type"):
        ingest_urls(DataConfig(source="urls", path=str(tmp_path / "web/0.jpg")), tmp_path / "out")
    monkeypatch.setitem(sys.modules, "img2dataset", None)  # as if it were not installed
    with pytest.raises(IngestError, match="run `make install`"):
        ingest_urls(DataConfig(source="urls", path=str(url_list), url_column="link"), tmp_path / "out")

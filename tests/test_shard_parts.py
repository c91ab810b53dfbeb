"""Ingest writes one shard per task: any map gives the same shards, and a rerun keeps the finished ones."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import noise_image
from test_world import small_world

from clipgen.config import DataConfig
from clipgen.data.ingest import ingest_folder, make_key
from clipgen.data.world import ingest_world


def thread_map(fn, items):
    with ThreadPoolExecutor(3) as pool:
        return list(pool.map(fn, items))


class Killed(Exception):
    pass


def map_killed_after(n: int):
    """A map that runs ``n`` tasks and then dies, as a killed run would (later tasks never start)."""
    def map_fn(fn, items):
        for i, item in enumerate(items):
            if i == n:
                raise Killed
            fn(item)
    return map_fn


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Each shard's (inode, mtime): a file rewritten, even with the same bytes, gets a new inode."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.glob("*/*.tar"))}


def world_data(**overrides) -> DataConfig:
    return DataConfig(**{"shard_size": 16, "workers": 1, "world": small_world(n_train=70, n_heldout=20), **overrides})


def test_world_shards_are_the_same_through_any_map_and_worker_count(tmp_path):
    serial = ingest_world(world_data(), tmp_path / "serial")
    threaded = ingest_world(world_data(workers=2), tmp_path / "threads", map_fn=thread_map)
    assert threaded == serial
    assert [s["count"] for s in serial["shards"]["train"]] == [16, 16, 16, 16, 6]
    for split in serial["shards"].values():
        for info in split:
            assert (tmp_path / "serial" / info["shard"]).read_bytes() == \
                (tmp_path / "threads" / info["shard"]).read_bytes()


def test_a_killed_world_ingest_keeps_its_finished_shards(tmp_path):
    whole = ingest_world(world_data(), tmp_path / "whole")
    root = tmp_path / "killed"
    with pytest.raises(Killed):
        ingest_world(world_data(), root, map_fn=map_killed_after(3))
    assert not (root / "manifest.json").exists()
    finished = stamps(root)
    assert len(finished) == 3
    # a record that no longer matches its tar (cut short after it was written) is not trusted
    victim = sorted(root.glob("*/*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1024])
    calls = []
    resumed = ingest_world(world_data(), root, map_fn=lambda fn, items: [calls.append(i.name) or fn(i) for i in items])
    assert resumed == whole
    n_shards = sum(len(v) for v in whole["shards"].values())
    assert len(calls) == n_shards - 2  # the two whole shards were kept, the cut one rewritten
    kept = {name: stamp for name, stamp in stamps(root).items() if name in finished}
    assert sum(kept[name] == finished[name] for name in kept) == 2
    assert (root / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()


def test_folder_shards_are_key_ranges_and_skipped_inputs_never_shift_others(tmp_path: Path):
    """A shard holds the inputs whose keys fall in its range (8 inputs at shard_size 2: 4 ranges); bad inputs
    shorten their own shard, and a range of only bad inputs leaves a record and a numbered gap. So each
    shard's content is fixed by its range alone, and a task can write it."""
    names = [f"image-{i}.png" for i in range(8)]
    shard_of = {name: int(make_key(name), 16) * 4 >> 64 for name in names}
    empty = shard_of[names[0]]  # every input of this range is bad
    bad = {name for name in names if shard_of[name] == empty} | {names[-1]}
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(names):
        if name in bad:
            (folder / name).write_bytes(b"not an image")
        else:
            noise_image(i).save(folder / name)
    data = DataConfig(source="folder", path=str(folder), image_size=32, shard_size=2, workers=1, heldout_fraction=0.0)
    manifest = ingest_folder(data, tmp_path / "shards")
    good = Counter(shard_of[name] for name in names if name not in bad)
    assert [(info["shard"], info["count"]) for info in manifest["shards"]["train"]] == \
        [(f"train/{i:05d}.tar", good[i]) for i in sorted(good)]
    assert manifest["inputs"] == {"tried": 8, "kept": 8 - len(bad), "skipped": len(bad)}
    assert sorted(s["input"] for s in manifest["skipped"]) == sorted(bad)
    assert json.loads((tmp_path / "shards" / "train" / f"{empty:05d}.part.json").read_text())["shard"] is None
    assert not (tmp_path / "shards" / "train" / f"{empty:05d}.tar").exists()


def test_a_changed_folder_decodes_only_the_shards_whose_files_changed(tmp_path: Path):
    """A new folder artifact links every shard of unchanged inputs and settings from the run's other shard
    artifacts, and decodes only the ranges that gained, lost or changed a file; the result is byte for byte
    a cold ingest of the changed folder. Other settings (image size) reuse nothing."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(24):
        noise_image(i).save(folder / f"image-{i}.png")
    data = DataConfig(source="folder", path=str(folder), image_size=32, shard_size=4, workers=1, heldout_fraction=0.0)
    shards = tmp_path / "run" / "shards"
    ingest_folder(data, shards / "before")

    added, removed, edited = "image-new.png", "image-3.png", "image-7.png"
    noise_image(100).save(folder / added)
    (folder / removed).unlink()
    noise_image(101).save(folder / edited)
    touched = {f"train/{int(make_key(name), 16) * 8 >> 64:05d}" for name in (added, removed, edited)}

    def counting_map(fn, plans):
        decoded.extend(plan.name for plan in plans)
        return [fn(plan) for plan in plans]

    decoded: list[str] = []
    after = ingest_folder(data, shards / "after", counting_map)
    assert sorted(decoded) == sorted(touched)
    for info in after["shards"]["train"]:
        linked = (shards / "before" / info["shard"]).exists() and \
            (shards / "after" / info["shard"]).stat().st_ino == (shards / "before" / info["shard"]).stat().st_ino
        assert linked == (info["shard"][:-4] not in touched), info["shard"]

    cold = ingest_folder(data, tmp_path / "elsewhere" / "shards" / "cold")
    assert cold == after
    for info in after["shards"]["train"]:
        assert (shards / "after" / info["shard"]).read_bytes() == \
            (tmp_path / "elsewhere" / "shards" / "cold" / info["shard"]).read_bytes()

    decoded.clear()
    ingest_folder(DataConfig(**{**vars(data), "image_size": 16}), shards / "smaller", counting_map)
    assert len(decoded) == len(after["shards"]["train"])

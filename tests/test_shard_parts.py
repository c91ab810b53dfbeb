"""Ingest writes one shard per task: any map gives the same shards, and a rerun keeps the finished ones."""

from __future__ import annotations

import json
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


def test_folder_slices_keep_their_place_when_inputs_are_skipped(tmp_path: Path):
    """Bad inputs shorten their slice's shard and never shift later inputs into it; a slice of only bad inputs
    leaves a numbered gap. So each shard's content is fixed by its slice alone, and a task can write it."""
    names = sorted((f"image-{i}.png" for i in range(8)), key=make_key)  # the order ingest shards them in
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(names):
        if i in (0, 1, 4):
            (folder / name).write_bytes(b"not an image")
        else:
            noise_image(i).save(folder / name)
    data = DataConfig(source="folder", path=str(folder), image_size=32, shard_size=2, workers=1, heldout_fraction=0.0)
    manifest = ingest_folder(data, tmp_path / "shards")
    assert [(info["shard"], info["count"]) for info in manifest["shards"]["train"]] == \
        [("train/00001.tar", 2), ("train/00002.tar", 1), ("train/00003.tar", 2)]
    assert manifest["inputs"] == {"tried": 8, "kept": 5, "skipped": 3}
    assert sorted(s["input"] for s in manifest["skipped"]) == sorted(names[i] for i in (0, 1, 4))
    assert json.loads((tmp_path / "shards" / "train" / "00000.part.json").read_text())["shard"] is None
    assert not (tmp_path / "shards" / "train" / "00000.tar").exists()

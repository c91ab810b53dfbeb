"""Files of a finished artifact that went bad are found on reuse, named in a warning and rebuilt: a shard cut
at a member boundary (which tar readers accept as a shorter shard) and a Parquet cache cut short."""

from __future__ import annotations

import logging
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN

from clipgen.config import load_config
from clipgen.data.shards import DamagedShard, damaged_shards, iter_shard, shard_paths
from clipgen.pipeline import plan, run_step


@pytest.fixture
def run(tmp_path):
    return load_config("pipelines/shapes.yaml", [*TINY_RUN, f"run_dir={tmp_path / 'run'}"])


def cut_at_member(shard, keep_members: int) -> None:
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    end = members[keep_members].offset  # the header of the first member dropped
    data = shard.read_bytes()
    shard.write_bytes(data[:end])


def test_a_shard_cut_at_a_member_boundary_is_caught_and_rebuilt(run, caplog):
    run_step(run, "shards")
    root = plan(run)["shards"].path
    shard = shard_paths(root, "train")[0]
    whole = shard.read_bytes()
    n = sum(1 for _ in iter_shard(shard))
    cut_at_member(shard, 10)
    assert 0 < sum(1 for _ in iter_shard(shard)) < n  # what a reader alone would see: a shorter shard
    with pytest.raises(DamagedShard, match=shard.name):
        shard_paths(root, "train")
    assert [p for p, _ in damaged_shards(root)] == [shard]
    with caplog.at_level(logging.WARNING, logger="clipgen"):
        result = run_step(run, "shards")
    assert result["cached"] is False and f"{shard} is damaged" in caplog.text
    assert shard.read_bytes() == whole and not damaged_shards(root, digest=True)


def test_a_shard_with_the_right_size_but_other_bytes_fails_the_digest_check(run):
    run_step(run, "shards")
    root = plan(run)["shards"].path
    shard = shard_paths(root, "heldout")[-1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not damaged_shards(root)  # the cheap check reads sizes only
    [(path, problem)] = damaged_shards(root, digest=True)
    assert path == shard and "sha256" in problem


def test_a_truncated_parquet_cache_is_rebuilt_with_a_warning(run, caplog):
    for step in ("shards", "toyclip", "embeddings"):
        run_step(run, step)
    cache = plan(run)["embeddings"].path
    victim = sorted(cache.glob("train/*.parquet"))[0]
    before = pq.read_table(victim)
    victim.write_bytes(victim.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="clipgen"):
        result = run_step(run, "embeddings")
    assert result["cached"] is False and f"{victim} is damaged" in caplog.text
    assert pq.read_table(victim).equals(before)
    assert run_step(run, "embeddings")["cached"] is True

"""The shard reader: the fast ustar path agrees with tarfile and webdataset, and odd tars still read."""

import io
import tarfile

import pytest

from clipgen.data import shards
from clipgen.data.shards import Sample, iter_shard, write_shards


def _shard(tmp_path, n=7):
    samples = [Sample(f"k{i:03d}", bytes([i]) * (i * 100 + 1), "png", {"i": i}) for i in range(n)]
    write_shards(samples, tmp_path, "train", shard_size=n)
    return tmp_path / "train" / "00000.tar"


def _tar(path, names, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    return path


def _contents(data, index):
    return [(name, bytes(data[start:start + size])) for name, start, size in index]


def test_fast_reader_matches_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    shard = _shard(tmp_path)
    fast = _contents(*shards._tar_index(shard))
    reference = _contents(*shards._tarfile_index(shard))
    assert fast == reference and len(fast) == 14
    ours = list(iter_shard(shard))
    theirs = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [k for k, _ in ours] == [s["__key__"] for s in theirs]
    assert all(parts["png"] == s["png"] for (_, parts), s in zip(ours, theirs, strict=True))


def test_exts_filter_reads_only_asked_members_and_keeps_every_key(tmp_path):
    shard = _shard(tmp_path)
    samples = list(iter_shard(shard, exts=("png",)))
    assert len(samples) == 7 and all(set(parts) == {"png"} for _, parts in samples)
    assert [k for k, parts in iter_shard(shard, exts=("jpg",))] == [k for k, _ in samples]  # empty dicts


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_tar_format(tmp_path, fmt):
    long_dir = "d" * 120  # beyond the 100-byte name field: pax records, GNU longname or ustar prefix
    shard = _tar(tmp_path / "s.tar", [f"{long_dir}/k1.png", f"{long_dir}/k1.json", f"{long_dir}/k2.png"], fmt)
    assert [(k, sorted(p)) for k, p in iter_shard(shard)] == [("k1", ["json", "png"]), ("k2", ["png"])]


def test_truncated_and_empty_shards_raise(tmp_path):
    shard = _shard(tmp_path)
    data = shard.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("cut.tar", "empty.tar"):
        with pytest.raises(tarfile.ReadError):
            list(iter_shard(tmp_path / name))


def test_small_compressed_shard_reads(tmp_path):
    path = tmp_path / "s.tar.gz"  # under 512 bytes: no room for a plain tar header
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("k1.png", b"xyz"), ("k1.json", b"{}"), ("k2.png", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert path.stat().st_size < 512
    assert list(iter_shard(path)) == [("k1", {"png": b"xyz", "json": b"{}"}), ("k2", {"png": b""})]


def test_shard_index_is_invisible_to_the_garbage_collector(tmp_path):
    """The index lives as long as its shard is read; tracked objects in it made full collections of the whole
    heap (all of torch) frequent enough to cost a quarter of a 32 px image's loading time."""
    import gc

    _, index = shards._tar_index(_shard(tmp_path))
    gc.collect()  # untracks tuples of atoms
    assert index and not any(gc.is_tracked(entry) for entry in index)

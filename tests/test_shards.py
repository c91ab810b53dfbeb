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


def test_fast_reader_matches_tarfile_and_webdataset(tmp_path):
    import webdataset as wds

    shard = _shard(tmp_path)
    fast = [(name, read()) for name, read in shards._tar_members(shard)]
    reference = [(name, read()) for name, read in shards._tarfile_members(shard)]
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

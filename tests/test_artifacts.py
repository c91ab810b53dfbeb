"""Content-addressed ids, atomic writes and the completion marker."""

import pytest

from clipgen.artifacts import Artifact, atomic_path, run_cached, stage_id
from clipgen.config import load_config
from clipgen.pipeline import plan


def test_stage_id_is_stable_and_sensitive():
    base = stage_id("embed", {"model": "toy", "size": 32}, ["abc"], "1")
    assert base == stage_id("embed", {"size": 32, "model": "toy"}, ["abc"], "1")  # key order is irrelevant
    assert len({base, stage_id("embed", {"model": "toy", "size": 64}, ["abc"], "1"),
                stage_id("embed", {"model": "toy", "size": 32}, ["abd"], "1"),
                stage_id("embed", {"model": "toy", "size": 32}, ["abc"], "2"),
                stage_id("tokenize", {"model": "toy", "size": 32}, ["abc"], "1")}) == 5


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [final]


def test_run_cached_builds_once_and_never_trusts_an_unmarked_dir(tmp_path):
    art = Artifact(tmp_path, "things", "abc123")
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text("x")
        return {"n": 1}

    art.prepare()  # an interrupted earlier run left the folder but no marker
    assert not art.is_complete()
    first = run_cached(art, build, stage="things")
    second = run_cached(art, build, stage="things")
    assert len(calls) == 1 and first["cached"] is False and second["cached"] is True
    assert second["n"] == 1 and second["id"] == "abc123"


def test_runtime_only_keys_do_not_change_ids_but_output_keys_do():
    base = plan(load_config("pipelines/shapes.yaml"))
    workers = plan(load_config("pipelines/shapes.yaml", ["data.workers=7"]))
    size = plan(load_config("pipelines/shapes.yaml", ["data.world.n_train=123"]))
    judge = plan(load_config("pipelines/shapes.yaml", ["data.judge.steps=10"]))
    assert base["shards"].id == workers["shards"].id and base["judge"].id == workers["judge"].id
    assert base["shards"].id != size["shards"].id
    assert base["shards"].id == judge["shards"].id and base["judge"].id != judge["judge"].id


def test_a_rebuild_sweeps_an_interrupted_runs_temp_files_and_keeps_its_finished_pieces(tmp_path):
    art = Artifact(tmp_path, "things", "abc")
    (art.path / "sub" / ".ckpt.tmp-999").mkdir(parents=True)
    (art.path / "sub" / ".ckpt.tmp-999" / "weights").write_bytes(b"half")
    (art.path / ".part.parquet.tmp-998").write_bytes(b"half")
    (art.path / "finished.parquet").write_bytes(b"whole")
    seen = []
    run_cached(art, lambda out: seen.append(sorted(p.name for p in out.rglob("*"))) or {}, stage="things")
    assert seen == [["finished.parquet", "sub"]]

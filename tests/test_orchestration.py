"""Orchestration: scale-out (torchrun from a step's task, Dask task runner) and cache sharing between runs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import ROOT, TINY_RUN, clipgen

from clipgen.config import load_config
from clipgen.pipeline import plan, save_run_config


def copy_run(cfg, dest, steps):
    """A second run folder holding copies of ``steps``' finished artifacts (ids do not depend on the folder)."""
    arts = plan(cfg)
    for name in steps:
        shutil.copytree(arts[name].path, dest / arts[name].path.relative_to(cfg.run_path))
    moved = dataclasses.replace(cfg, run_dir=str(dest))
    save_run_config(moved)
    return moved


def test_train_gpt_with_two_devices_runs_under_torchrun_through_the_flow(tiny_run, tmp_path):
    cfg = copy_run(tiny_run, tmp_path / "run", ("shards", "judge", "toyclip", "embeddings", "vqgan", "tokens"))
    out = clipgen(tmp_path, "run", str(cfg.run_path / "pipeline.yaml"), "--stages", "train-gpt",
                  "--set", f"run_dir={cfg.run_path}", "--set", "train.devices=2", "--set", "gpt.steps=3")
    assert "train-gpt      gpt        built" in out
    gpt = plan(load_config(cfg.run_path / "pipeline.yaml", [f"run_dir={cfg.run_path}", "gpt.steps=3"]))["gpt"]
    summary = gpt.summary()
    assert summary["world_size"] == 2 and summary["step"] == 3
    assert (gpt.path / "model.safetensors").is_file()


def artifact_files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != "_COMPLETE"}  # the marker holds the finish time


@pytest.mark.slow
def test_ingest_embed_and_tokenize_on_a_local_dask_cluster_match_the_threads_runner(tiny_run, tmp_path,
                                                                                     monkeypatch):
    """Two single-threaded Dask worker processes, each loading its own models, write the same bytes as the
    default threads runner (with its pool of ingest processes): shards, CLIP cache and token cache. Both run
    torch on one thread: at another thread count the float16 embeddings can differ in the last bit (1 value in
    2048 did on this test's data), as matmul sums are split differently."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Dask's nanny sets for its workers
    built = {}
    for runner in ("threads", "dask"):
        cfg = copy_run(tiny_run, tmp_path / runner, ("judge", "toyclip", "vqgan"))
        out = clipgen(tmp_path, "run", str(cfg.run_path / "pipeline.yaml"), "--stages", "ingest,embed,tokenize",
                      "--set", f"run_dir={cfg.run_path}", "--set", f"orchestration.task_runner={runner}",
                      "--set", "data.workers=2", "--set", "clip.batch_size=8", logs=True)
        for line in ("ingest         shards     built", "embed          embeddings built", "tokenize       tokens     built"):
            assert line in out, out[-3000:]
        assert ("PrefectDaskClient" in out) == (runner == "dask")
        built[runner] = plan(cfg)
    for step in ("shards", "embeddings", "tokens"):
        threads, dask = (artifact_files(built[r][step].path) for r in ("threads", "dask"))
        assert threads and sorted(threads) == sorted(dask), step
        for name in threads:
            assert threads[name] == dask[name], f"{step}: {name} differs"
    assert artifact_files(built["threads"]["shards"].path)["manifest.json"] == \
        (plan(tiny_run)["shards"].path / "manifest.json").read_bytes()  # and the serial map's


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_served_full_deployment_runs_the_tiny_pipeline_then_stop_ends_every_process(tmp_path):
    """make serve's script: server + work pool + deploy + worker; run clip-gen/full; make stop."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "SERVE_DIR": str(tmp_path / "serve"),
           "PREFECT_PORT": str(free_port()), "BIN": str(bin_dir)}
    serve = ROOT / "scripts" / "serve.sh"
    run_dir = tmp_path / "run"
    overrides = json.dumps([*TINY_RUN, f"run_dir={run_dir}", "eval.images_per_prompt=1"])
    try:
        started = subprocess.run([str(serve), "start"], env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr
        pids = [int((tmp_path / "serve" / f"{name}.pid").read_text()) for name in ("server", "worker")]
        api = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{env['PREFECT_PORT']}/api"}
        ran = subprocess.run([str(bin_dir / "prefect"), "deployment", "run", "clip-gen/full", "--param",
                              f"overrides={overrides}", "--watch"], env=api, capture_output=True, text=True, timeout=900)
        assert ran.returncode == 0 and "Completed" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]
    finally:
        subprocess.run([str(serve), "stop"], env=env, timeout=120)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    cfg = load_config("pipelines/shapes.yaml", [*TINY_RUN, f"run_dir={run_dir}", "eval.images_per_prompt=1"])
    assert all(art.is_complete() for art in plan(cfg).values())
    assert (run_dir / "report/latest/index.html").is_file() and (run_dir / "report/latest/metrics.json").is_file()


def built_and_cached(out: str) -> tuple[set[str], set[str]]:
    """Step names the `clipgen run` summary lists as built, and as cached."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) == 4]
    return {r[1] for r in rows if r[2] == "built"}, {r[1] for r in rows if r[2] == "cached"}


def test_noop_rerun_builds_nothing_and_a_gpt_change_rebuilds_only_downstream(tiny_run, tmp_path):
    cfg = copy_run(tiny_run, tmp_path / "run", ("shards", "judge", "toyclip", "embeddings", "vqgan", "tokens", "gpt"))
    args = ["run", str(cfg.run_path / "pipeline.yaml"), "--set", f"run_dir={cfg.run_path}",
            "--set", "eval.images_per_prompt=1"]
    built, cached = built_and_cached(clipgen(tmp_path, *args))
    assert built == {"samples", "report"} and len(cached) == 7
    built, cached = built_and_cached(clipgen(tmp_path, *args))
    assert built == set() and len(cached) == 9  # nothing changed: nothing recomputed

    status = clipgen(tmp_path, "status", str(cfg.run_path), "--set", "eval.images_per_prompt=1")
    ids = {name: art.id for name, art in plan(load_config(cfg.run_path / "pipeline.yaml",
                                                          [f"run_dir={cfg.run_path}"])).items()}
    for name, sid in ids.items():
        assert any(name in line and sid in line and "cached" in line for line in status.splitlines()), (name, status)

    built, cached = built_and_cached(clipgen(tmp_path, *args, "--set", "gpt.lr=0.002"))
    assert built == {"gpt", "samples", "report"}
    assert cached == {"shards", "judge", "toyclip", "embeddings", "vqgan", "tokens"}


def test_pipelines_differing_only_in_transformer_settings_share_the_caches(tiny_run):
    base = plan(tiny_run)
    other = plan(load_config("pipelines/shapes.yaml", [f"run_dir={tiny_run.run_path}", "gpt.n_layer=2", "gpt.lr=1e-4",
                                                       "sample.cfg_scale=3", *TINY_RUN]))
    for name in ("shards", "judge", "toyclip", "embeddings", "vqgan", "tokens"):
        assert other[name].path == base[name].path, name
    for name in ("gpt", "samples", "report"):
        assert other[name].path != base[name].path, name


def test_prefect_yaml_declares_full_shapes_and_one_deployment_per_stage():
    import yaml

    from clipgen.pipeline import STAGES

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"full", "shapes", *STAGES}
    assert all(d["entrypoint"] == "flows/pipeline.py:clip_gen" for d in deployments.values())
    assert {"pipeline", "overrides"} <= set(deployments["full"]["parameters"])
    assert all(deployments[s]["parameters"]["stages"] == s for s in STAGES)
    text = (ROOT / "prefect.yaml").read_text().lower()
    assert not any(word in text for word in ("password", "secret:", "token:", "api_key"))

"""The real entry point: `clipgen run` drives the Prefect clip-gen flow (ephemeral mode) at a tiny size."""

import json
import os
import subprocess
import sys

from conftest import ROOT, clipgen

from clipgen.pipeline import STAGES
from flows.pipeline import STAGE_FLOWS

TINY = ["data.world.n_captioned=40", "data.world.n_train=60", "data.world.n_heldout=30", "data.world.n_judge=256",
        "data.judge.steps=5", "data.judge.batch_size=32", "data.shard_size=25"]


def test_every_stage_has_a_flow():
    assert list(STAGE_FLOWS) == list(STAGES)


def test_run_builds_then_skips_and_reports_status(tmp_path):
    args = ["--set", f"run_dir={tmp_path / 'run'}", *sum((["--set", o] for o in TINY), [])]
    first = clipgen(tmp_path, "run", "pipelines/shapes.yaml", "--stages", "ingest", *args)
    assert "shards     built" in first and "judge      built" in first
    manifest = json.loads(next((tmp_path / "run/shards").glob("*/manifest.json")).read_text())
    assert manifest["counts"] == {"captioned": 40, "train": 60, "heldout": 30}
    assert (tmp_path / "run/pipeline.yaml").is_file()
    second = clipgen(tmp_path, "run", "pipelines/shapes.yaml", "--stages", "ingest", *args, logs=True)
    assert "shards     cached" in second and "judge      cached" in second
    assert "nothing to run, Prefect not started" in second and "temporary server" not in second
    next((tmp_path / "run/shards").glob("*/train/00001.tar")).unlink()  # a damaged run is not a no-op
    third = clipgen(tmp_path, "run", "pipelines/shapes.yaml", "--stages", "ingest", *args, logs=True)
    assert "shards     built" in third and "judge      cached" in third and "temporary server" in third
    assert json.loads(next((tmp_path / "run/shards").glob("*/manifest.json")).read_text()) == manifest
    status = clipgen(tmp_path, "status", str(tmp_path / "run"))
    assert status.count("cached") == 2


def test_bad_config_fails_before_any_work(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    out = subprocess.run([sys.executable, "-m", "clipgen.cli", "run", "pipelines/shapes.yaml", "--set",
                          "gpt.n_layers=3", "--set", f"run_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'n_layer'" in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "prefect").exists()


def test_evaluate_cli_builds_the_report_and_publishes_prefect_artifacts(tiny_run, tmp_path):
    """`clipgen evaluate --run RUN` runs only the evaluate flow; its table and link land in Prefect's database."""
    import dataclasses

    from clipgen.pipeline import plan, save_run_config

    cfg = dataclasses.replace(tiny_run, eval=dataclasses.replace(tiny_run.eval, images_per_prompt=1))
    save_run_config(cfg)
    before = {name: art.is_complete() for name, art in plan(cfg).items()}
    out = clipgen(tmp_path, "evaluate", "--run", str(cfg.run_path))
    assert "evaluate       report     built" in out and "CLIP R-precision" in out
    assert (cfg.run_path / "report/latest/index.html").is_file()
    after = {name: art.is_complete() for name, art in plan(cfg).items()}
    assert {k for k in after if after[k] != before[k]} == {"report"}  # nothing else was built

    script = ("import asyncio\nfrom prefect.client.orchestration import get_client\n"
              "async def main():\n    async with get_client() as c:\n"
              "        for a in await c.read_artifacts(): print(a.key, a.type)\nasyncio.run(main())\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": ""}
    listed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "clipgen-metrics table" in listed.stdout and "clipgen-report markdown" in listed.stdout, listed.stderr[-2000:]
    again = clipgen(tmp_path, "evaluate", "--run", str(cfg.run_path))
    assert "evaluate       report     cached" in again

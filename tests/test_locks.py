"""One builder per artifact: a second run waits for the first and reuses its work; a killed holder's lock is
taken over; with ``orchestration.wait_for_locks=false`` the second run fails at once and names the holder."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN, cli_env, clipgen

from clipgen.artifacts import Artifact, ArtifactBusy, artifact_lock, run_cached
from clipgen.config import load_config
from clipgen.pipeline import plan

HOLD = "import sys, time\nfrom pathlib import Path\nfrom clipgen.artifacts import Artifact, artifact_lock\n" \
       "with artifact_lock(Artifact(Path(sys.argv[1]), 'things', 'abc')):\n    print('held', flush=True)\n" \
       "    time.sleep(60)\n"


def hold_in_another_process(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_builder_fails_at_once_naming_the_holder_when_asked_not_to_wait(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(ArtifactBusy, match=f"pid {holder.pid} on "):
            run_cached(Artifact(tmp_path, "things", "abc"), lambda out: {"n": 1}, stage="things", wait=False)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    holder = hold_in_another_process(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    art = Artifact(tmp_path, "things", "abc")
    with caplog.at_level(logging.INFO, logger="clipgen"):
        assert run_cached(art, lambda out: {"n": 1}, stage="things", wait=False)["cached"] is False
    assert f"taking over from pid {holder.pid}" in caplog.text


def test_a_waiting_run_reuses_what_the_holder_built(tmp_path):
    art = Artifact(tmp_path, "things", "abc")
    builds = []
    started = threading.Event()

    def slow_build(out: Path) -> dict:
        started.set()
        time.sleep(0.5)
        builds.append(out)
        return {"n": len(builds)}

    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(run_cached(art, slow_build, stage="things")))
    thread.start()
    started.wait(5)
    with pytest.raises(ArtifactBusy):  # the lock is held while the first build runs
        with artifact_lock(art, wait=False):
            pass
    second = run_cached(art, slow_build, stage="things")  # blocks until the first build is done
    thread.join()
    assert len(builds) == 1 and first["cached"] is False and second["cached"] is True
    assert first["n"] == second["n"] == 1


def _run(tmp_path: Path, tag: str, stage: str, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
    env = cli_env(tmp_path / f"prefect-{tag}")
    sets = [a for o in overrides for a in ("--set", o)]
    log = tmp_path / f"{tag}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "clipgen.cli", "run", "pipelines/shapes.yaml", "--stages",
                                 stage, *sets], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(condition, procs, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "a run ended or hung first"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("stage,step", [("ingest", "shards"), ("train-vqgan", "vqgan")])
def test_two_runs_of_one_stage_build_it_once_and_agree(tmp_path, stage, step):
    """Both runs start while the test holds the artifact's lock (Prefect's start-up takes longer than the
    build, so an unheld race would rarely overlap). On release one run builds; the other waits for it too."""
    overrides = [*TINY_RUN, f"run_dir={tmp_path / 'run'}"]
    if stage != "ingest":
        clipgen(tmp_path, "run", "pipelines/shapes.yaml", "--stages", "ingest",
                *[a for o in overrides for a in ("--set", o)])
    artifact = plan(load_config("pipelines/shapes.yaml", overrides))[step]
    with artifact_lock(artifact):
        runs = [_run(tmp_path, tag, stage, overrides) for tag in ("a", "b")]
        procs, logs = [p for p, _ in runs], [log for _, log in runs]
        wait_for(lambda: all("being built by pid" in log.read_text() for log in logs), procs)
    for proc in procs:
        assert proc.wait(timeout=600) == 0, "\n=====\n".join(log.read_text()[-3000:] for log in logs)
    outs = [log.read_text() for log in logs]
    built = [out for out in outs if f"{step}: building" in out]
    [waited] = [out for out in outs if f"{step}: built by another run, reusing" in out]
    assert len(built) == 1 and waited is not built[0]
    assert artifact.is_complete()
    rows = [next(ln.split() for ln in out.splitlines() if ln.strip().startswith(f"{stage} ")) for out in (built[0], waited)]
    assert rows == [[stage, step, "built", str(artifact.path)], [stage, step, "cached", str(artifact.path)]]
    if step == "vqgan":  # each step trained and logged once
        steps = [ln for ln in (artifact.path / "metrics.jsonl").read_text().splitlines() if '"step"' in ln]
        assert steps and len(steps) == len(set(steps))

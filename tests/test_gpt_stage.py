"""The train-gpt step at a tiny size through the library: build, skip, retrain on gpt.*, language-free."""

import io
import json
import shutil
import tarfile

import pytest
import torch
from conftest import TINY_RUN as TINY

from clipgen.config import load_config
from clipgen.models.gpt import load_gpt
from clipgen.pipeline import plan, run_step
from clipgen.train import loop

CACHES = ("shards", "toyclip", "embeddings", "vqgan", "tokens")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_trains_from_the_caches(run):
    art = plan(run)["gpt"]
    summary = art.summary()
    assert summary["step"] == 4 and summary["data"] == {"pairs": 48, "only_embedding": 0, "only_tokens": 0}
    model = load_gpt(art.path)
    assert model.shape.n_tokens == 64 and model.shape.cond_dim == plan(run)["embeddings"].summary()["embed_dim"]
    assert len((art.path / "metrics.jsonl").read_text().splitlines()) == 2


def test_rerun_skips_and_a_gpt_key_retrains_leaving_the_caches_alone(run):
    assert run_step(run, "gpt")["cached"] is True
    changed = load_config("pipelines/shapes.yaml", [*TINY, "gpt.lr=1e-3", f"run_dir={run.run_path}"])
    before, after = plan(run), plan(changed)
    assert all(before[name].id == after[name].id for name in CACHES)
    assert after["gpt"].id != before["gpt"].id and not after["gpt"].is_complete()
    stamps = {name: before[name].marker.stat().st_mtime_ns for name in CACHES}
    assert run_step(changed, "gpt")["cached"] is False
    assert {name: plan(changed)[name].marker.stat().st_mtime_ns for name in CACHES} == stamps


def test_training_without_any_caption_gives_the_same_model(run, tmp_path, monkeypatch):
    """Copy the shards with captions stripped from every sample, rebuild the caches and the transformer."""
    # the twin trains with the thread count the fixture's run had: with another count (other processes
    # busy) bf16 matmuls may round differently, which has nothing to do with captions
    monkeypatch.setattr(loop, "free_cpu_threads", lambda: plan(run)["gpt"].summary()["cpu_threads"])
    shards = plan(run)["shards"].path
    twin = tmp_path / "run"
    copy = twin / shards.relative_to(run.run_path)
    shutil.copytree(shards, copy)
    for tar_path in copy.glob("*/*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    data = json.dumps({k: v for k, v in meta.items() if k != "caption"}).encode()
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    for name in ("toyclip", "judge"):  # the CLIP is given (pretrained elsewhere); the judge only measures
        src = plan(run)[name].path
        shutil.copytree(src, twin / src.relative_to(run.run_path))
    twin_cfg = load_config("pipelines/shapes.yaml", [*TINY, f"run_dir={twin}"])
    for step in ("embeddings", "vqgan", "tokens", "gpt"):
        run_step(twin_cfg, step)
    a, b = load_gpt(plan(run)["gpt"].path).state_dict(), load_gpt(plan(twin_cfg)["gpt"].path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

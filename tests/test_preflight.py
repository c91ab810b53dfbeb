"""Every config that would fail in a later stage fails at start: one line naming the key, no traceback, and
no stage folder written. Runs through the CLI (``main``) with the flow replaced by a tripwire."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipgen import cli
from clipgen.config import load_config
from clipgen.pipeline import save_run_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
SHAPES = ROOT / "pipelines" / "shapes.yaml"


@pytest.fixture
def in_empty_folder(tmp_path, monkeypatch):
    """cwd is an empty folder (relative run and data paths land there); the flow must never be reached."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def tripwire(*args, **kwargs):
        raise AssertionError("the config check let this run reach the flow")

    monkeypatch.setattr(cli, "run_flow", tripwire)
    return tmp_path


def fails_at_start(capsys, folder: Path, argv: list[str], key: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clipgen: error: {key}") or f" {key}" in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in folder.iterdir() if p.name == "data"), \
        f"the failed check left {list(folder.iterdir())}"
    return err


def write_file(folder: Path, name: str, text: str = "") -> str:
    (folder / "data").mkdir(exist_ok=True)
    path = folder / "data" / name
    path.write_text(text)
    return str(path)


CASES = {  # id: (overrides, or a function of the tmp folder giving them; the key the message names)
    "zero heads": (["gpt.n_head=0"], "gpt.n_head"),
    "zero checkpoint interval": (["train.ckpt_every=0"], "train.ckpt_every"),
    "zero accumulation": (["train.grad_accum=0"], "train.grad_accum"),
    "negative layers": (["gpt.n_layer=-3"], "gpt.n_layer"),
    "negative lr": (["gpt.lr=-1e-4"], "gpt.lr"),
    "negative vqgan lr": (["vqgan.lr=0"], "vqgan.lr"),
    "dropout above 1": (["gpt.dropout=1.5"], "gpt.dropout"),
    "zero grad clip": (["gpt.grad_clip=0"], "gpt.grad_clip"),
    "batch not divisible": (["train.grad_accum=3"], "vqgan.batch_size"),
    "name leaves runs/": (["name=../../escape"], "name"),
    "name is a path": (["name=a/b"], "name"),
    "zero temperature": (["sample.temperature=0"], "sample.temperature"),
    "zero top-p": (["sample.top_p=0"], "sample.top_p"),
    "negative re-rank prompt weight": (["sample.rerank_prompt_weight=-1"], "sample.rerank_prompt_weight"),
    "negative re-rank prompt margin": (["sample.rerank_prompt_margin=-0.1"], "sample.rerank_prompt_margin"),
    "no images per prompt": (["eval.images_per_prompt=0"], "eval.images_per_prompt"),
    "missing folder": (lambda t: ["data.source=folder", f"data.path={t}/nothing-here"], "data.path"),
    "folder is a file": (lambda t: ["data.source=folder", f"data.path={write_file(t, 'x.jpg')}"], "data.path"),
    "URL list of unknown type": (lambda t: ["data.source=urls", f"data.path={write_file(t, 'urls.txt')}"], "data.path"),
    "URL list without the url column": (
        lambda t: ["data.source=urls", f"data.path={write_file(t, 'urls.csv', 'link,caption')}"], "data.url_column"),
    "folder without eval prompts": (
        lambda t: ["data.source=folder", f"data.path={write_file(t, 'a.png') and t / 'data'}", "sample.prompts=[]"],
        "eval.prompts"),
    "captions protocol on uncaptioned images": (
        lambda t: ["data.source=folder", f"data.path={write_file(t, 'a.png') and t / 'data'}", "eval.protocol=captions"],
        "eval.protocol"),
    "captions protocol with too few captions": (["eval.protocol=captions", "eval.captions=3"], "eval.captions"),
    "unknown evaluation protocol": (["eval.protocol=coco"], "eval.protocol"),
    "too few evaluation images for FD": (["eval.prompts=[a dog, a cat]", "eval.images_per_prompt=1"],
                                         "eval.images_per_prompt"),
    "missing CLIP file": (lambda t: [f"clip.pretrained={t}/clip.safetensors"], "clip.pretrained"),
    "uncached CLIP tag offline": (["clip.model=ViT-B-32", "clip.pretrained=openai"], "clip.pretrained"),
    "unknown CLIP": (["clip.model=ViT-Q-99"], "clip.model"),
    "unknown scoring CLIP": (["eval.scoring_clip=ViT-Q-99"], "eval.scoring_clip"),
    "missing scoring CLIP file": (lambda t: ["eval.scoring_clip=toy-clip", f"eval.scoring_clip_pretrained={t}/s.pt"],
                                  "eval.scoring_clip_pretrained"),
    "missing LPIPS weights": (lambda t: ["vqgan.perceptual=lpips", f"vqgan.lpips_weights={t}/vgg"],
                              "vqgan.lpips_weights"),
    "missing Inception weights": (lambda t: [f"eval.inception_weights={t}/inception.pth"], "eval.inception_weights"),
    "more devices than this machine has": (["train.devices=4096", "gpt.batch_size=4096", "vqgan.batch_size=4096"],
                                           "train.devices"),
}


@pytest.mark.parametrize("overrides,key", CASES.values(), ids=CASES.keys())
def test_a_config_that_would_fail_later_fails_at_start(in_empty_folder, capsys, overrides, key):
    overrides = overrides(in_empty_folder) if callable(overrides) else overrides
    argv = ["run", str(SHAPES), *[a for o in overrides for a in ("--set", o)]]
    fails_at_start(capsys, in_empty_folder, argv, key)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_each_shipped_pipeline_is_checked_before_its_first_stage(in_empty_folder, capsys, path):
    """Shipped as they are, shapes passes the check (its flow is reached) and the folder and imagenet files stop
    on their data path, which is not on this machine; each also stops on a bad value."""
    cfg = load_config(path)
    if cfg.data.source == "world":
        with pytest.raises(AssertionError, match="reach the flow"):
            cli.main(["run", str(path)])
    else:
        fails_at_start(capsys, in_empty_folder, ["run", str(path)], "data.path")
    fails_at_start(capsys, in_empty_folder, ["run", str(path), "--set", "gpt.n_head=0"], "gpt.n_head")


def test_a_folder_run_may_take_its_evaluation_prompts_from_sample_prompts(in_empty_folder):
    folder = Path(write_file(in_empty_folder, "a.png")).parent
    with pytest.raises(AssertionError, match="reach the flow"):
        cli.main(["run", str(SHAPES), "--set", "data.source=folder", "--set", f"data.path={folder}",
                  "--set", "sample.prompts=[a dog]"])


def test_debug_shows_the_traceback(in_empty_folder):
    with pytest.raises(Exception, match="gpt.n_head"):
        cli.main(["run", str(SHAPES), "--set", "gpt.n_head=0", "--debug"])


@pytest.fixture
def saved_run(tmp_path, monkeypatch):
    """A run folder holding only its pipeline.yaml; loading its models must never be reached."""
    cfg = load_config(SHAPES, [f"run_dir={tmp_path / 'run'}"])
    save_run_config(cfg)

    def tripwire(*args, **kwargs):
        raise AssertionError("the sampling options were not checked before the models load")

    monkeypatch.setattr("clipgen.stages.generate_stage.load_generator", tripwire)
    return cfg.run_path


@pytest.mark.parametrize("options,flag", [(["--temperature", "0"], "--temperature"), (["--top-p", "0"], "--top-p"),
                                          (["--top-p", "1.5"], "--top-p"), (["-n", "0"], "-n"),
                                          (["--rerank", "-1"], "--rerank"), (["--cfg-scale", "-2"], "--cfg-scale")])
def test_generate_checks_its_options_before_loading_models(saved_run, tmp_path, capsys, options, flag):
    assert cli.main(["generate", "a red circle", "--run", str(saved_run), "--out", str(tmp_path / "o"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clipgen: error: {flag}:") and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_generate_rejects_a_prompt_that_is_not_utf8_before_loading_models(saved_run, tmp_path, capsys):
    prompt = os.fsdecode(b"a red \xff circle")  # what Python makes of undecodable bytes in argv
    assert cli.main(["generate", prompt, "--run", str(saved_run), "--out", str(tmp_path / "o")]) == 2
    assert "prompt 1 is not valid UTF-8" in capsys.readouterr().err


def test_only_the_stages_asked_for_are_checked(in_empty_folder, capsys):
    """Ingest on a download host needs no CLIP weights; the stages that load the CLIP do."""
    offline_tag = ["--set", "clip.model=ViT-B-32", "--set", "clip.pretrained=openai"]
    with pytest.raises(AssertionError, match="reach the flow"):
        cli.main(["run", str(SHAPES), "--stages", "ingest", *offline_tag])
    fails_at_start(capsys, in_empty_folder, ["run", str(SHAPES), "--stages", "ingest,embed", *offline_tag],
                   "clip.pretrained")

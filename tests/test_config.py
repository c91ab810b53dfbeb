"""Config loading: valid files, overrides, presets, and errors that name the key and the fix."""

from pathlib import Path

import pytest

from clipgen.config import ConfigError, load_config, to_dict
from clipgen.presets import PRESETS

PIPELINES = sorted(Path("pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_shapes_defaults_resolve_presets():
    cfg = load_config("pipelines/shapes.yaml")
    assert cfg.gpt.n_layer == PRESETS["gpt"]["tiny"]["n_layer"]
    assert cfg.vqgan.downsample == 4 and cfg.vqgan.codebook_size == 1000
    assert cfg.run_path == Path.cwd() / "runs/shapes" and cfg.run_path.is_absolute()


def test_imagenet_is_real_scale():
    cfg = load_config("pipelines/imagenet.yaml")
    assert (cfg.clip.model, cfg.clip.pretrained) == ("ViT-B-32", "openai")
    assert cfg.data.image_size == 256 and cfg.vqgan.downsample == 16 and cfg.vqgan.codebook_size == 16384
    assert (cfg.gpt.n_layer, cfg.gpt.n_embd, cfg.gpt.n_head) == (24, 1024, 16)


def test_overrides_are_typed_and_beat_presets():
    cfg = load_config("pipelines/shapes.yaml", ["gpt.n_layer=6", "sample.prompts=[a red circle]",
                                                 "gpt.lr=1e-3", "eval.inception_weights=/w.pth"])
    assert cfg.gpt.n_layer == 6 and cfg.gpt.n_embd == 192
    assert cfg.sample.prompts == ["a red circle"] and cfg.gpt.lr == 1e-3
    assert cfg.eval.inception_weights == "/w.pth"


def test_int_is_accepted_for_float():
    assert load_config(None, ["gpt.lr=1"]).gpt.lr == 1.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["gpt.n_layers=4"], "unknown key gpt.n_layers (did you mean 'n_layer'?)"),
        (["gptt.n_layer=4"], "unknown key 'gptt'"),
        (["gpt.n_layer=four"], "gpt.n_layer must be int, got 'four'"),
        (["gpt.n_layer=true"], "gpt.n_layer must be int"),
        (["gpt.preset=tiny2"], "unknown preset gpt.preset = 'tiny2'; choose from ['base', 'mid', 'paper', 'tiny']"),
        (["vqgan.quantizer=kmeans"], "vqgan.quantizer = 'kmeans' is not allowed; choose from ['vq', 'fsq']"),
        (["gpt.n_head=5"], "gpt.n_embd: 192 must be divisible by gpt.n_head=5"),
        (["gpt.rope_2d=true", "gpt.n_head=32"], "gpt.rope_2d: needs a head width (gpt.n_embd / gpt.n_head = 6) divisible by 4"),
        (["vqgan.codebook_size=1024"], "product of vqgan.fsq_levels"),
        (["data.source=folder"], "data.path: required when data.source is 'folder'"),
        (["data.image_size=30"], "multiple of the VQGAN downsampling factor 4"),
        (["sample.top_p=0"], "sample.top_p: must be in (0, 1]"),
        (["sample.knn_shrink=-1"], "sample.knn_shrink: must be >= 0"),
        (["sample.knn_centre_margin=3"], "sample.knn_centre_margin: must be in [0, 2]"),
        (["sample.knn_centre_prior=-1"], "sample.knn_centre_prior: must be >= 0"),
        (["sample.knn_variation=own", "sample.knn_centre_margin=0"], "sample.knn_variation: own needs"),
        (["gpt.steps=0"], "gpt.steps: must be > 0"),
        (["vqgan.perceptual=lpips"], "vqgan.lpips_weights: required"),
        (["data.world.held_out_combos=[red]"], "must be 'COLOUR SHAPE'"),
        (["gpt"], "must look like section.key=value"),
        (["gpt.n_layer.x=1"], "gpt.n_layer must be int"),
        (["name.x=1"], "'name' is a value, not a section"),
    ],
)
def test_errors_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config("pipelines/shapes.yaml", overrides)
    assert expected.replace("'", "") in str(err.value).replace("'", "")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("gpt: {n_layer: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "section.yaml").write_text("gpt: 4\n")
    with pytest.raises(ConfigError, match="gpt: expected a mapping"):
        load_config(tmp_path / "section.yaml")


def test_runtime_only_fields_are_not_part_of_the_output_config():
    cfg = load_config("pipelines/shapes.yaml")
    data = to_dict(cfg.data, output_only=True)
    assert "workers" not in data and "image_size" in data
    assert "workers" in to_dict(cfg.data)
    train = to_dict(cfg.train, output_only=True)  # compiling changes speed, not the model (up to rounding)
    assert "compile" not in train and "precision" in train

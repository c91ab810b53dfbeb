"""The real-shape chain: imagenet.yaml's sizes (256 px, ViT-B-32 at random init, the f16 VQGAN with 16384
codes, the paper's 24-layer transformer) on ~20 real photographs, from ingest through evaluate, with a few
steps per stage. It proves the stages fit together at the shapes a real run uses; the numbers mean nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import clipgen
from PIL import Image

# scikit-image's bundled photographs (no download); its synthetic test patterns are left out
PHOTOS = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
          "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
          "color.png"]
FEW_STEPS = ["clip.pretrained=null", "data.heldout_fraction=0.3", "data.workers=2", "clip.batch_size=8",
             "vqgan.steps=2", "vqgan.batch_size=2", "vqgan.disc_start=0", "gpt.steps=2", "gpt.batch_size=2",
             "gpt.warmup_steps=1", "train.devices=1", "train.precision=fp32", "train.log_every=1", "sample.n_per_prompt=1",
             "sample.rerank_candidates=0", "sample.top_k=100", "eval.images_per_prompt=2",
             "orchestration.max_workers=2"]


# ~7 min on 2 AVX2 cores in fp32 (11.5 min beside another test); with imagenet.yaml's bf16, emulated on such
# CPUs, 2 VQGAN steps alone took 11 min
@pytest.mark.slow
def test_the_imagenet_shapes_run_end_to_end_on_real_photographs(tmp_path):
    skimage = pytest.importorskip("skimage")  # a dev extra: `make install` brings it
    data = Path(skimage.__file__).parent / "data"
    photos = tmp_path / "photos" / "some-class"  # a class sub-folder, as ImageNet has
    photos.mkdir(parents=True)
    for name in PHOTOS:
        shutil.copy(data / name, photos / name)
    sets = [a for o in [f"data.path={photos.parent}", f"run_dir={tmp_path / 'run'}", *FEW_STEPS] for a in ("--set", o)]
    out = clipgen(tmp_path, "run", "pipelines/imagenet.yaml", *sets, timeout=1800)
    assert "report:" in out, out
    metrics = json.loads((tmp_path / "run" / "report" / "latest" / "metrics.json").read_text())
    assert metrics["images_per_set"] == 6 and metrics["reference_images"] >= 1
    assert metrics["prompts"] == ["a photo of a golden retriever", "a red sports car", "a bowl of ramen"]
    assert set(metrics["rows"]) == {"samples", "real images", "VQGAN reconstructions", "random token grids"}
    drawn = sorted((tmp_path / "run" / "samples").glob("*/*.png"))
    assert drawn and all(Image.open(p).size == (256, 256) for p in drawn)
    [manifest] = (tmp_path / "run" / "shards").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["inputs"]["kept"] == len(PHOTOS)

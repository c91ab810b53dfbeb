"""Stage ids follow what is read, not where it lives: a folder's files, weights files and folders, and the
FID reference set's pixels."""

from __future__ import annotations

import os

import numpy as np
from conftest import noise_image

from clipgen.config import load_config
from clipgen.pipeline import plan
from clipgen.stages.evaluate_stage import reference_cache_name


def ids(*overrides: str) -> dict[str, str]:
    return {name: art.id for name, art in plan(load_config("pipelines/shapes.yaml", list(overrides))).items()}


def test_a_folder_source_is_keyed_by_its_files(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        noise_image(i).save(folder / "sub" / f"{i}.png")
    source = ["data.source=folder", f"data.path={folder}", "clip.model=ViT-B-32", "clip.pretrained=null"]
    first = ids(*source)
    assert ids(*source) == first  # nothing changed: every id is reused
    noise_image(9).save(folder / "sub" / "new.png")
    added = ids(*source)
    (folder / "sub" / "0.png").unlink()
    removed = ids(*source)
    os.utime(folder / "sub" / "1.png", ns=(1, 1))  # rewritten in place, same name and size
    touched = ids(*source)
    shard_ids = [first["shards"], added["shards"], removed["shards"], touched["shards"]]
    assert len(set(shard_ids)) == 4
    assert all(a["report"] != b["report"] for a, b in zip([first, added, removed], [added, removed, touched], strict=True))


def test_weights_files_and_folders_are_keyed_by_content(tmp_path):
    weights = tmp_path / "lpips"
    weights.mkdir()
    (weights / "vgg.pth").write_bytes(b"a" * 64)
    scorer = tmp_path / "scorer.pt"
    scorer.write_bytes(b"s" * 64)
    keys = [f"vqgan.lpips_weights={weights}", "eval.scoring_clip=toy-clip", f"eval.scoring_clip_pretrained={scorer}"]
    first = ids(*keys)
    assert ids(*keys) == first
    stat = (weights / "vgg.pth").stat()
    (weights / "vgg.pth").write_bytes(b"b" * 64)  # same size, and the same times: only the bytes differ
    os.utime(weights / "vgg.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed_folder = ids(*keys)
    assert changed_folder["vqgan"] != first["vqgan"] and changed_folder["shards"] == first["shards"]
    scorer.write_bytes(b"t" * 64)
    changed_file = ids(*keys)
    assert changed_file["report"] != changed_folder["report"] and changed_file["vqgan"] == changed_folder["vqgan"]


def test_the_fid_reference_cache_is_named_by_its_pixels():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    name = reference_cache_name(reference)
    assert reference_cache_name(reference.copy()) == name
    assert reference_cache_name(reference[:6]) != name  # a smaller eval.max_reference_images
    other = reference.copy()
    other[3, 0, 0, 0] ^= 1
    assert reference_cache_name(other) != name


def test_a_judge_change_reaches_exactly_the_steps_that_read_the_judge():
    before, after = ids(), ids("data.judge.steps=7")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"judge", "samples", "report"}


def test_status_prints_which_step_reads_which(tmp_path, capsys):
    from clipgen import cli

    assert cli.main(["status", "pipelines/shapes.yaml", "--set", f"run_dir={tmp_path}"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "reads shards, toyclip " in rows["embeddings"] and "reads - " in rows["shards"]
    assert "reads gpt, vqgan, embeddings, toyclip, shards, judge " in rows["samples"]


def test_a_changed_folder_embeds_only_the_shards_whose_files_changed(tmp_path, monkeypatch):
    """After a folder change the new embed artifact links each unchanged shard's embeddings from the run's
    earlier one (the same CLIP and settings) and embeds only the shards whose bytes changed, with the
    embeddings a cold run gives; another setting of the step reuses nothing."""
    import clipgen.stages.clip_stage as clip_stage
    from clipgen.data.shards import read_manifest
    from clipgen.embed import cache_files, read_embeddings
    from clipgen.pipeline import run_step

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(32):
        noise_image(i).save(folder / f"image-{i}.png")
    settings = ["data.source=folder", f"data.path={folder}", "data.shard_size=4", "data.workers=1",
                "data.heldout_fraction=0.25", "clip.model=ViT-B-32", "clip.pretrained=null"]

    def embed(run_dir, *more):
        cfg = load_config("pipelines/shapes.yaml", [*settings, *more, f"run_dir={run_dir}"])
        embedded.clear()
        for step in ("shards", "embeddings"):
            run_step(cfg, step)
        return plan(cfg)

    real = clip_stage.embed_shards
    monkeypatch.setattr(clip_stage, "embed_shards", lambda clip, jobs, *a, **k: embedded.extend(
        f"{out.parent.name}/{out.stem}" for _, out in jobs) or real(clip, jobs, *a, **k))
    embedded: list[str] = []
    before = embed(tmp_path / "run")
    noise_image(100).save(folder / "image-new.png")
    (folder / "image-3.png").unlink()
    noise_image(101).save(folder / "image-7.png")
    after = embed(tmp_path / "run")

    def digests(arts):
        manifest = read_manifest(arts["shards"].path)
        return {info["shard"][:-4]: info["sha256"] for infos in manifest["shards"].values() for info in infos}

    old, new = digests(before), digests(after)
    changed = sorted(name for name, digest in new.items() if digest not in old.values())
    assert 0 < len(changed) < len(new) and sorted(embedded) == changed
    for name in new:
        file = after["embeddings"].path / f"{name}.parquet"
        linked = file.stat().st_ino == (before["embeddings"].path / f"{name}.parquet").stat().st_ino
        assert linked == (name not in changed), name
    cold = embed(tmp_path / "cold")
    for split in ("train", "heldout"):
        got, want = (read_embeddings(cache_files(arts["embeddings"].path, split)) for arts in (after, cold))
        assert got.keys == want.keys and np.array_equal(got.vectors, want.vectors)
    embed(tmp_path / "run", "clip.ivfpq_min_size=100000")
    assert len(embedded) == len(new)

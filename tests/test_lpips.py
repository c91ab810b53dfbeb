"""Our LPIPS-VGG against the reference ``lpips`` package, from both weight layouts, offline."""

import pytest
import torch
import torchvision

from clipgen.models.lpips import load_lpips

lpips = pytest.importorskip("lpips", reason="the reference LPIPS comes with the dev extra")


@pytest.fixture(scope="module")
def reference():
    """lpips.LPIPS(net='vgg') with its real v0.1 heads (shipped in the package) and a seeded random VGG."""
    torch.manual_seed(0)
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()  # pnet_rand: no VGG download
    return net


def images(seed, n=3, size=48):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_full_state_dict_matches_the_reference(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "lpips_vgg.pth")
    ours = load_lpips(tmp_path / "lpips_vgg.pth")
    x, y = images(1), images(2)
    expected = reference(x, y).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-4, atol=1e-6)
    assert ours(x, x).abs().max() < 1e-6
    assert (expected > 0).all()


def test_torchvision_backbone_plus_heads_folder_matches_the_reference(reference, tmp_path):
    vgg = torchvision.models.vgg16(weights=None)
    state = reference.state_dict()
    for key, value in state.items():  # lpips keeps torchvision's layer indices: net.sliceK.I.* = features.I.*
        if key.startswith("net.slice"):
            vgg.features[int(key.split(".")[2])].get_parameter(key.split(".")[3]).data.copy_(value)
    torch.save(vgg.state_dict(), tmp_path / "vgg16-397923af.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    ours = load_lpips(tmp_path)
    x, y = images(3), images(4)
    assert torch.allclose(ours(x, y), reference(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_input_but_not_the_weights(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    ours = load_lpips(tmp_path / "w.pth")
    x = images(5).requires_grad_()
    ours(x, images(6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in ours.parameters())


def test_missing_or_wrong_weights_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="vqgan.lpips_weights.*perceptual: none"):
        load_lpips(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="has none of"):
        load_lpips(tmp_path)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not LPIPS-VGG weights"):
        load_lpips(tmp_path / "other.pth")


def test_vqgan_fit_trains_with_the_perceptual_term(reference, tmp_path):
    import json

    import numpy as np

    from clipgen.config import TrainConfig, VQGANConfig
    from clipgen.train.vqgan_trainer import fit

    torch.save(reference.state_dict(), tmp_path / "lpips.pth")
    cfg = VQGANConfig(base_channels=8, channel_mult=[1, 2], n_res_blocks=1, quantizer="fsq", fsq_levels=[5, 4, 2],
                      codebook_size=40, code_dim=4, steps=2, batch_size=4, perceptual="lpips",
                      lpips_weights=str(tmp_path / "lpips.pth"))
    data = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    fit(cfg, TrainConfig(log_every=1), data, tmp_path / "run", progress=False, cpu_threads=1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["lpips"] > 0 for r in records)

"""Quantizers: shapes, the indices_to_codes inverse, straight-through gradients, VQ codebook health."""

import pytest
import torch

from clipgen.config import VQGANConfig
from clipgen.models.quantizer import FSQ, CodebookUsage, VectorQuantizer, build_quantizer, codebook_stats


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "fsq":
        return FSQ(dim=16, levels=[8, 5, 5, 5])
    return VectorQuantizer(dim=16, codebook_size=64, code_dim=4)


@pytest.mark.parametrize("kind", ["fsq", "vq"])
def test_shapes_and_index_range(kind):
    q = make(kind).train()
    z = torch.randn(3, 16, 5, 7)
    z_q, indices, loss = q(z)
    assert z_q.shape == (3, 16, 5, 7) and z_q.dtype == torch.float32
    assert indices.shape == (3, 5, 7) and indices.dtype == torch.int64
    assert loss.shape == () and torch.isfinite(loss)
    assert 0 <= int(indices.min()) and int(indices.max()) < q.codebook_size


@pytest.mark.parametrize("kind", ["fsq", "vq"])
def test_indices_to_codes_inverts_forward(kind):
    q = make(kind)
    q.train()(torch.randn(4, 16, 6, 6))  # VQ: initialise the codebook from data first
    q.eval()
    z_q, indices, _ = q(torch.randn(2, 16, 4, 4))
    assert torch.allclose(q.indices_to_codes(indices), z_q, atol=1e-5)


def test_fsq_indices_and_codes_are_a_bijection():
    q = FSQ(dim=4, levels=[3, 4, 2])
    every = torch.arange(q.codebook_size).view(1, 4, 6)  # all 24 indices
    codes = q.indices_to_normalised(every)  # [1, 3, 4, 6]
    assert torch.equal(q.codes_to_indices(codes), every)
    assert len({tuple(c) for c in codes.flatten(2)[0].t().tolist()}) == q.codebook_size
    assert codes.min() >= -1 and codes.max() <= 1


@pytest.mark.parametrize("kind", ["fsq", "vq"])
def test_gradients_pass_the_straight_through_path(kind):
    q = make(kind).train()
    encoder = torch.nn.Conv2d(3, 16, 1)
    z = encoder(torch.randn(2, 3, 4, 4))
    z_q, _, loss = q(z)
    (z_q.square().mean() + loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert q.in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["fsq", "vq"])
def test_quantizer_maths_stays_fp32_under_autocast(kind):
    q = make(kind).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, _, loss = q(torch.randn(2, 16, 3, 3).bfloat16())
    assert z_q.dtype == torch.float32 and loss.dtype == torch.float32


def test_vq_initialises_from_data_and_restarts_dead_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(dim=8, codebook_size=32, code_dim=4, dead_threshold=0.1).train()
    q(torch.randn(8, 8, 8, 8))
    assert bool(q.initialised)
    # a code no vector is near: after its EMA count decays below the threshold it must be restarted
    q.codebook[0] = -q.codebook[1:].mean(0).sign() * 0.5
    q.ema_count[0] = 0.0
    before = q.codebook[0].clone()
    q(torch.randn(8, 8, 8, 8))
    assert not torch.equal(q.codebook[0], before)
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(32), atol=1e-4)


def test_vq_uses_most_codes_on_spread_data():
    torch.manual_seed(0)
    q = VectorQuantizer(dim=8, codebook_size=64, code_dim=4).train()
    usage = CodebookUsage(64, window=10)
    for _ in range(20):
        usage.update(q(torch.randn(16, 8, 8, 8)).indices)
    used, perplexity = usage.stats()
    assert used > 0.9 and perplexity > 32


def test_codebook_stats():
    assert codebook_stats(torch.tensor([5.0, 5.0, 0.0, 0.0])) == pytest.approx((0.5, 2.0))
    assert codebook_stats(torch.zeros(3)) == (0.0, 0.0)


def test_build_quantizer_checks_fsq_codebook_size():
    with pytest.raises(ValueError, match="product of vqgan.fsq_levels"):
        build_quantizer(VQGANConfig(quantizer="fsq", fsq_levels=[4, 4], codebook_size=1000), dim=8)
    assert build_quantizer(VQGANConfig(quantizer="vq", codebook_size=16, code_dim=4), 8).codebook_size == 16

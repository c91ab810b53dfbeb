"""The conditional transformer: causality, KV-cache parity, guidance plumbing, sampling filters."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clipgen.models.gpt import GPT, GPTShape, bridge
from clipgen.sample import Sampling, filter_logits, sample_tokens, sample_tokens_uncached

SHAPE = GPTShape(vocab_size=50, n_tokens=16, cond_dim=16, n_layer=2, n_head=4, n_embd=32, n_prefix=3)
VARIANTS = {"cond-on-tokens": {}, "prefix-only": {"add_cond_to_tokens": False}, "rope-2d": {"rope_2d": True}}


@pytest.fixture(params=list(VARIANTS))
def model(request):
    torch.manual_seed(0)
    return GPT(dataclasses.replace(SHAPE, **VARIANTS[request.param])).eval()


def batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = F.normalize(torch.randn(b, SHAPE.cond_dim, generator=g), dim=-1)
    return cond, torch.randint(0, SHAPE.vocab_size, (b, SHAPE.n_tokens), generator=g)


def test_logits_depend_only_on_earlier_tokens(model):
    cond, tokens = batch()
    base = model(cond, tokens)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % SHAPE.vocab_size
    after = model(cond, changed)
    assert torch.allclose(base[:, :8], after[:, :8], atol=1e-6)  # logits for t_0..t_7 never see t_7
    assert not torch.allclose(base[:, 8:], after[:, 8:], atol=1e-4)
    assert not torch.allclose(model(-cond, tokens)[:, 0], base[:, 0], atol=1e-4)  # the condition matters


def test_prefill_then_decode_matches_one_full_forward(model):
    cond, tokens = batch()
    full = model(cond, tokens)
    cache = model.new_cache(len(cond))
    stepped = [model.prefill(cond, cache)]
    for i in range(SHAPE.n_tokens - 1):
        stepped.append(model.decode(tokens[:, i:i + 1], cache))
    assert torch.allclose(torch.stack(stepped, 1), full, atol=1e-5)
    # several tokens at once after the prefix (chunked prefill) agree too
    cache = model.new_cache(len(cond))
    model.prefill(cond, cache)
    chunk = model.decode(tokens[:, :5], cache)
    assert torch.allclose(chunk, full[:, 5], atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_and_reference_loops_agree_under_greedy_decoding(model, cfg_scale):
    cond, _ = batch(4)
    s = Sampling(greedy=True, cfg_scale=cfg_scale)
    assert torch.equal(sample_tokens(model, cond, s), sample_tokens_uncached(model, cond, s))


def test_sampling_is_seeded(model):
    cond, _ = batch(4)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, cfg_scale=2.0)
    a = sample_tokens(model, cond, s, torch.Generator().manual_seed(7))
    b = sample_tokens(model, cond, s, torch.Generator().manual_seed(7))
    c = sample_tokens(model, cond, s, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, SHAPE.n_tokens) and int(a.max()) < SHAPE.vocab_size


def test_filters_keep_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.5)).tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError):
        Sampling(temperature=0)


def test_condition_dropout_uses_the_learned_null(model):
    cond, _ = batch(4)
    dropped = model.condition(cond, torch.tensor([True, False, True, False]))
    assert torch.equal(dropped[0], model.null_cond) and torch.equal(dropped[1], cond[1])


def test_noise_bridge_stays_on_the_sphere_near_the_input():
    cond, _ = batch(64)
    assert bridge(cond, "none", 0.5) is cond
    noisy = bridge(cond, "noise", 0.3, torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(64), atol=1e-5)
    cos = (noisy * cond).sum(-1)
    assert 0.9 < cos.mean() < 0.99  # 1 / sqrt(1 + 0.3^2) = 0.958 for a near-orthogonal noise direction


def test_static_single_token_step_matches_decode(model):
    """The CUDA-graph-ready step (fixed shapes, position on the device) gives decode's logits."""
    cond, tokens = batch()
    cache, static = model.new_cache(len(cond)), model.new_cache(len(cond))
    model.prefill(cond, cache)
    model.prefill(cond, static)
    static.position.fill_(static.length)
    for i in range(SHAPE.n_tokens - 1):
        expected = model.decode(tokens[:, i:i + 1], cache)
        got = model.decode_static(tokens[:, i:i + 1], static)
        static.position.add_(1)
        assert torch.allclose(got, expected, atol=1e-5), i


def test_written_out_attention_matches_the_fused_kernel():
    from clipgen.models.gpt import written_out_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 11, 8, generator=g, requires_grad=True) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mine = written_out_attention(q, k, v, dropout=0.0, causal=True)
    assert torch.allclose(mine, fused, atol=1e-6)
    grads = torch.autograd.grad(mine.square().sum(), (q, k, v))
    fused_grads = torch.autograd.grad(fused.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, fused_grads, strict=True))
    changed = v.detach().clone()
    changed[:, :, 5:] += 1.0  # later values never reach earlier outputs
    assert torch.allclose(written_out_attention(q, k, changed, 0.0, causal=True)[:, :, :5], mine[:, :, :5])
    # one new query over every cached key (a sampling step): no mask
    one = written_out_attention(q[:, :, -1:], k, v, dropout=0.0, causal=False)
    assert torch.allclose(one, F.scaled_dot_product_attention(q[:, :, -1:], k, v), atol=1e-6)


def test_cpu_attention_is_written_out_where_the_fused_kernel_is_slow(model, monkeypatch):
    """Under bf16 autocast the training forward, and in fp32 each single-token sampling step, attend through
    written_out_attention, and stay close to the fused kernel's results."""
    import clipgen.models.gpt as gpt_module

    cond, tokens = batch()
    reference = model(cond, tokens)
    calls = []
    original = gpt_module.written_out_attention
    monkeypatch.setattr(gpt_module, "written_out_attention", lambda *a: calls.append(a[-1]) or original(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(cond, tokens).float()
    assert calls == [True] * SHAPE.n_layer
    assert (low.softmax(-1) - reference.softmax(-1)).abs().max() < 0.02

    calls.clear()
    cache = model.new_cache(len(cond))
    model.prefill(cond, cache)  # the prefix: the fused causal kernel in fp32
    assert calls == []
    for i in range(3):
        stepped = model.decode(tokens[:, i:i + 1], cache)
        assert torch.allclose(stepped, model.next_logits_uncached(cond, tokens[:, :i + 1]), atol=1e-5)
    assert calls == [False] * 3 * SHAPE.n_layer


def test_2d_rotary_positions_depend_on_the_grid_offset_only():
    """Rotated queries and keys score by their 2-D offset: the same pair of vectors one row apart scores
    the same anywhere in the grid, and differently from a pair one column apart."""
    from clipgen.models.gpt import grid_rotation, rotate

    shape = dataclasses.replace(SHAPE, rope_2d=True)
    cos, sin = grid_rotation(shape)
    head = shape.n_embd // shape.n_head
    assert cos.shape == (shape.seq_len, head)
    assert torch.equal(cos[:shape.n_prefix], torch.ones(shape.n_prefix, head))  # the prefix does not turn
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head, generator=g), torch.randn(1, 1, 1, head, generator=g)

    def score(query_token: int, key_token: int) -> float:
        at = lambda x, i: rotate(x, cos[shape.n_prefix + i][None], sin[shape.n_prefix + i][None])  # noqa: E731
        return float((at(q, query_token) * at(k, key_token)).sum())

    side = 4
    one_row_down = [score(i + side, i) for i in (0, 1, 5, 10)]
    assert max(one_row_down) - min(one_row_down) < 1e-5
    assert abs(score(1, 0) - one_row_down[0]) > 1e-3  # one column over is not one row down
    assert abs(float((rotate(q, cos[5:6], sin[5:6])).norm()) - float(q.norm())) < 1e-5  # a rotation


def test_2d_rotary_positions_need_a_square_grid():
    with pytest.raises(ValueError, match="square token grid"):
        GPT(dataclasses.replace(SHAPE, n_tokens=12, rope_2d=True))

"""Static-step sampling (clipgen.sample_graphed), run eagerly on CPU: every way a step reads the KV cache
gives the reference loop's tokens, seeded draws equal the plain loop's, and kept samplers stay current.
The same code under CUDA graphs is checked in tests/test_gpu.py."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipgen.models.gpt import GPT, GPTShape
from clipgen.sample import Sampling, pick_with_noise, probabilities, sample_tokens, sample_tokens_uncached
from clipgen.sample_graphed import sample_tokens_graphed

ROOT = Path(__file__).resolve().parents[1]
SHAPE = GPTShape(vocab_size=50, n_tokens=12, cond_dim=16, n_layer=2, n_head=4, n_embd=32, n_prefix=3)
# (attention, bucket): a bucket smaller than, equal to a fraction of, and larger than the sequence (14)
READS = [("bucket", 4), ("bucket", 5), ("bucket", 64), ("exact", 1)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(SHAPE).eval()


def test_2d_rotary_positions_read_on_the_device_give_the_reference_tokens():
    torch.manual_seed(0)
    rope = GPT(dataclasses.replace(SHAPE, n_tokens=16, rope_2d=True)).eval()
    s, cond = Sampling(greedy=True, cfg_scale=2.0), conditions()
    for attention, bucket in (READS[0], READS[-1]):
        got = sample_tokens_graphed(rope, cond, s, attention=attention, bucket=bucket, graphs=False)
        assert torch.equal(got, sample_tokens_uncached(rope, cond, s))


def conditions(b=4, seed=1):
    return F.normalize(torch.randn(b, SHAPE.cond_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize(("attention", "bucket"), READS)
def test_every_cache_read_gives_the_reference_tokens_under_greedy_decoding(model, attention, bucket, cfg_scale):
    s, cond = Sampling(greedy=True, cfg_scale=cfg_scale), conditions()
    got = sample_tokens_graphed(model, cond, s, attention=attention, bucket=bucket, graphs=False)
    assert torch.equal(got, sample_tokens_uncached(model, cond, s))


@pytest.mark.parametrize(("attention", "bucket"), READS)
def test_seeded_draws_equal_the_plain_loops(model, attention, bucket):
    s, cond = Sampling(temperature=1.3, top_k=20, top_p=0.9, cfg_scale=2.0), conditions()
    plain = sample_tokens(model, cond, s, torch.Generator().manual_seed(5))
    got = sample_tokens_graphed(model, cond, s, torch.Generator().manual_seed(5), attention=attention,
                                bucket=bucket, graphs=False)
    assert torch.equal(got, plain)
    other = sample_tokens_graphed(model, cond, s, torch.Generator().manual_seed(6), attention=attention,
                                  bucket=bucket, graphs=False)
    assert not torch.equal(other, plain)


def test_the_noise_draw_is_torch_multinomials_draw():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    s = Sampling(temperature=0.8, top_k=40)
    for seed in range(5):
        want = torch.multinomial(probabilities(logits, s), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        noise = torch.empty(6, 300).exponential_(generator=torch.Generator().manual_seed(seed))
        assert torch.equal(pick_with_noise(logits, s, noise), want)


def test_a_kept_sampler_follows_weight_changes_in_a_lower_precision_copy(model):
    s, cond = Sampling(greedy=True, cfg_scale=2.0), conditions()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the sampler runs a bf16 copy of the weights
        before = sample_tokens_graphed(model, cond, s, attention="exact", graphs=False)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        after = sample_tokens_graphed(model, cond, s, attention="exact", graphs=False)
        clone = GPT(SHAPE).eval()
        clone.load_state_dict(model.state_dict())
        fresh = sample_tokens_graphed(clone, cond, s, attention="exact", graphs=False)  # a new sampler
    assert not torch.equal(before, after) and torch.equal(after, fresh)


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        sample_tokens_graphed(model, conditions(), attention="flash", graphs=False)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        sample_tokens_graphed(model, conditions(), graphs=True)


def test_the_triton_kernel_attends_over_the_filled_positions_and_samples_the_reference_tokens():
    """Under Triton's CPU interpreter, which must be on before Triton is first imported: a fresh process."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_kernel_worker.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_triton_kernel_compiles_for_hopper_with_16_byte_loads():
    """Compiled ahead of time for sm_90 (no GPU needed): it builds, and reads keys and values in 16-byte
    vectors (a memory-bound kernel loading 2 bytes at a time would be several times slower)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    from clipgen.models.gpt_attention_kernel import _attend_filled

    names = ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "position_ptr", "q_row", "q_head", "kv_row", "kv_head",
             "kv_pos", "out_row", "out_head", "n_head", "scale"]
    types = {"position_ptr": "*i64", "n_head": "i32", "scale": "fp32"}
    signature = {n: types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
    signature.update(HEAD_DIM="constexpr", DIMS="constexpr", BLOCK="constexpr")
    # what Triton's launcher assumes of pointers and strides that are multiples of 16, as ours are
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in ("n_head", "scale")}
    source = ASTSource(fn=_attend_filled, signature=signature, constexprs={"HEAD_DIM": 64, "DIMS": 64, "BLOCK": 64},
                       attrs=aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    loads = [line for line in ptx.splitlines() if "ld.global" in line]
    assert loads and all(".v4" in line for line in loads if "b64" not in line), loads[:4]


@pytest.mark.parametrize("bf16_copy", [False, True])
def test_kept_samplers_do_not_keep_their_model_alive(bf16_copy):
    import gc
    import weakref

    model = GPT(SHAPE).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_copy):
        sample_tokens_graphed(model, conditions(), Sampling(greedy=True), attention="exact", graphs=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_model_whose_weights_moved_gets_a_new_sampler(model):
    s, cond = Sampling(greedy=True, cfg_scale=2.0), conditions()
    before = sample_tokens_graphed(model, cond, s, attention="bucket", bucket=4, graphs=False)
    model.head.weight = torch.nn.Parameter(-2 * model.head.weight.detach())  # new storage: graphs would be stale
    after = sample_tokens_graphed(model, cond, s, attention="bucket", bucket=4, graphs=False)
    assert not torch.equal(before, after)
    assert torch.equal(after, sample_tokens_uncached(model, cond, s))

"""Training the transformer from caches: joins, overfitting, resume, DDP, the consistency loss."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipgen.config import GPTConfig, TrainConfig, VQGANConfig
from clipgen.models.gpt import load_gpt
from clipgen.train import loop
from clipgen.train.gpt_trainer import Consistency, Pairs, consistency_loss, fit, join_by_key
from clipgen.train.overlap import WindowMeans

ROOT = Path(__file__).resolve().parents[1]


def pairs(n=32, dim=8, n_tokens=6, vocab=20, seed=0) -> Pairs:
    g = torch.Generator().manual_seed(seed)
    cond = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    tokens = torch.randint(0, vocab, (n, n_tokens), generator=g)
    return Pairs([f"k{i:04d}" for i in range(n)], cond, tokens)


def small(**overrides) -> GPTConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, n_prefix=2, steps=6, batch_size=8, lr=3e-3, warmup_steps=1,
                cond_dropout=0.1, bridge="noise", noise_level=0.1)
    return GPTConfig(**{**base, **overrides})


def test_join_by_key_ignores_order_and_counts_the_unmatched():
    emb = np.arange(12, dtype=np.float32).reshape(4, 3)
    tokens = np.array([[7], [5], [6]])
    joined, counts = join_by_key(["d", "a", "b", "c"], emb, ["c", "a", "x"], tokens)
    assert joined.keys == ["a", "c"]
    assert joined.cond.tolist() == [emb[1].tolist(), emb[3].tolist()]
    assert joined.tokens.tolist() == [[5], [7]]
    assert counts == {"pairs": 2, "only_embedding": 2, "only_tokens": 1}


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    data = pairs(8)
    cfg = small(steps=60, batch_size=8, cond_dropout=0.0, bridge="none", lr=3e-3)
    fit(cfg, TrainConfig(log_every=10), data, tmp_path, vocab_size=20, progress=False, cpu_threads=1)
    ce = [json.loads(line)["ce"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ce[0] > 2.0 and ce[-1] < 0.3 * ce[0], ce  # ln(20) = 3.0 at the start


@pytest.mark.parametrize("weight_average", [0.0, 0.9])
def test_killed_run_resumes_to_the_same_weights(tmp_path, weight_average):
    cfg, train, data = small(weight_average=weight_average), TrainConfig(log_every=2, ckpt_every=2), pairs()
    full = fit(cfg, train, data, tmp_path / "full", vocab_size=20, heldout=pairs(8, seed=1), progress=False,
               cpu_threads=1)

    def crash(step, logs):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, train, data, tmp_path / "resumed", vocab_size=20, heldout=pairs(8, seed=1), on_step=crash,
            progress=False, cpu_threads=1)
    resumed = fit(cfg, train, data, tmp_path / "resumed", vocab_size=20, heldout=pairs(8, seed=1),
                  progress=False, cpu_threads=1)
    assert resumed.step == full.step == cfg.steps
    a, b = load_gpt(tmp_path / "full").state_dict(), load_gpt(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and all("val_loss" in r for r in records)
    assert full.summary["val_loss"] > 0
    assert ("val_loss_last_weights" in full.summary) == (weight_average > 0)


def test_the_saved_model_holds_the_weight_average(tmp_path):
    data, train = pairs(), TrainConfig(log_every=2, ckpt_every=100)
    plain = fit(small(), train, data, tmp_path / "plain", vocab_size=20, progress=False, cpu_threads=1)
    averaged = fit(small(weight_average=0.5), train, data, tmp_path / "avg", vocab_size=20, progress=False,
                   cpu_threads=1)
    a, b = plain.model.state_dict(), averaged.model.state_dict()  # the same run; only the saved weights differ
    assert any(not torch.equal(a[k], b[k]) for k in a)
    saved = load_gpt(tmp_path / "avg").state_dict()
    assert all(torch.equal(saved[k], b[k]) for k in b)


def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_gpt_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = [(tmp_path / f"digest_rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1] and digests[0].startswith("3 ")


def test_consistency_loss_sends_gradients_to_the_logits():
    from clipgen.clip import load_clip
    from clipgen.models.vqgan import VQGAN

    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(base_channels=8, channel_mult=[1, 2, 4, 8], n_res_blocks=1, quantizer="fsq",
                              fsq_levels=[5, 4, 2], codebook_size=40, code_dim=3), image_size=32).eval()
    vqgan.requires_grad_(False)
    clip = load_clip("toy-clip", None)
    grid = vqgan.grid_size ** 2
    logits = torch.randn(2, grid, 40, requires_grad=True)
    target = F.normalize(torch.randn(2, clip.embed_dim), dim=-1)
    loss = consistency_loss(logits, target, Consistency(vqgan, clip))
    loss.backward()
    assert 0 < loss.item() < 2 and logits.grad.abs().sum() > 0
    # one-hot weights decode to exactly what decode_indices gives
    idx = torch.randint(0, 40, (2, grid))
    soft = vqgan.decode_soft(F.one_hot(idx, 40).float())
    side = vqgan.grid_size
    assert torch.allclose(soft, vqgan.decode_indices(idx.view(2, side, side)), atol=1e-5)


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_picks_cpu_bf16_only_for_matmul_bound_models_on_amx(monkeypatch, amx):
    monkeypatch.setattr(loop, "cpu_has_bf16_matmul", lambda: amx)
    cpu = torch.device("cpu")

    def dtype_under(precision, matmul_bound):
        with loop.autocast(cpu, precision, matmul_bound=matmul_bound):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    assert dtype_under("auto", matmul_bound=True) == (torch.bfloat16 if amx else torch.float32)
    assert dtype_under("auto", matmul_bound=False) == torch.float32  # convolutions stay fp32 on CPU
    assert dtype_under("fp32", matmul_bound=True) == torch.float32
    assert dtype_under("bf16", matmul_bound=False) == torch.bfloat16


def test_held_out_scoring_is_spread_over_the_run_and_always_at_the_end():
    due = [s for s in range(50, 3001, 50) if loop.evaluation_due(s, 3000, 50)]
    assert due == list(range(300, 3001, 300))
    assert [s for s in (50, 60) if loop.evaluation_due(s, 60, 50)] == [50, 60]
    assert loop.evaluation_due(1234, 1234, 50)  # the last step, off the grid


def test_window_means_average_the_steps_and_time_only_the_steps():
    window = WindowMeans(torch.device("cpu"))
    for value in (1.0, 2.0, 4.5):
        extra = {"consistency": torch.tensor(value)} if value > 1 else {}
        window.add({"ce": torch.tensor(value), **extra}, data_seconds=0.001)
    window.pause()
    time.sleep(0.05)  # paused (evaluating, saving): not step time
    window.resume()
    means, seconds = window.flush(tokens_per_step=10)
    assert means["ce"] == 2.5 and means["consistency"] == 3.25  # each over the steps that had it
    assert 0 < seconds < 0.05 and means["step_seconds"] == pytest.approx(seconds / 3)
    assert means["tokens_per_s"] == pytest.approx(30 / seconds)
    assert means["data_fraction"] == pytest.approx(0.003 / seconds)
    window.add({"ce": torch.tensor(7.0)}, data_seconds=0.0)
    assert window.flush(tokens_per_step=10)[0]["ce"] == 7.0  # a new window


def test_compiled_blocks_are_eager_again_after_training():
    from clipgen.models.gpt import GPT, GPTShape
    from clipgen.train.gpt_trainer import compiled_blocks

    model = GPT(GPTShape(vocab_size=20, n_tokens=6, cond_dim=8, n_layer=2, n_head=2, n_embd=16, n_prefix=2))
    with compiled_blocks(model, enabled=True):  # compiles lazily: nothing is compiled unless called
        assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert all(block._compiled_call_impl is None for block in model.blocks)


def test_a_kill_between_the_checkpoint_and_its_pointer_loses_nothing(tmp_path):
    """The newest whole step_* folder is resumed even when the ``latest`` pointer was never moved to it."""
    root = tmp_path / "checkpoints"
    weights = {"model": {"w": torch.ones(2)}}
    assert loop.latest_checkpoint(root) is None
    loop.save_checkpoint(root, 10, weights, {}, {"rng": []})
    newest = loop.save_checkpoint(root, 20, weights, {}, {"rng": []})
    (root / loop.LATEST).write_text("step_0000010")  # as if killed before the pointer moved
    (root / ".step_0000030.tmp-99").mkdir()  # and a half-written next one
    assert loop.latest_checkpoint(root) == newest
    assert loop.load_train_state(newest)["step"] == 20

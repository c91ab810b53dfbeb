"""Once a pipeline step is being built, glibc keeps freed tensors' memory in the process (clipgen.host_memory)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from clipgen import host_memory, pipeline
from clipgen.config import load_config
from clipgen.host_memory import OPT_OUT_ENV

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# twelve steps of a one-layer transformer's training; prints whether memory is kept, then each step's minor
# page faults (a step touches about 40k pages: activations, gradients and logits of 64 x 64 tokens)
STEP_FAULTS = """
import resource, torch, torch.nn.functional as F
from clipgen.host_memory import keep_freed_memory
from clipgen.models.gpt import GPT, GPTShape
print(keep_freed_memory())
torch.manual_seed(0)
model = GPT(GPTShape(vocab_size=1000, n_tokens=64, cond_dim=128, n_layer=1, n_head=4, n_embd=192, n_prefix=2))
opt = torch.optim.AdamW(model.parameters())
cond, tokens = F.normalize(torch.randn(64, 128), dim=-1), torch.randint(0, 1000, (64, 64))
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(model(cond, tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def step_faults() -> tuple[bool, list[int]]:
    env = {**os.environ, OPT_OUT_ENV: ""}  # not opted out, whatever the caller's environment says
    done = subprocess.run([sys.executable, "-c", STEP_FAULTS], env=env, capture_output=True, text=True, check=True)
    kept, *faults = done.stdout.split()
    return kept == "True", [int(f) for f in faults]


@glibc_only
def test_training_steps_reuse_freed_pages():
    kept, faults = step_faults()
    assert kept
    # the last six steps: with glibc's defaults 33k-72k pages in three runs; kept, 1-4101 (the heap still grows by
    # a block now and then)
    assert sum(faults[6:]) < 10000, faults


def test_the_opt_out_leaves_glibcs_defaults(monkeypatch):
    monkeypatch.setenv(OPT_OUT_ENV, "default")
    monkeypatch.setattr(host_memory, "_kept", False)
    assert not host_memory.keep_freed_memory()


class Stop(Exception):
    pass


def test_building_a_step_keeps_freed_memory(monkeypatch, tmp_path):
    calls = []

    def stop_before_building(out, recipe):
        raise Stop

    monkeypatch.setattr(pipeline, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(pipeline, "write_recipe", stop_before_building)
    cfg = load_config("pipelines/shapes.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(Stop):
        pipeline.run_step(cfg, "judge")
    assert calls == [True]

"""The Triton attention kernel's checks, run by tests/test_sample_graphed.py in a process started with
``TRITON_INTERPRET=1`` (Triton reads it when first imported), so the kernel runs on CPU tensors.

Exits non-zero, saying what differed, when the kernel's attention is not SDPA's over positions
``0..position``, or when sampling with it does not give the reference loop's greedy tokens.
"""

import os
import sys

import torch
import torch.nn.functional as F

from clipgen.models.gpt import GPT, GPTShape
from clipgen.models.gpt_attention_kernel import attend_filled
from clipgen.sample import Sampling, sample_tokens_uncached
from clipgen.sample_graphed import sample_tokens_graphed


def check_attention() -> list[str]:
    failures = []
    g = torch.Generator().manual_seed(0)
    for head_dim in (8, 48):  # 48: not a power of two, so the kernel masks its spare lanes
        q = torch.randn(3, 2, 1, head_dim, generator=g)
        keys, values = (torch.randn(3, 2, 150, head_dim, generator=g) for _ in range(2))
        for position in (0, 5, 63, 64, 130):  # tile edges at 64
            got = attend_filled(q, keys, values, torch.tensor([position]))
            want = F.scaled_dot_product_attention(q, keys[:, :, :position + 1], values[:, :, :position + 1])
            if not torch.allclose(got, want, atol=1e-6):
                failures.append(f"head_dim {head_dim}, position {position}: max |diff| "
                                f"{(got - want).abs().max().item():.3g}")
    return failures


def check_sampling() -> list[str]:
    torch.manual_seed(0)
    model = GPT(GPTShape(vocab_size=50, n_tokens=12, cond_dim=16, n_layer=2, n_head=4, n_embd=32, n_prefix=3)).eval()
    cond = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    s = Sampling(greedy=True, cfg_scale=3.0)
    got = sample_tokens_graphed(model, cond, s, attention="kernel", graphs=False)
    want = sample_tokens_uncached(model, cond, s)
    return [] if torch.equal(got, want) else [f"kernel sampling {got.tolist()} != reference {want.tolist()}"]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    failures = check_attention() + check_sampling()
    print("\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""One rank of the transformer DDP test: ``torchrun --nproc_per_node=2 tests/ddp_gpt_worker.py OUT``.

Each rank trains the same tiny transformer on its half of every global batch (condition dropout on, so
the null embedding's gradient must sync too) and writes a digest of its final weights to
``OUT/digest_rank<r>.txt``; the test asserts the ranks agree.
"""

import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from clipgen.config import GPTConfig, TrainConfig
from clipgen.train.gpt_trainer import Pairs, fit


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_prefix=2, steps=3, batch_size=8, lr=1e-3, warmup_steps=1,
                    cond_dropout=0.5, bridge="noise", noise_level=0.2)
    g = torch.Generator().manual_seed(0)  # the same data on both ranks; each trains on its half of a batch
    data = Pairs([f"k{i:03d}" for i in range(32)], F.normalize(torch.randn(32, 8, generator=g), dim=-1),
                 torch.randint(0, 20, (32, 6), generator=g))
    result = fit(cfg, TrainConfig(log_every=1, ckpt_every=2), data, out / "run", vocab_size=20,
                 progress=False, cpu_threads=1)
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    (out / f"digest_rank{os.environ['RANK']}.txt").write_text(f"{result.step} {digest.hexdigest()}\n")


if __name__ == "__main__":
    main()

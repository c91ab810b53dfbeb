"""One rank of the DDP test: ``torchrun --nproc_per_node=2 tests/ddp_vqgan_worker.py OUT QUANTIZER DISC_START``.

Each rank trains the same tiny tokenizer on its half of every global batch, then writes a digest of its
final weights (and buffers) to ``OUT/digest_rank<r>.txt``; the test asserts the ranks agree.
"""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from clipgen.config import TrainConfig, VQGANConfig
from clipgen.train.vqgan_trainer import fit


def main() -> None:
    out, quantizer, disc_start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, size=(64, 16, 16, 3), dtype=np.uint8)
    cfg = VQGANConfig(base_channels=8, channel_mult=[1, 2], quantizer=quantizer, codebook_size=16 if quantizer == "vq" else 40,
                      code_dim=4, fsq_levels=[5, 4, 2], steps=4, batch_size=8, lr=1e-3,
                      disc_start=disc_start, disc_warmup=1)
    result = fit(cfg, TrainConfig(log_every=2, ckpt_every=2), images, out / "run", progress=False, cpu_threads=1)
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ["RANK"])
    (out / f"digest_rank{rank}.txt").write_text(f"{result.step} {digest.hexdigest()}\n")


if __name__ == "__main__":
    main()

"""One new token's attention over a KV cache whose filled length lives on the device (a Triton kernel).

For a CUDA-graph decoding step (:meth:`clipgen.models.gpt_cache.KVCache.attend_at_position`): one
program per (row, head) streams that head's cached keys and values in tiles, with the online softmax of
FlashAttention (Milakov & Gimelshein 2018; Dao et al. 2022), and stops at the filled length, which it reads
from the device tensor ``position``. So one captured graph serves every step, each step reads exactly the
filled part of the cache, and no mask is built. Flash-Decoding (Dao et al. 2023) also splits the sequence
over programs; at our sizes rows x heads (e.g. 512 x 16) already fill the GPU, so this kernel does not.

Triton ships with PyTorch's CUDA wheels; :func:`available` says whether it is importable. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernel runs on CPU tensors, which is how
its test checks it without a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: callers use SDPA instead
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _attend_filled(q_ptr, k_ptr, v_ptr, out_ptr, position_ptr,
                       q_row, q_head, kv_row, kv_head, kv_pos, out_row, out_head,
                       n_head, scale, HEAD_DIM: tl.constexpr, DIMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0) // n_head
        head = tl.program_id(0) % n_head
        length = (tl.load(position_ptr) + 1).to(tl.int32)  # positions 0..position are filled
        dims = tl.arange(0, DIMS)
        real = dims < HEAD_DIM  # DIMS is HEAD_DIM rounded up to a power of two; all true when equal
        q = tl.load(q_ptr + row * q_row + head * q_head + dims, mask=real, other=0.0).to(tl.float32) * scale
        k_base = k_ptr + row * kv_row + head * kv_head
        v_base = v_ptr + row * kv_row + head * kv_head
        best = -float("inf")  # running max of the scores, for a stable softmax
        total = 0.0  # running sum of exp(score - best)
        acc = tl.zeros([DIMS], dtype=tl.float32)  # running sum of exp(score - best) * value
        for start in range(0, length, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            inside = pos < length
            tile = inside[:, None] & real[None, :]
            offsets = pos[:, None] * kv_pos + dims[None, :]
            keys = tl.load(k_base + offsets, mask=tile, other=0.0).to(tl.float32)
            scores = tl.where(inside, tl.sum(keys * q[None, :], axis=1), -float("inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            rescale = tl.exp(best - new_best)  # 0 on the first tile, where best is -inf
            values = tl.load(v_base + offsets, mask=tile, other=0.0).to(tl.float32)
            total = total * rescale + tl.sum(weights, axis=0)
            acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
            best = new_best
        out = acc / total
        tl.store(out_ptr + row * out_row + head * out_head + dims, out.to(out_ptr.dtype.element_ty), mask=real)


def attend_filled(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor,
                  block: int = 64) -> torch.Tensor:
    """Softmax attention of ``q [B, H, 1, D]`` over positions ``0..position`` of ``keys, values [B, H, T, D]``
    (same strides); returns ``[B, H, 1, D]`` in ``q``'s dtype."""
    if triton is None:
        raise RuntimeError("the cached-attention kernel needs Triton; install PyTorch's CUDA build or use SDPA")
    rows, heads, _, dim = q.shape
    if q.stride(-1) != 1 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("attend_filled needs unit-stride heads and keys/values laid out alike")
    out = torch.empty(rows, 1, heads, dim, dtype=q.dtype, device=q.device)
    _attend_filled[(rows * heads,)](
        q, keys, values, out, position, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(2), heads, dim ** -0.5, HEAD_DIM=dim, DIMS=triton.next_power_of_2(dim), BLOCK=block)
    return out.transpose(1, 2)

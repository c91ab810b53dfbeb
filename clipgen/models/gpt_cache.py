"""The transformer's KV cache, and how a single-token step reads it (LlamaGen / gpt-fast style decoding).

Keys and values of every layer live in one preallocated buffer ``[L, B, H, T, D]``, so decoding allocates
nothing per token. Two ways to fill and read it:

* eager (:meth:`KVCache.update`): ``length`` is a Python int; a step appends after it and attends over
  exactly the filled positions. The shapes change every step, which is fine without graphs.
* static (:meth:`KVCache.attend_at_position`): the next position lives on the device (``position``) and
  every shape is fixed, so a CUDA graph can capture the step once and replay it. The step attends over
  the first ``window`` positions, a fixed number for each graph: the filled ones rounded up to a bucket
  (the rest masked out, so reading the cache costs what is filled, not the whole buffer), or exactly the
  filled ones (``mask`` None) when a graph is captured per position, or, with ``kernel`` set, a kernel that
  reads the filled length from ``position`` itself (:mod:`clipgen.models.gpt_attention_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (q [B, H, 1, D], keys [B, H, T, D], values [B, H, T, D], position [1]) -> [B, H, 1, D], attending over
# positions 0..position of the buffers
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class KVCache:
    """Per-layer keys and values ``[B, H, T, D]``; ``T`` is ``capacity`` (default: the whole sequence)."""

    def __init__(self, shape, batch: int, device, dtype, capacity: int | None = None):
        head_dim = shape.n_embd // shape.n_head
        self.capacity = capacity or shape.seq_len
        if self.capacity < shape.seq_len:
            raise ValueError(f"a KV cache of {self.capacity} positions cannot hold {shape.seq_len}")
        size = (shape.n_layer, batch, shape.n_head, self.capacity, head_dim)
        self.k = torch.zeros(size, device=device, dtype=dtype)
        self.v = torch.zeros(size, device=device, dtype=dtype)
        self.length = 0
        self.token_bias: torch.Tensor | float = 0.0  # the condition's per-token term, set at prefill
        # static decoding: the next position on the device, and what one step reads (see the module doc)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.window = self.capacity
        self.mask: torch.Tensor | None = None  # additive [1, 1, 1, window]: 0 up to position, -inf after
        self.kernel: DecodeKernel | None = None

    def clear(self) -> None:
        """Start a new sequence in the same buffers (stale entries are overwritten before they are read)."""
        self.length = 0

    def set_token_bias(self, bias: torch.Tensor | float) -> None:
        """Store the condition's per-token term in place when it can, so a captured graph keeps reading it."""
        if isinstance(bias, torch.Tensor) and isinstance(self.token_bias, torch.Tensor) \
                and bias.shape == self.token_bias.shape and bias.dtype == self.token_bias.dtype:
            self.token_bias.copy_(bias)
        else:
            self.token_bias = bias

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` for the positions after ``length``; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def set_window(self, window: int, exact: bool, dtype: torch.dtype) -> None:
        """Make the next static steps read ``window`` positions; mask those after ``position`` unless
        ``exact`` (the window is then always ``position + 1``) or a kernel reads the length itself."""
        if not 0 < window <= self.capacity:
            raise ValueError(f"window {window} outside the cache's 1..{self.capacity} positions")
        self.window = window
        self.mask = None
        if not exact and self.kernel is None:
            later = torch.arange(window, device=self.position.device) > self.position
            self.mask = torch.zeros(window, dtype=dtype, device=later.device).masked_fill(later, float("-inf"))
            self.mask = self.mask[None, None, None]

    def attend_at_position(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store one token's ``k, v`` ``[B, H, 1, D]`` at ``position``; return its attention output."""
        self.k[layer].index_copy_(2, self.position, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.position, v.to(self.v.dtype))
        if self.kernel is not None:
            return self.kernel(q, self.k[layer], self.v[layer], self.position)
        keys = self.k[layer, :, :, :self.window].to(q.dtype)
        values = self.v[layer, :, :, :self.window].to(q.dtype)
        mask = None if self.mask is None else self.mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

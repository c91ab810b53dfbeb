"""Token sampling from the conditional transformer: KV cache, temperature, top-k, top-p, guidance.

:func:`sample_tokens` is the fast path: one prefill over the condition prefix, then one cached
single-token step per image token, for the whole batch at once. Classifier-free guidance runs the
conditional and the null-conditioned rows in the same batch and mixes their logits,
``uncond + scale * (cond - uncond)``. :func:`sample_tokens_uncached` is the reference loop of the public
CLIP-GEN code (the full prefix recomputed for every new token), kept for parity tests and benchmarks.
On a GPU, :func:`clipgen.sample_graphed.sample_tokens_graphed` replays each step as a CUDA graph; it builds
on the pieces here (this module never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipgen.models.gpt import GPT


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    cfg_scale: float = 1.0  # 1.0 = no guidance
    greedy: bool = False  # argmax instead of sampling (for parity checks)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: temperature, then top-k and top-p, then softmax (fp32)."""
    return filter_logits(logits.float() / s.temperature, s.top_k, s.top_p).softmax(-1)


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens ``[B]`` from final (guided) logits ``[B, V]``."""
    if s.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, s), 1, generator=generator)[:, 0]


def pick_with_noise(logits: torch.Tensor, s: Sampling, noise: torch.Tensor) -> torch.Tensor:
    """:func:`pick` with its randomness passed in: ``noise`` ``[B, V]`` fp32 drawn from Exp(1).

    ``argmax(p / noise)`` (the exponential race, a form of the Gumbel-max trick) is how torch.multinomial
    draws one sample, so noise drawn by ``torch.empty_like(p).exponential_(generator=g)`` gives the token
    multinomial would give from the same generator state; unlike multinomial it never waits on the host
    (multinomial checks its input with a sync), so it can run inside a CUDA graph.
    """
    if s.greedy:
        return logits.argmax(-1)
    return probabilities(logits, s).div_(noise).argmax(-1)


def guide(logits: torch.Tensor, batch: int, scale: float) -> torch.Tensor:
    """Classifier-free guidance over rows ``[cond; uncond]``: ``uncond + scale * (cond - uncond)``, fp32."""
    if scale == 1.0:
        return logits.float()
    cond, uncond = logits.float().split(batch)
    return uncond + scale * (cond - uncond)


def with_null(model: GPT, cond: torch.Tensor, s: Sampling) -> torch.Tensor:
    return torch.cat([cond, model.null(len(cond)).to(cond.dtype)]) if s.cfg_scale != 1.0 else cond


@torch.no_grad()
def sample_tokens(model: GPT, cond: torch.Tensor, s: Sampling = Sampling(),
                  generator: torch.Generator | None = None, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Token grids ``[B, N]`` for conditions ``[B, D]`` with the KV cache (see the module doc)."""
    batch, n = len(cond), model.shape.n_tokens
    rows = with_null(model, cond, s)
    cache = model.new_cache(len(rows), cache_dtype)
    logits = model.prefill(rows, cache)
    out = torch.empty(batch, n, dtype=torch.long, device=cond.device)
    for i in range(n):
        token = pick(guide(logits, batch, s.cfg_scale), s, generator)
        out[:, i] = token
        if i + 1 < n:
            logits = model.decode(token.repeat(len(rows) // batch)[:, None], cache)
    return out


@torch.no_grad()
def sample_tokens_uncached(model: GPT, cond: torch.Tensor, s: Sampling = Sampling(),
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference loop: the same sampling, recomputing the whole sequence for every token."""
    batch, n = len(cond), model.shape.n_tokens
    rows = with_null(model, cond, s)
    out = torch.empty(batch, 0, dtype=torch.long, device=cond.device)
    for _ in range(n):
        fed = out.repeat(len(rows) // batch, 1)
        token = pick(guide(model.next_logits_uncached(rows, fed), batch, s.cfg_scale), s, generator)
        out = torch.cat([out, token[:, None]], dim=1)
    return out

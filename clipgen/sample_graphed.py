"""Token sampling with every single-token step replayed as a CUDA graph (static-cache decoding, gpt-fast style).

:func:`sample_tokens_graphed` is :func:`clipgen.sample.sample_tokens` with static steps. What makes it fast on
a GPU:

* Each step has fixed shapes (:meth:`GPT.decode_static`), so it is captured once as a CUDA graph and then
  replayed: a 24-layer step is ~400 kernels, launched with no Python between them.
* Each step reads only the filled part of the KV cache, chosen by ``attention``:
  ``"kernel"``: a Triton kernel reads the filled length on the device (one graph for all steps);
  ``"bucket"``: SDPA over the filled positions rounded up to ``bucket``, the rest masked (a graph per bucket);
  ``"exact"``: a graph per position, so SDPA needs no mask and can use FlashAttention.
  The old way, one graph over the whole cache with a mask, is ``"bucket"`` with ``bucket`` >= the sequence.
* Guidance, temperature, top-k/top-p and the draw run inside the graph, which also writes the token into
  the output: the host only replays. The draw is torch.multinomial's own exponential race
  (:func:`clipgen.sample.pick_with_noise`) fed with noise drawn from the caller's generator just before
  each replay, so for equal logits the tokens equal the plain loop's, seeded or greedy.
* The weights run as a copy in the compute dtype (autocast's when it is on), so no casts replay each step.

Graphs, cache and copy are kept for the next call with the same shapes and settings (two per model); the
copy's weights are refreshed from the model at every call. Without CUDA the same steps run eagerly
(``graphs=False``), which is how the tests check each ``attention`` against the reference loop.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from clipgen.models import gpt_attention_kernel
from clipgen.models.gpt import GPT
from clipgen.sample import Sampling, guide, pick_with_noise, with_null

ATTENTION = ("kernel", "bucket", "exact")
KEPT_PER_MODEL = 2  # samplers (graphs + cache) kept per model; a paper-size cache at 512 rows is ~7 GB


@dataclass(frozen=True)
class Plan:
    """Everything a captured step depends on: a different plan needs different graphs."""

    rows: int  # cache rows: the batch, twice over with guidance
    batch: int
    cache_dtype: torch.dtype
    compute_dtype: torch.dtype
    attention: str
    bucket: int
    sampling: Sampling
    graphs: bool


class GraphedSampler:
    """A static KV cache, the step's input and output buffers, and one CUDA graph per window.

    It keeps no reference to the model it serves (it is kept in a weak dictionary keyed by that model):
    the model is passed to :meth:`run`, and the graphs read its weights where they were at capture, which
    ``weights_at`` records so that a model whose weights moved gets a new sampler.
    """

    def __init__(self, model: GPT, plan: Plan):
        self.plan = plan
        # a copy only when the dtype differs (refreshed at every run); else the model's own weights
        self.copy = None if _dtype_of(model) == plan.compute_dtype else copy.deepcopy(model).to(plan.compute_dtype)
        self.weights_at = weight_addresses(model)
        shape = model.shape
        capacity = shape.seq_len
        if plan.attention == "bucket":  # every window a whole number of buckets (aligned masks)
            capacity = -(-shape.seq_len // plan.bucket) * plan.bucket
        self.cache = (self.copy or model).new_cache(plan.rows, plan.cache_dtype, capacity)
        device = self.cache.k.device
        if plan.attention == "kernel":
            self.cache.kernel = gpt_attention_kernel.attend_filled
        self.feed = torch.zeros(plan.rows, 1, dtype=torch.long, device=device)  # the token each step reads
        self.out = torch.zeros(plan.batch, shape.n_tokens, dtype=torch.long, device=device)
        self.noise = torch.ones(plan.batch, shape.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # window -> its captured step
        self.pool = torch.cuda.graph_pool_handle() if plan.graphs else None  # one memory pool for all
        self.side_stream = torch.cuda.Stream(device) if plan.graphs else None  # graphs need a side stream

    def window(self, position: int) -> int:
        """How many cache positions the step at ``position`` reads (the graph it replays)."""
        if self.plan.attention == "exact":
            return position + 1
        if self.plan.attention == "bucket":
            return min(self.cache.capacity, -(-(position + 1) // self.plan.bucket) * self.plan.bucket)
        return self.cache.capacity  # the kernel reads the length itself; the window is unused

    def _step(self, model: GPT, window: int) -> None:
        plan, n_prefix = self.plan, model.shape.n_prefix
        logits = model.decode_static(self.feed, self.cache, window, exact=plan.attention == "exact")
        token = pick_with_noise(guide(logits, plan.batch, plan.sampling.cfg_scale), plan.sampling, self.noise)
        self.out.index_copy_(1, self.cache.position - (n_prefix - 1), token[:, None])
        self.feed.copy_(token.repeat(plan.rows // plan.batch)[:, None])
        self.cache.position.add_(1)

    def _run_step(self, model: GPT, window: int) -> None:
        """Run the step for ``window``: a replay once captured. The first time on CUDA it runs eagerly (which
        warms up cuBLAS and compiles the Triton kernel outside the capture) and is then captured."""
        graph = self.graphs.get(window)
        if graph is not None:
            graph.replay()
            return
        if not self.plan.graphs:
            self._step(model, window)
            return
        # torch.cuda.graph() would also synchronize and collect garbage before each capture: ~50 ms each,
        # too much for a graph per position, so capture on our own side stream
        main, side = torch.cuda.current_stream(), self.side_stream
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            self._step(model, window)  # the real step at this position
            graph.capture_begin(pool=self.pool)
            try:
                self._step(model, window)  # recorded only: nothing runs, no state changes
            finally:
                graph.capture_end()
        main.wait_stream(side)
        self.graphs[window] = graph

    @torch.no_grad()
    def run(self, model: GPT, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Token grids ``[batch, N]`` for condition rows ``[rows, D]`` (conditional, then null rows)."""
        plan, shape = self.plan, model.shape
        if self.copy is not None:
            for mine, theirs in zip(self.copy.parameters(), model.parameters(), strict=True):
                mine.copy_(theirs)
        working = self.copy or model
        with torch.autocast(self.cache.k.device.type, enabled=False):
            self.cache.clear()
            logits = working.prefill(rows.to(plan.compute_dtype), self.cache)
            self._draw(generator)
            token = pick_with_noise(guide(logits, plan.batch, plan.sampling.cfg_scale), plan.sampling, self.noise)
            self.out[:, 0] = token
            self.feed.copy_(token.repeat(plan.rows // plan.batch)[:, None])
            self.cache.position.fill_(shape.n_prefix)
            for position in range(shape.n_prefix, shape.n_prefix + shape.n_tokens - 1):
                self._draw(generator)
                self._run_step(working, self.window(position))
        return self.out.clone()

    def _draw(self, generator: torch.Generator | None) -> None:
        if not self.plan.sampling.greedy:  # what torch.multinomial would draw from the generator
            self.noise.exponential_(generator=generator)


def weight_addresses(model: GPT) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in model.parameters())


_samplers: weakref.WeakKeyDictionary[GPT, OrderedDict[Plan, GraphedSampler]] = weakref.WeakKeyDictionary()


@torch.no_grad()
def sample_tokens_graphed(model: GPT, cond: torch.Tensor, s: Sampling | None = None,
                          generator: torch.Generator | None = None, cache_dtype: torch.dtype | None = None,
                          attention: str = "auto", bucket: int = 16, graphs: bool | None = None) -> torch.Tensor:
    """:func:`clipgen.sample.sample_tokens` with static steps (see the module doc); ``graphs`` defaults to
    whether the model is on CUDA, and ``attention="auto"`` is the Triton kernel where it runs, else buckets.
    Its draws are the plain loop's for the same logits; its attention kernel may round differently, so
    seeded tokens can differ where logits nearly tie."""
    s = Sampling() if s is None else s
    device = next(model.parameters()).device
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise ValueError("CUDA graph sampling needs the model on a CUDA device")
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else _dtype_of(model)
    if attention == "auto":
        attention = "kernel" if device.type == "cuda" and kernel_runs(device, compute_dtype) else "bucket"
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; choose from {list(ATTENTION)} or 'auto'")
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    rows = with_null(model, cond, s)
    plan = Plan(len(rows), len(cond), cache_dtype or compute_dtype, compute_dtype, attention, bucket, s, graphs)
    kept = _samplers.setdefault(model, OrderedDict())
    sampler = kept.pop(plan, None)
    if sampler is not None and sampler.weights_at != weight_addresses(model):  # moved: stale graphs
        sampler = None
    if sampler is None:
        while len(kept) >= KEPT_PER_MODEL:  # free the oldest graphs and cache before making new ones
            kept.popitem(last=False)
        sampler = GraphedSampler(model, plan)
    kept[plan] = sampler
    return sampler.run(model, rows, generator)


@functools.cache
def kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton attention kernel compiles here and agrees with SDPA (checked once per dtype)."""
    if not gpt_attention_kernel.available():
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(3, 2, n, 48, generator=g, device=device).to(dtype) for n in (1, 80, 80))
        position = torch.tensor([70], device=device)
        got = gpt_attention_kernel.attend_filled(q, k, v, position)
        want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :71], v[:, :, :71])
        return bool(torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2))
    except Exception:  # noqa: BLE001 - any failure to build or run it means: use SDPA
        return False


def _dtype_of(model: GPT) -> torch.dtype:
    return model.head.weight.dtype

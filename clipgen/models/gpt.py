"""The conditional transformer: a GPT over image tokens, conditioned on a CLIP embedding by prefix tokens.

Sequence layout: ``[c_0 .. c_{k-1}, t_0 .. t_{N-2}]`` where the ``k`` prefix tokens are a learned projection
of the (unit-norm) CLIP embedding and ``t`` are the VQGAN codes in raster order. The output at position
``k - 1 + i`` predicts ``t_i``, so one forward pass scores all ``N`` tokens (teacher forcing). With
``add_cond_to_tokens`` another projection of the embedding is added to every token embedding too, a
direct path for the condition at every position besides attention to the prefix.

* Pre-norm blocks, ``F.scaled_dot_product_attention`` (flash/efficient kernels on CUDA), GELU MLP.
* Learned absolute positions, plus optional 2-D rotary ones (``rope_2d``, :func:`grid_rotation`).
* :class:`KVCache` (:mod:`clipgen.models.gpt_cache`) holds each layer's keys and values, preallocated for
  the whole sequence, so sampling is one prefill over the prefix plus one single-token step per image
  token; :meth:`GPT.decode_static` is that step with fixed shapes, for CUDA graphs.
* Condition dropout: during training a fraction of conditions is replaced by a learned null embedding;
  at sampling the null condition gives the unconditional logits for classifier-free guidance.
* :func:`bridge` closes part of the CLIP modality gap at training time (LAFITE-style noise).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clipgen.artifacts import atomic_path, write_json_atomic
from clipgen.models.gpt_cache import KVCache
from clipgen.models.vqgan import state_dict_for_save


@dataclass(frozen=True)
class GPTShape:
    """What the model is built for: its width and depth plus the data's vocabulary, grid and condition."""

    vocab_size: int
    n_tokens: int  # image tokens per sample (grid H * W)
    cond_dim: int  # CLIP embedding size
    n_layer: int
    n_head: int
    n_embd: int
    n_prefix: int
    dropout: float = 0.0
    add_cond_to_tokens: bool = True  # also add a projection of the condition to every token embedding
    rope_2d: bool = False  # also rotate queries and keys by each token's (row, column) in the grid

    @property
    def seq_len(self) -> int:
        return self.n_prefix + self.n_tokens - 1  # the last token is predicted, never fed


def grid_rotation(shape: GPTShape) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary position tables ``(cos, sin)``, each ``[seq_len, head_dim]``.

    The first half of each head's channels turns with the token's grid row, the second half with its
    column (RoPE, Su et al. 2021, split over two axes as in LlamaGen), so attention between two tokens
    depends on their 2-D offset. Prefix positions do not turn. The input at sequence position
    ``n_prefix + i`` is token ``t_i``, at row ``i // side`` and column ``i % side`` of the square grid.
    """
    head_dim = shape.n_embd // shape.n_head
    side = math.isqrt(shape.n_tokens)
    if side * side != shape.n_tokens or head_dim % 4:
        raise ValueError(f"gpt.rope_2d needs a square token grid and a head width divisible by 4; got "
                         f"{shape.n_tokens} tokens and head width {head_dim}")
    quarter = head_dim // 4  # rotation pairs per axis
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [quarter]
    index = torch.arange(shape.seq_len) - shape.n_prefix  # [T]: the token index, negative in the prefix
    row, col = (index // side).clamp(min=0), (index % side) * (index >= 0)
    angles = torch.cat([row[:, None] * freqs, col[:, None] * freqs], dim=1)  # [T, head_dim / 2]
    # full width for rotate(): channel j and j + D/2 share an angle; the sine's first half carries the minus
    return torch.cat([angles.cos()] * 2, dim=1).float(), torch.cat([-angles.sin(), angles.sin()], dim=1).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., T, D]`` with channel pairs ``(j, j + D/2)`` turned by the angles of ``cos, sin [T, D]``
    (:func:`grid_rotation`): ``(a, b) -> (a cos - b sin, b cos + a sin)``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([second, first], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        if shape.n_embd % shape.n_head:
            raise ValueError(f"gpt.n_embd={shape.n_embd} must be divisible by gpt.n_head={shape.n_head}")
        self.n_head, self.dropout = shape.n_head, shape.dropout
        self.qkv = nn.Linear(shape.n_embd, 3 * shape.n_embd)
        self.proj = nn.Linear(shape.n_embd, shape.n_embd)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                static: bool = False, turn: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, c = x.shape  # x: [B, T, C], T new positions (the whole sequence, or 1 when decoding)
        # each of q, k, v: [B, H, T, C/H]
        q, k, v = qkv = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        if turn is not None:  # 2-D rotary positions: (cos, sin) [T, C/H] of these T positions
            q, k = rotate(qkv[:2], *turn)  # queries and keys in one go
        if static:  # one token; every shape fixed, the position read on the device
            y = cache.attend_at_position(layer, q, k, v)
            return self.proj(y.transpose(1, 2).reshape(b, t, c))
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # [B, H, start + T, C/H]: the cached prefix and the new positions
            k, v = k.to(q.dtype), v.to(q.dtype)
        if start == 0:  # the whole sequence so far: plain causal attention
            mask, causal = None, True
        elif t == 1:  # one new token attends to everything before it
            mask, causal = None, False
        else:  # several new tokens after a cached prefix
            rows = torch.arange(start, start + t, device=x.device)[:, None]
            mask, causal = rows >= torch.arange(start + t, device=x.device)[None, :], False
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and ((causal and q.dtype == torch.bfloat16) or (t == 1 and mask is None)):
            y = written_out_attention(q, k, v, dropout, causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))  # y: [B, H, T, C/H] -> [B, T, C]


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, causal: bool
                          ) -> torch.Tensor:
    """Attention as plain matmuls, the softmax in fp32. On CPU PyTorch's fused kernel took ~5x longer than this
    for causal attention under bf16 autocast (forward + backward at the tiny preset), and twice as long for one
    new token over the KV cache (a sampling step, fp32); elsewhere use the fused one."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # [B, H, Tq, Tk]
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = F.dropout(scores.softmax(-1), dropout, training=dropout > 0)
    return weights.to(v.dtype) @ v


class Block(nn.Module):
    def __init__(self, shape: GPTShape):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(shape.n_embd), nn.LayerNorm(shape.n_embd)
        self.attn = Attention(shape)
        # exact (erf) GELU: on CPU in bf16 its forward + backward took half the time of the tanh approximation
        self.mlp = nn.Sequential(nn.Linear(shape.n_embd, 4 * shape.n_embd), nn.GELU(),
                                 nn.Linear(4 * shape.n_embd, shape.n_embd), nn.Dropout(shape.dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                static: bool = False, turn: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer, static, turn)  # [B, T, C] throughout
        return x + self.mlp(self.ln2(x))  # the MLP widens to [B, T, 4C] and back


class GPT(nn.Module):
    """``forward(cond, tokens) -> logits [B, N, V]``; ``cond`` is ``[B, cond_dim]``, unit norm."""

    def __init__(self, shape: GPTShape):
        super().__init__()
        self.shape = shape
        e = shape.n_embd
        self.cond_proj = nn.Sequential(nn.Linear(shape.cond_dim, e), nn.GELU(),
                                       nn.Linear(e, shape.n_prefix * e))
        self.null_cond = nn.Parameter(torch.randn(shape.cond_dim) / math.sqrt(shape.cond_dim))
        self.tok_emb = nn.Embedding(shape.vocab_size, e)
        self.cond_add = nn.Linear(shape.cond_dim, e) if shape.add_cond_to_tokens else None
        self.pos_emb = nn.Parameter(torch.zeros(1, shape.seq_len, e))
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(e)
        self.head = nn.Linear(e, shape.vocab_size, bias=False)
        if shape.rope_2d:  # fixed tables, rebuilt from the shape, never saved
            cos, sin = grid_rotation(shape)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") and "cond_proj" not in name or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.n_layer))
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def condition(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``cond`` with the rows where ``drop`` is True replaced by the learned null embedding."""
        if drop is not None:
            cond = torch.where(drop[:, None], self.null_cond.to(cond.dtype).expand_as(cond), cond)
        return cond

    def null(self, batch: int) -> torch.Tensor:
        return self.null_cond[None].expand(batch, -1)

    def _prefix(self, cond: torch.Tensor) -> torch.Tensor:
        # [B, D] -> [B, n_prefix * C] -> [B, n_prefix, C]: the condition as n_prefix tokens
        return self.cond_proj(cond).view(len(cond), self.shape.n_prefix, self.shape.n_embd)

    def _token_bias(self, cond: torch.Tensor) -> torch.Tensor | float:
        """The condition's term added to every token embedding (a direct path besides the prefix)."""
        return self.cond_add(cond)[:, None] if self.cond_add is not None else 0.0  # [B, 1, C]

    def _turn(self, positions: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables at ``positions`` (a slice, or indices on the device), or None without them."""
        if not self.shape.rope_2d:
            return None
        if isinstance(positions, slice):
            return self.rope_cos[positions], self.rope_sin[positions]
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        x = self.drop(x + self.pos_emb[:, start:start + x.shape[1]])  # [B, T, C] at positions start..start+T-1
        turn = self._turn(slice(start, start + x.shape[1]))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, turn=turn)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.ln_f(x))  # [B, T, V]

    def forward(self, cond: torch.Tensor, tokens: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``[B, N, V]`` for all ``N`` tokens (``tokens`` is ``[B, N]``).

        ``drop`` (bool ``[B]``) swaps those rows' conditions for the null embedding inside the forward,
        so DDP sees the null embedding used (with a zero gradient) even in a step that drops nothing.
        """
        if drop is not None:
            cond = self.condition(cond, drop)
        # [B, n_prefix + N - 1, C]: the condition's prefix, then every token but the last (teacher forcing)
        x = torch.cat([self._prefix(cond), self.tok_emb(tokens[:, :-1]) + self._token_bias(cond)], dim=1)
        return self._run(x, 0, None)[:, self.shape.n_prefix - 1:]  # from the last prefix position: [B, N, V]

    def prefill(self, cond: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the prefix into an empty ``cache``; returns the logits of the first token ``[B, V]``."""
        if cache.length:
            raise ValueError("prefill needs an empty KVCache")
        cache.set_token_bias(self._token_bias(cond))
        return self._run(self._prefix(cond), 0, cache)[:, -1]

    def decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the newest token(s) ``[B, t]``; returns the logits of the token after them ``[B, V]``."""
        return self._run(self.tok_emb(tokens) + cache.token_bias, cache.length, cache)[:, -1]

    def decode_static(self, tokens: torch.Tensor, cache: KVCache, window: int | None = None,
                      exact: bool = False) -> torch.Tensor:
        """:meth:`decode` of one token ``[B, 1]`` at ``cache.position`` with fixed shapes and no host-side
        state, so a CUDA graph can capture it; attends over the first ``window`` cache positions (default:
        all), masking those after the position unless ``exact`` promises ``window == position + 1``
        (:meth:`KVCache.set_window`). The caller advances ``cache.position`` after each call."""
        x = self.tok_emb(tokens) + cache.token_bias + self.pos_emb[0].index_select(0, cache.position)[None]
        cache.set_window(window or cache.capacity, exact, self._compute_dtype(x.device.type))
        turn = self._turn(cache.position)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, static=True, turn=turn)
        return self.head(self.ln_f(x))[:, -1]

    def _compute_dtype(self, device_type: str) -> torch.dtype:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.head.weight.dtype

    def next_logits_uncached(self, cond: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the token after ``tokens [B, t]`` recomputed from scratch: the reference loop's step."""
        x = torch.cat([self._prefix(cond), self.tok_emb(tokens) + self._token_bias(cond)], dim=1)
        return self._run(x, 0, None)[:, -1]

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, capacity: int | None = None) -> KVCache:
        param = next(self.parameters())
        return KVCache(self.shape, batch, param.device, dtype or param.dtype, capacity)


# ------------------------------------------------------------------------------- modality bridge
def bridge(cond: torch.Tensor, mode: str, noise_level: float, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Train-time bridging of the image-text gap, applied to unit-norm CLIP embeddings ``[B, D]``.

    ``none``: unchanged. ``noise`` (LAFITE, Zhou et al. 2022): ``normalize(e + alpha * u)`` with ``u`` a
    random unit vector, so the model learns a neighbourhood of each image embedding, where the paired
    text embedding lies, instead of the point itself.
    """
    if mode == "none" or noise_level <= 0:
        return cond
    if mode != "noise":
        raise ValueError(f"unknown gpt.bridge {mode!r}; choose none or noise")
    noise = torch.randn(cond.shape, generator=generator, device=cond.device, dtype=cond.dtype)
    return F.normalize(cond + noise_level * F.normalize(noise, dim=-1), dim=-1)


# ----------------------------------------------------------------------------------- persistence
FORMAT = "clipgen-gpt-1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_gpt(model: GPT, directory: Path, extra: dict | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (the shape, so the folder rebuilds with no other file)."""
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state_dict_for_save(model), str(tmp))
    write_json_atomic(directory / CONFIG, {"format": FORMAT, "shape": asdict(model.shape), **(extra or {})})


def load_gpt(directory: Path, device: str | torch.device = "cpu") -> GPT:
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"no transformer checkpoint in {directory} (need {CONFIG} and {WEIGHTS}); "
                                "run the train-gpt stage first, or point at its ckpt/gpt/<id> folder")
    meta = json.loads((directory / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = GPT(GPTShape(**meta["shape"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.to(device).eval()

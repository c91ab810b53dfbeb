"""An exponential moving average of a model's weights (Polyak averaging), the weights a generator samples with.

The averaged weights sit where the noisy late steps of training pass through, which gives cleaner samples
than the last step's weights for the same training time (as in LlamaGen's and most diffusion trainers).
The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``), so the random initial weights are forgotten quickly in
a short run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightAverage:
    """``update(model)`` after each optimiser step; ``averaged(model)`` swaps the average in for a while."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors plus the update count, as tensors only (for safetensors checkpoints)."""
        return {**self.shadow, "_updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["_updates"])
        for name, value in self.shadow.items():
            value.copy_(state[name])

    def copy_to(self, model: nn.Module) -> None:
        """Put the averaged weights into ``model`` for good."""
        _copy_into(model, self.shadow)

    @contextlib.contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the averaged weights; its own are put back afterwards."""
        own = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            _copy_into(model, own)


@torch.no_grad()
def _copy_into(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(values[name])

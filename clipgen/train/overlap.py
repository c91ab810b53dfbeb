"""Keeping the GPU busy in a training loop: batches copied without waiting, metrics read once per window.

A CUDA step is queued, not run, when Python returns from it; the host can prepare the next step while the
device works, as long as nothing makes it wait. Two things in a plain loop do:

* ``tensor.to("cuda", non_blocking=True)`` from ordinary (pageable) host memory waits for the device
  before copying. :class:`PinnedRows` gathers each batch into page-locked buffers instead, whose copies
  are truly asynchronous (a small ring, so a buffer is refilled only after its copy has finished).
* ``loss.item()`` or ``float(grad_norm)`` every step waits for that step to finish, and the device then
  idles while Python launches the next one's first kernels. :class:`WindowMeans` adds the scalars up on
  the device and reads them once per log window; it times the window after one sync at its end.

On CPU both are plain: rows are indexed directly and nothing waits anyway.
"""

from __future__ import annotations

import time

import torch


class PinnedRows:
    """``take(index)`` -> the rows ``index`` of each host tensor, on ``device``."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], rows: int, device: torch.device, depth: int = 2):
        self.tensors, self.device = tensors, device
        self.ring: list[tuple[list[torch.Tensor], torch.cuda.Event]] = []
        if device.type == "cuda":
            for _ in range(depth):
                buffers = [torch.empty((rows, *t.shape[1:]), dtype=t.dtype).pin_memory() for t in tensors]
                self.ring.append((buffers, torch.cuda.Event()))
        self.turn = 0

    def wait_for_buffer(self) -> None:
        """Block until the next buffer's previous copy is done: time the device owes, not data time."""
        if self.ring:
            self.ring[self.turn][1].synchronize()

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.ring:
            return tuple(t[index].to(self.device) for t in self.tensors)
        buffers, copied = self.ring[self.turn]
        self.turn = (self.turn + 1) % len(self.ring)
        if len(index) != len(buffers[0]):
            raise ValueError(f"PinnedRows holds {len(buffers[0])} rows per batch, got {len(index)}")
        out = []
        for source, buffer in zip(self.tensors, buffers, strict=True):
            torch.index_select(source, 0, index, out=buffer)
            out.append(buffer.to(self.device, non_blocking=True))
        copied.record()
        return tuple(out)


class WindowMeans:
    """Means of per-step device scalars and the step timing over a log window, read with one sync.

    Sums are kept in fp64, in step order. Only step time counts: :meth:`pause` before evaluating or saving,
    :meth:`resume` after.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps, self.data_seconds, self.seconds = 0, 0.0, 0.0
        self.started: float | None = time.perf_counter()

    def add(self, scalars: dict[str, torch.Tensor], data_seconds: float) -> None:
        for name, value in scalars.items():
            value = value.detach().to(torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.data_seconds += data_seconds

    def pause(self) -> None:
        """Wait for the queued steps and stop the clock (``seconds`` is then the window's step time)."""
        if self.started is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def resume(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def flush(self, tokens_per_step: int) -> tuple[dict[str, float], float]:
        """The window's means (and step timing) and its step seconds; starts a new, paused window."""
        self.pause()
        totals = torch.stack(list(self.sums.values())).tolist() if self.sums else []
        means = {name: total / self.counts[name] for name, total in zip(self.sums, totals, strict=True)}
        seconds, steps = max(self.seconds, 1e-9), max(self.steps, 1)
        means.update(step_seconds=seconds / steps, tokens_per_s=tokens_per_step * steps / seconds,
                     data_fraction=self.data_seconds / seconds)
        self.sums, self.counts, self.steps, self.data_seconds, self.seconds = {}, {}, 0, 0.0, 0.0
        return means, seconds

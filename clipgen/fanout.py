"""How a step fans out over independent parts (shards, download slices).

The library maps serially; flows pass a function with the same signature that maps through Prefect's task
runner (threads or Dask) instead. A part's function must then be picklable and carry names and configs,
not loaded models, so that a task ships a few bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

MapFn = Callable[[Callable[[Any], Any], Iterable[Any]], list[Any]]


def serial_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    return [fn(item) for item in items]

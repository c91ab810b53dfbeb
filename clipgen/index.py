"""Nearest-neighbour search over CLIP embeddings with faiss (kNN bridging, memorisation checks).

Embeddings are unit-norm, so inner product is cosine similarity. Small collections get an exact flat
index; above ``ivfpq_min_size`` vectors an IVF-PQ index keeps memory and search time bounded.
The index is saved beside its key list, so results come back as keys, not positions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from clipgen.artifacts import atomic_path, write_json_atomic

INDEX_FILE = "index.faiss"
KEYS_FILE = "index_keys.json"


def build_index(vectors: np.ndarray, kind: str = "auto", ivfpq_min_size: int = 200_000) -> faiss.Index:
    """An inner-product index over ``vectors`` [N, D] (float32, unit norm)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = "ivfpq" if n >= ivfpq_min_size else "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivfpq":
        n_lists = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        n_subq = next(m for m in (16, 8, 4, 2, 1) if dim % m == 0)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, n_lists, n_subq, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(16, n_lists)
    else:
        raise ValueError(f"unknown index kind {kind!r}; choose from ['auto', 'flat', 'ivfpq']")
    index.add(vectors)
    return index


def save_index(index: faiss.Index, keys: list[str], out_dir: Path) -> None:
    if index.ntotal != len(keys):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(keys)} keys were given")
    with atomic_path(Path(out_dir) / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_json_atomic(Path(out_dir) / KEYS_FILE, keys)


class NeighbourIndex(NamedTuple):
    index: faiss.Index
    keys: list[str]


def load_index(out_dir: Path, gpu: bool = False) -> NeighbourIndex:
    """The saved index; with ``gpu``, copied to GPU 0 when this faiss is a GPU build and sees a GPU."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no faiss index at {path}; run the embed stage first")
    index = faiss.read_index(str(path))
    return NeighbourIndex(to_gpu(index) if gpu else index, json.loads((Path(out_dir) / KEYS_FILE).read_text()))


_GPU_RESOURCES: list = []  # faiss GPU memory pools; they must outlive every index that uses them


def to_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` on GPU 0 if faiss was built with GPU support (faiss-gpu-cu12) and finds a GPU; else itself."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)


class Neighbours(NamedTuple):
    scores: np.ndarray  # [Q, k] cosine similarity, best first
    keys: list[list[str]]  # [Q][k]
    rows: np.ndarray  # [Q, k] positions in the index (-1 where fewer than k exist)


def search(nn: NeighbourIndex, queries: np.ndarray, k: int) -> Neighbours:
    """The ``k`` most similar indexed embeddings for each query (queries are re-normalised)."""
    q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, nn.index.d)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    scores, rows = nn.index.search(q, k)
    keys = [[nn.keys[r] if r >= 0 else "" for r in row] for row in rows]
    return Neighbours(scores, keys, rows)

"""The token cache: every shard's images encoded by the trained tokenizer, one Parquet file per shard.

Each ``<split>/NNNNN.parquet`` holds ``key`` (string) and ``tokens`` (fixed-size list of the smallest
unsigned integer type that fits the codebook, the ``h x w`` grid in row-major order), sorted by key.
The prior trains from this cache and the embedding cache joined on ``key`` (never by position), so a
corrupt sample is simply absent here and counted. Images are preprocessed exactly as in training
(:func:`clipgen.data.images_array.decode_image` and :func:`~clipgen.data.images_array.to_model_input`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clipgen.artifacts import atomic_path
from clipgen.data.images_array import decoded_batches, to_model_input
from clipgen.data.shards import read_list_column
from clipgen.models.vqgan import VQGAN


class TokenizedShard(NamedTuple):
    path: str
    count: int
    skipped_keys: list[str]


class Tokens(NamedTuple):
    keys: list[str]
    tokens: np.ndarray  # int64 [N, h*w]


def token_dtype(codebook_size: int) -> pa.DataType:
    """The smallest unsigned integer type that holds every index of a ``codebook_size`` codebook."""
    for dtype, limit in ((pa.uint8(), 1 << 8), (pa.uint16(), 1 << 16), (pa.uint32(), 1 << 32)):
        if codebook_size <= limit:
            return dtype
    raise ValueError(f"codebook_size {codebook_size} does not fit in 32 bits")


def encode_images(model: VQGAN, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> int64 [B, h*w] token indices, row-major."""
    device = next(model.parameters()).device
    x = to_model_input(torch.from_numpy(images)).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        indices = model.encode(x)  # [B, h, w]; the quantizer itself runs in fp32
    return indices.flatten(1).cpu().numpy().astype(np.int64)


def tokenize_shard(model: VQGAN, shard: Path, out_path: Path, batch_size: int = 256) -> TokenizedShard:
    """Encode one shard into ``out_path`` (written atomically). Undecodable samples are listed, not fatal."""
    model.eval()
    keys: list[str] = []
    parts: list[np.ndarray] = []
    skipped: list[str] = []
    for batch_keys, images, bad in decoded_batches(Path(shard), model.image_size, batch_size):
        skipped.extend(bad)
        if images is not None:
            keys.extend(batch_keys)
            parts.append(encode_images(model, images))
    n_tokens = model.grid_size ** 2
    tokens = np.concatenate(parts) if parts else np.zeros((0, n_tokens), np.int64)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    write_tokens(out_path, [keys[i] for i in order], tokens[order], model.codebook_size, sorted(skipped))
    return TokenizedShard(str(out_path), len(keys), sorted(skipped))


def write_tokens(path: Path, keys: list[str], tokens: np.ndarray, codebook_size: int,
                 skipped_keys: list[str] = ()) -> None:
    """Write (key, tokens) rows to Parquet atomically, tokens as the smallest type that fits.

    The file's metadata keeps the codebook size and the keys that were skipped, so a rerun that finds
    the file can still report them.
    """
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise ValueError(f"token indices outside [0, {codebook_size}); the model and its config disagree")
    dtype = token_dtype(codebook_size)
    flat = pa.array(tokens.reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    column = pa.FixedSizeListArray.from_arrays(flat, tokens.shape[1])
    table = pa.table({"key": pa.array(keys, type=pa.string()), "tokens": column})
    table = table.replace_schema_metadata({"codebook_size": str(codebook_size),
                                           "skipped_keys": json.dumps(list(skipped_keys))})
    with atomic_path(Path(path)) as tmp:
        pq.write_table(table, tmp)


def tokenize_shards(model: VQGAN, shards: list[Path], out_dir: Path, batch_size: int = 256) -> list[TokenizedShard]:
    """Tokenize ``shards`` into ``out_dir/<split>/NNNNN.parquet``; shards already done are read, not redone."""
    results = []
    for shard in shards:
        out_path = Path(out_dir) / Path(shard).parent.name / f"{Path(shard).stem}.parquet"
        if out_path.is_file():  # atomic writes: an existing file is a finished one
            meta = pq.read_metadata(out_path)
            skipped = json.loads((meta.metadata or {}).get(b"skipped_keys", b"[]"))
            results.append(TokenizedShard(str(out_path), meta.num_rows, skipped))
            continue
        results.append(tokenize_shard(model, shard, out_path, batch_size))
    return results


def read_tokens(paths: list[Path]) -> Tokens:
    """Read and concatenate token Parquet files into (keys, int64 [N, h*w])."""
    return Tokens(*read_list_column(paths, "tokens", np.int64))

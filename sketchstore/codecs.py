"""Compression choices for a store's chunks, and sketch dtype conversion.

Every chunk ends its codec chain with a CRC32C checksum, so a corrupted or truncated
chunk file fails to decode instead of reading as wrong numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import BadInputError

COMPRESSORS = ("none", "zstd", "blosc-lz4", "blosc-zstd")
DEFAULT_COMPRESSOR = "blosc-lz4"
DEFAULT_CHUNK_BYTES = 4 * 2**20


def parse_compressor(name: str) -> tuple[str, int | None]:
    """``"zstd:3"`` -> ("zstd", 3); the level is optional."""
    base, _, level = name.partition(":")
    if base not in COMPRESSORS:
        raise BadInputError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)} (optionally NAME:LEVEL)")
    if level and not level.isdigit():
        raise BadInputError(f"compressor level must be an integer, got {name!r}")
    return base, int(level) if level else None


def codec_chain(name: str, itemsize: int) -> list:
    """The zarr bytes-to-bytes codecs for ``name``, always ending with a checksum."""
    base, level = parse_compressor(name)
    if base == "none":
        chain = []
    elif base == "zstd":
        chain = [ZstdCodec(level=1 if level is None else level, checksum=False)]
    else:
        cname = base.split("-")[1]
        chain = [BloscCodec(cname=cname, clevel=5 if level is None else level, shuffle="bitshuffle", typesize=itemsize)]
    return chain + [Crc32cCodec()]


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype a sketch dtype is stored as (bfloat16 is stored as its uint16 bit pattern)."""
    return {"float16": np.dtype("float16"), "bfloat16": np.dtype("uint16"), "float32": np.dtype("float32")}[dtype]


def to_storage(sketches: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 (n, k) tensor -> numpy array in the store's dtype."""
    if dtype == "bfloat16":
        return sketches.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return sketches.to(getattr(torch, dtype)).numpy()


def from_storage(block: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored block -> float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(block).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(block)).float()

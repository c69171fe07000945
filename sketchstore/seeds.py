"""Seeds derived from names: the same number in every process, on every machine, every day."""

from __future__ import annotations

import hashlib

DEFAULT_BITS = 63


def stable_seed(*parts: object, bits: int = DEFAULT_BITS) -> int:
    """A ``bits``-bit seed from ``parts`` (joined by ``:`` as text, hashed with blake2b)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)

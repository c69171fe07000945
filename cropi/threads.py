"""Torch's intra-op thread count, set for a block of code."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads = ``n`` inside the block (None: unchanged). Uses the C setter, which
    an in-process vLLM CPU engine does not lock (it replaces ``torch.set_num_threads``)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch._C.set_num_threads(int(n))
    try:
        yield
    finally:
        torch._C.set_num_threads(old)

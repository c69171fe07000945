"""What a build will need, estimated before it starts, so one that cannot fit is refused.

Memory beyond the loaded model (which the process already holds), from the model's sizes and
the rows' token counts (the objective's batched form encodes them without running the model):

* gradients: per-row modes free each parameter's gradient once projected (sketchers.py), but a
  tied embedding's gradient waits for its last use, so twice the largest parameter is counted;
  factored mode computes no weight gradient;
* activations of the largest forward (per-row modes: one row's sequences, padded; factored: the
  largest pass of plan_passes, sorted over a window of rows or within a batch; counted against host memory on CPU only): per token, ACTIVATION_WIDTHS hidden-sized and
  intermediate-sized float32 tensors per layer and LOGIT_COPIES vocabulary-sized ones;
* the sparse projector's cache of bucket codes (2 bytes per coordinate, up to its bound);
* the sketches of one part (flush rows x dim float32, twice: sketches and their storage copy).

The figures are deliberately coarse (tens of percent); benchmarks/real_model.py measures the
real peaks (benchmarks/README.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import nn

from .errors import BadInputError
from .factored import SORT_ROWS, batch_passes, plan_passes
from .objectives import Objective
from .projection import SparseProjector
from .spec import ProjectionSpec

GB = 1 << 30
#: float32 tensors per token and layer that autograd keeps: (hidden-sized, intermediate-sized),
#: a llama-like block (norms, q/k/v/o, residuals; gate, up, activation, product).
ACTIVATION_WIDTHS = (12, 4)
#: vocabulary-sized float32 tensors per token: logits, their float copy, log-softmax and its gradient.
LOGIT_COPIES = 4
FLOAT_BYTES = 4
CODE_BYTES = 2
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a build needs beyond the loaded model, by cause."""

    model: int
    gradients: int
    activations: int
    projection: int
    sketches: int

    @property
    def extra(self) -> int:
        return self.gradients + self.activations + self.projection + self.sketches

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.2f}"
                          for name in ("gradients", "activations", "projection", "sketches"))
        return f"model {self.model / GB:.2f} GB loaded + {self.extra / GB:.2f} GB more ({parts})"


def available_memory() -> int:
    """Bytes of memory available to new allocations now (MemAvailable on Linux)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _forward_tokens(objective: Objective, rows: Sequence[dict], mode: str, batch_size: int, flush_rows: int) -> int:
    """Padded token positions of the largest forward the build will run (factored: the larger of
    the passes sorted over a window of rows, norms "sketch", and those of batch_size-row batches
    in file order, exact norms; see FactoredSketcher.sketch_rows)."""
    if not rows:
        return 0
    if mode != "factored":
        widest = 0
        for row in rows:
            lengths = [len(q) for q in objective.batch([row]).sequences]
            widest = max(widest, len(lengths) * max(lengths, default=0))
        return widest
    largest = 0
    window = min(flush_rows, SORT_ROWS)
    for lo in range(0, len(rows), window):
        batch = objective.batch(list(rows[lo:lo + window]))
        lengths = [len(q) for q in batch.sequences]
        seq_rows = batch.seq_rows.tolist()
        groups = [p.tolist() for p in batch_passes(batch, batch_size)]
        for first in range(0, batch.n_rows, batch_size):
            members = [s for s, r in enumerate(seq_rows) if first <= r < first + batch_size]
            groups += [[members[i] for i in p.tolist()] for p in plan_passes([lengths[s] for s in members])]
        for group in groups:
            if group:
                largest = max(largest, len(group) * max(lengths[s] for s in group))
    return largest


def estimate_memory(model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], spec: ProjectionSpec,
                    objective: Objective, rows: Sequence[dict], batch_size: int, flush_rows: int) -> MemoryEstimate:
    """The memory a build of ``rows`` needs (see the module docstring)."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = _forward_tokens(objective, rows, spec.mode, batch_size, flush_rows)
    per_token = layers * (ACTIVATION_WIDTHS[0] * hidden + ACTIVATION_WIDTHS[1] * inner) + LOGIT_COPIES * vocab
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max((p.numel() for _, p in params), default=0)
    gradients = 0 if spec.mode == "factored" else 2 * largest * FLOAT_BYTES
    projection = 0
    if spec.mode == "sparse":
        coords = sum(p.numel() for _, p in params) * float(spec.keep_ratio)
        projection = int(min(SparseProjector(spec).cache.max_bytes, coords * CODE_BYTES))
    sketches = 2 * min(flush_rows, len(rows)) * spec.dim * FLOAT_BYTES
    return MemoryEstimate(model=model_bytes, gradients=gradients, activations=tokens * per_token * FLOAT_BYTES,
                          projection=projection, sketches=sketches)


def check_fits(estimate: MemoryEstimate, limit: int) -> None:
    """Refuse (BadInputError) a build whose estimated extra memory exceeds ``limit`` bytes."""
    if estimate.extra > limit:
        raise BadInputError(f"this build needs about {estimate.extra / GB:.1f} GB beyond the model but "
                            f"{limit / GB:.1f} GB are available ({estimate.describe()}); use --projection factored, "
                            "a smaller --batch-size or --max-length, or --params")

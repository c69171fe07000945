"""Building sketches: data rows -> per-example gradients -> projections -> store parts.

Resumable: rows whose key is already stored are skipped, and each flushed part is
committed atomically, so an interrupted build loses at most the unflushed rows.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from .budget import GB, available_memory, check_fits, estimate_memory
from .codecs import DEFAULT_COMPRESSOR
from .data import ColumnMap
from .errors import BadInputError, SpecMismatchError
from .factored import BLOCK_DTYPES, NORM_MODES, FactoredSketcher, check_block_dtype
from .gradients import load_model, model_fingerprint, parameter_shapes, select_parameters
from .objectives import ObjectiveOptions, objective_options
from .options import option
from .seeds import stable_seed
from .sft import DEFAULT_MAX_LENGTH
from .sketchers import GradientSketcher, RowSketcher
from .spec import ProjectionSpec, param_spec_hash
from .store import SketchBatch, SketchStore

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-+=@]+$")
#: Most rows per factored forward/backward when --batch-size is 0 (auto).
MAX_AUTO_BATCH = 8
#: Auto batch size: rows of --max-length tokens per pass keep vocabulary x positions under this
#: (2**24 logits, 64 MiB per float32 copy; a pass holds ~4 copies). On SmolLM2 (49k vocabulary,
#: 256-token rows, float32, 2 threads) 1 row per pass ran at 0.75 rows/s with a 1.9 GiB peak, 2 rows
#: at 0.82 rows/s and 2.6 GiB (over the 2.25 GiB bound), 8 rows at 5.5 GiB (benchmarks/README.md).
AUTO_BATCH_LOGITS = 1 << 24
#: Compute dtypes a build may load the model in (``--compute-dtype``) (bfloat16: faster where the CPU has avx512_bf16).
DTYPES = ("float32", "bfloat16")
DEFAULT_FLUSH_ROWS = 256
#: Manifest column (and part attribute) saying how grad_norm was computed: exact, or sketch (its sketch's norm).
GRAD_NORM_KIND = "grad_norm_kind"
#: Manifest column (and part attribute) of factored builds naming the dtype their block products ran in.
BLOCK_DTYPE = "block_dtype"
#: ``norms`` resolved per projection: factored builds skip exact norms (measured 1.3x faster on
#: SmolLM2-135M, benchmarks/README.md), per-row builds get exact norms for free.
AUTO_NORMS = "auto"


def check_name(value: str, what: str) -> str:
    """Checkpoint and split names are used in keys and CLI lists (CKPT:SPLIT,...)."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise BadInputError(f"invalid {what} name {value!r}: use letters, digits and _ . - + = @")
    return value


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Rows go to shard ``stable_seed(id) mod N``: stable when rows are added or reordered."""
    index, count = shard
    return count == 1 or stable_seed("shard", key) % count == index


@dataclass(frozen=True)
class BuildConfig:
    """What ``build_sketches`` builds. ``spec.param_hash`` is filled in from the model.

    ``objective``: a registered objective's name (``"sft"``, or one a plugin registers) or its
    options instance; a name is resolved to its options here, so a missing option fails before
    any model is loaded.
    """

    model: Path = option(help="Local Hugging Face checkpoint directory.")
    data: Path | None = option(help="Rows: JSONL, Parquet, a directory or glob of Parquet shards, or a datasets "
                                    "save_to_disk directory (sft: prompt, response; other objectives: optional, "
                                    "restricts rows and adds metadata).")
    store: Path | str = option(help="Sketch store: a directory, or an object-storage URL such as s3://bucket/prefix.")
    checkpoint: str = option(help="Name recorded for this model's sketches.")
    split: str = option(help="Split name, e.g. train or a validation set's name.")
    spec: ProjectionSpec = option(default_factory=ProjectionSpec, help="How gradients become sketches.")
    columns: ColumnMap = option(default_factory=ColumnMap, help="Which columns of --data hold prompt, response, "
                                                                "answer and id.")
    params: tuple[str, ...] | None = option(None, "Glob patterns of parameter names to sketch (default: all).")
    device: str = option("cpu", "Torch device: cpu, cuda or cuda:N.")
    batch_size: int = option(0, "Factored: rows per forward/backward (activation memory grows with it, see the "
                                "printed estimate); 0: auto, up to 8 rows of --max-length tokens whose logits stay "
                                "under 2^24 entries (1 row for a 49k vocabulary). Sparse and dense run one row per "
                                "backward and do not use it.")
    flush_rows: int = option(DEFAULT_FLUSH_ROWS, "Rows per committed part.", flag="flush-every")
    max_length: int = option(DEFAULT_MAX_LENGTH, "Token limit per row.")
    compressor: str = option(DEFAULT_COMPRESSOR, "none, zstd[:L], blosc-lz4[:L], blosc-zstd[:L].")
    shard: tuple[int, int] = option((0, 1), "Build only shard I of N (disjoint by id).")
    objective: str | ObjectiveOptions = option("sft", "What a sketch is the gradient of (a registered objective).")
    norms: str = option(AUTO_NORMS, "grad_norm: exact per-row gradient norms, or (factored only, 1.3x faster) each "
                                    "sketch's norm, unbiased in square; auto: sketch for factored, exact otherwise. The "
                                    "manifest's grad_norm_kind says which.", choices=(AUTO_NORMS, *NORM_MODES))
    compute_dtype: str = option("float32", "Compute dtype the model is loaded in. bfloat16: 1.4x faster factored builds of "
                                   "SmolLM2 on this CPU, sketches within cosine 0.998 of float32; a checkpoint's "
                                   "sketches are all of one dtype (the model fingerprint includes it).", choices=DTYPES)
    block_dtype: str = option("auto", "Factored with --norms sketch: dtype of the block products P_row G P_col^T. "
                                      "bfloat16: 2.5x faster products on CPUs with avx512_bf16 (and on CUDA), sketches "
                                      "within 0.3% of float32; auto: bfloat16 where the device has fast bfloat16 "
                                      "matrix units and norms are sketch, float32 otherwise.", choices=BLOCK_DTYPES)
    memory_limit_gb: float = option(0.0, "GB the build may use beyond the loaded model (0: the memory available now, "
                                         "on CPU); a build estimated to need more is refused before it starts.")

    def __post_init__(self) -> None:
        check_name(self.checkpoint, "checkpoint")
        check_name(self.split, "split")
        if self.batch_size < 0 or self.flush_rows < 1 or self.max_length < 2:
            raise BadInputError("batch size must be >= 0 (0: auto), flush rows >= 1 and max length >= 2")
        if self.compute_dtype not in DTYPES:
            raise BadInputError(f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(DTYPES)}")
        if not self.memory_limit_gb >= 0:
            raise BadInputError(f"memory limit must be >= 0 GB, got {self.memory_limit_gb!r}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise BadInputError(f"invalid shard {index}/{count}: need 0 <= I < N")
        object.__setattr__(self, "objective", objective_options(self.objective))
        if self.norms not in (AUTO_NORMS, *NORM_MODES):
            raise BadInputError(f"unknown gradient norms {self.norms!r}; choose one of {AUTO_NORMS}, {', '.join(NORM_MODES)}")
        if self.norms == AUTO_NORMS:
            object.__setattr__(self, "norms", "sketch" if self.spec.mode == "factored" else "exact")
        if self.norms == "sketch" and self.spec.mode != "factored":
            raise BadInputError("--norms sketch needs --projection factored (per-row gradients give exact norms for free)")
        check_block_dtype(self.block_dtype, self.norms)


@dataclass
class BuildReport:
    total: int
    skipped: int
    added: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.added / self.seconds if self.seconds > 0 else 0.0


def _metadata(row: dict, objective: ObjectiveOptions) -> dict:
    """What the catalog keeps of a row: every key but its id and the objective's payload."""
    return {k: v for k, v in row.items() if k != "id" and k not in objective.payload}


def _rows(config: BuildConfig) -> list[dict]:
    """The rows of this build's shard, as the objective reads them."""
    return [r for r in config.objective.read_rows(config.data, config.columns) if in_shard(r["id"], config.shard)]


def _check_checkpoint_model(store: SketchStore, checkpoint: str, fingerprint: str) -> None:
    table = store.manifest(checkpoint=checkpoint, columns=["model_fingerprint"])
    seen = set(table.column("model_fingerprint").to_pylist()) - {"", None} if table.num_rows else set()
    if seen and fingerprint not in seen:
        raise SpecMismatchError(
            f"checkpoint {checkpoint!r} in the store was built from other weights or another --compute-dtype (fingerprint {sorted(seen)[0]} != {fingerprint})")


def make_sketcher(model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], spec: ProjectionSpec,
                  norms: str = "exact", block_dtype: str = "auto") -> RowSketcher:
    """The row sketcher for ``spec.mode``: factored (factored.py), else per-row gradients and a projector."""
    if spec.mode == "factored":
        return FactoredSketcher(model, params, spec, norms=norms, block_dtype=block_dtype)
    return GradientSketcher(model, params, spec)


def auto_rows_per_pass(model: nn.Module, max_length: int) -> int:
    """The auto factored batch size: at most MAX_AUTO_BATCH rows, logits per pass under AUTO_BATCH_LOGITS."""
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_LOGITS // (vocab * max_length)))


def rows_per_pass(config: BuildConfig, model: nn.Module) -> int:
    """The factored batch size: ``config.batch_size``, or for 0 :func:`auto_rows_per_pass`."""
    return config.batch_size or auto_rows_per_pass(model, config.max_length)


def _check_memory(config: BuildConfig, model: nn.Module, params: Sequence[tuple[str, nn.Parameter]],
                  spec: ProjectionSpec, objective, rows: Sequence[dict], progress: bool) -> None:
    """Estimate the build's memory (budget.py), print it, and refuse a build that cannot fit."""
    estimate = estimate_memory(model, params, spec, objective, rows, rows_per_pass(config, model), config.flush_rows)
    on_cpu = next(model.parameters()).device.type == "cpu"
    limit = int(config.memory_limit_gb * GB) if config.memory_limit_gb else (available_memory() if on_cpu else None)
    if progress:
        tqdm.write(f"estimated memory: {estimate.describe()}" + (f"; limit {limit / GB:.1f} GB" if limit else ""))
    if limit is not None:
        check_fits(estimate, limit)


def _first_batch_clock(bar: tqdm, total: int, progress: bool) -> Callable[[int], None]:
    """The progress callback: updates ``bar`` and, after the first rows, prints the estimated time."""
    start, seen = time.perf_counter(), [0]

    def on_row(n: int) -> None:
        bar.update(n)
        if seen[0] == 0 and progress and total > n:
            seconds = time.perf_counter() - start
            tqdm.write(f"first {n} row(s) in {seconds:.1f} s: about {seconds / n * (total - n) / 60:.1f} min "
                       f"for the {total - n} left")
        seen[0] += n

    return on_row


def build_sketches(config: BuildConfig, progress: bool = True,
                   on_part: Callable[[int], None] | None = None) -> BuildReport:
    """Sketch every row the objective reads (sft: each row of ``config.data``) not yet stored
    under (checkpoint, split)."""
    start = time.perf_counter()
    rows = _rows(config)
    if SketchStore.exists(config.store):  # fail fast, before loading the model
        existing = SketchStore.open(config.store, writable=True).spec
        existing.check_compatible(replace(config.spec, param_hash=existing.param_hash), what=f"sketches for {config.store}")
    model, tokenizer = load_model(config.model, config.device, getattr(torch, config.compute_dtype))
    params = select_parameters(model, config.params)
    spec = replace(config.spec, param_hash=param_spec_hash(parameter_shapes(params)))
    sketcher = make_sketcher(model, params, spec, config.norms, config.block_dtype)
    objective = config.objective.make(tokenizer, config.max_length)
    _check_memory(config, model, params, spec, objective, rows, progress)
    store = SketchStore.open_or_create(config.store, spec, compressor=config.compressor)
    fingerprint = model_fingerprint(params)
    _check_checkpoint_model(store, config.checkpoint, fingerprint)
    done = store.existing_ids(config.checkpoint, config.split)
    todo = [r for r in rows if r["id"] not in done]
    report = BuildReport(total=len(rows), skipped=len(rows) - len(todo), added=0, seconds=0.0)
    how = {GRAD_NORM_KIND: config.norms}  # per row in the manifest, and in each part's source
    if isinstance(sketcher, FactoredSketcher):
        how[BLOCK_DTYPE] = str(sketcher.block_dtype).removeprefix("torch.")
    source = {"model": str(config.model), "fingerprint": fingerprint, "objective": objective.name, **how}
    batch_size = rows_per_pass(config, model)
    bar = tqdm(total=len(todo), desc=f"sketch {config.checkpoint}:{config.split}", unit="row", disable=not progress)
    on_row = _first_batch_clock(bar, len(todo), progress)
    for lo in range(0, len(todo), config.flush_rows):
        group = todo[lo:lo + config.flush_rows]
        done_rows = sketcher.sketch_rows(objective, group, batch_size, on_row=on_row)
        batch = SketchBatch(ids=[r["id"] for r in group], sketches=done_rows.sketches, grad_norms=done_rows.grad_norms,
                            n_tokens=done_rows.n_tokens, metadata=[{**_metadata(r, config.objective), **how} for r in group])
        added = store.append(config.checkpoint, config.split, batch, source=source)
        report.added += added
        if on_part is not None:
            on_part(added)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


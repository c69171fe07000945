"""Random projection of per-example gradients into k-dimensional sketches.

A gradient is a collection of *named* parameter tensors, each with a leading batch
dimension ``B`` (one row per example). It is never concatenated into one long vector:
every parameter is projected on its own, with randomness seeded from
``stable_seed(spec.seed, name, numel, ...)``, and the sketch is the float32 sum of the
per-parameter contributions taken in sorted-name order. Hence

* the projection of a parameter depends only on (seed, name, numel, dim, keep_ratio);
  nothing has to be saved to reproduce it in another process;
* the order in which parameters are given does not matter (bit-identical sketches);
* projecting a subset of parameters gives exactly that subset's contributions, so
  ``project({a, b}) == project({a}) + project({b})`` in float32 (for two parameters
  bit-for-bit; for more, the same left-to-right sum in sorted-name order).

Drop (``keep_ratio`` < 1, as in CROPI, arXiv 2510.26491): every coordinate of a
parameter is kept independently with probability ``keep_ratio`` (a seeded Bernoulli
mask, see :func:`kept_indices`), only kept coordinates are projected, and the
contribution is scaled by ``1/sqrt(keep_ratio)`` so inner products stay unbiased.

Scaling convention: both modes are unbiased for inner products,
``E[<P x, P y>] = <x, y>`` (sparse: entries +-1, one per input coordinate; dense:
entries N(0, 1/k)). Norms and inner products of sketches are therefore directly
comparable with those of the full gradients, and sparse and dense sketches of the
same gradient have the same scale (but are of course different sketches).

Sparse mode design (``SparseProjector``) -- a CountSketch:
coordinate ``i`` of a parameter goes to bucket ``h(i)`` in ``[0, k)`` with sign
``s(i)``, both drawn i.i.d. uniform from a ``torch.Generator`` seeded per
(parameter, hash block of 2**20 coordinates). The pair is stored as one small integer
``h(i) + k * [s(i) < 0]`` (int16 for k <= 16383, else int32, i.e. 2 bytes per
coordinate), and the projection is a single ``index_add_`` of the raw float32 values
into a (B, 2k) accumulator followed by ``acc[:, :k] - acc[:, k:]``: the signs cost no
multiply pass and no extra memory traffic. Inputs in fp16/bf16/fp64 are cast to float32
chunk by chunk (at most 2**22 values) and accumulated in float32. Each example row is
accumulated independently in a fixed order, so a row's sketch does not depend on the
batch it was in, nor on the thread count.

Why not a cheaper "fold" (bucket = i mod k with random signs, a reshape-and-sum that
ran ~2x faster in the benchmark: 3.2e9 vs 1.6e9 coordinates/s)? Its estimates are unbiased but
its collisions are deterministic, and transformer weight gradients are structured:
row-major (out, in) matrices whose per-example gradient is a sum of outer products, with
a few input features (columns) carrying most of the energy ("massive activations").
Whenever ``in`` shares a large power of two with k, a whole column folds onto a handful
of buckets. The variance of a CountSketch inner product is
sum_{i != j} P[h(i) = h(j)] (x_i^2 y_j^2 + x_i y_i x_j y_j): only pairwise collision
probabilities matter, and fully random buckets make every pair collide with probability
exactly 1/k, whatever the structure of the gradient. Measured (benchmarks/README.md)
on gradients of a small Qwen2 with one 30x hidden feature: mean cosine error of the
fold 0.0145 vs 0.0086 for the random CountSketch at k = 8192 (1.7x; 3.3x with
hidden 64, k = 1024), while on plain gradients both sit at the dense Gaussian's
~0.008. The random CountSketch reaches ~1.6e9 coordinates/s at k = 8192 on 2 CPU cores
(batch 8, fp32 or bf16; 2.7e9 input coordinates/s at keep_ratio 0.1; 8e8 with one
example per call), 3x the 5e8 target, so the honest design costs little.

Memory: the bucket codes of each hash block are kept in an LRU cache bounded by
``cache_bytes`` (default 128 MiB, or ``$SKETCHSTORE_PROJECTION_CACHE_BYTES``); at 2 bytes
per kept coordinate that keeps models of up to ~64M parameters fully cached (kept-coordinate
positions add 4 bytes per kept coordinate when keep_ratio < 1). A miss regenerates the block
(~4 ms per 2**20 coordinates). Larger models are not worth caching: for SmolLM2-135M the codes
would be 0.25 GiB (half the fp32 model) while regenerating them is a few percent of a row's
forward/backward (benchmarks/README.md, real_model.py: 0.176 rows/s uncached vs 0.146 cached
on one busy thread, peak RSS 2.07 vs 2.35 GiB). Temporary memory: each
projector thread keeps a reusable scratch of at most 32 MB (float32 values for the cast
or gather, int64 bucket codes and positions; ~4-8 MB at B = 8), plus one (rows, 2k)
float32 accumulator per hash block in flight; batches of more than 64 rows are processed in groups of 64.
Non-contiguous inputs are copied (one row group of one parameter at a time).

Threads: on CPU the work runs in the projector's own threads -- a driver that sums
the contributions in order and ``num_threads`` workers that process hash blocks --
each running torch ops with ONE intra-op thread (see ``_single_threaded_pool``).
OpenMP parallel regions wait for all their threads, so when the cores are shared with
other processes every small parallel op can stall for a scheduler tick; independent
single-threaded workers do not (on this 2-core machine, with other jobs running:
~9e8 vs ~8e7 coordinates/s). Results never depend on the number of threads. On CUDA tensors the code runs on the device, but ``index_add_`` then
uses atomics, so sketches are deterministic only up to float32 rounding there.

Dense mode (``DenseGaussianProjector``): the TRAK-style reference. N(0, 1/k) rows are
generated block by block (256 input coordinates at a time, seeded per (parameter,
block)) and multiplied in; the whole D x k matrix never exists. It is exact in
distribution and very slow (~2e8 normals/s to generate, i.e. k normals per
coordinate).
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import BadInputError
from .seeds import stable_seed
from .spec import ProjectionSpec

__all__ = [
    "Projector",
    "SparseProjector",
    "DenseGaussianProjector",
    "make_projector",
    "kept_indices",
    "HASH_BLOCK",
    "DENSE_BLOCK",
]

#: Coordinates per seeded hash block. Part of the definition of a sketch: changing it
#: changes every sketch (as does changing the RNG calls below).
HASH_BLOCK = 1 << 20
#: Input coordinates per seeded block of the dense Gaussian matrix (divides HASH_BLOCK).
DENSE_BLOCK = 256
#: Most coordinates per index_add_ call, and most (rows x coordinates) values per call.
#: Cache locality and temporary memory only; they do not change any result.
_CHUNK = 1 << 20
_CHUNK_VALUES = 1 << 22
#: Largest number of example rows processed at once (bounds temporary memory).
_MAX_ROWS = 64
_DEFAULT_CACHE_BYTES = 128 << 20
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _keep_mask_block(seed: int, name: str, numel: int, keep_ratio: float, block: int) -> torch.Tensor:
    """Local positions (int64, sorted) kept in hash block ``block`` of a parameter."""
    start = block * HASH_BLOCK
    n = min(HASH_BLOCK, numel - start)
    gen = torch.Generator().manual_seed(stable_seed(seed, name, numel, float(keep_ratio), "keep", block))
    return torch.nonzero(torch.rand(n, generator=gen) < keep_ratio).squeeze(1)


def kept_indices(seed: int, name: str, numel: int, keep_ratio: float) -> torch.Tensor | None:
    """Flat indices (int64, sorted) of the coordinates of parameter ``name`` that survive
    the drop, or ``None`` when ``keep_ratio == 1`` (everything is kept).

    Each coordinate is kept independently with probability ``keep_ratio``; the mask is
    seeded from (seed, name, numel, keep_ratio) per block of ``HASH_BLOCK`` coordinates.
    """
    keep_ratio = float(keep_ratio)
    if not 0.0 < keep_ratio <= 1.0:
        raise BadInputError(f"keep ratio must be in (0, 1], got {keep_ratio!r}")
    if numel < 0:
        raise BadInputError(f"numel of parameter {name!r} must be >= 0, got {numel!r}")
    if keep_ratio == 1.0:
        return None
    parts = [
        _keep_mask_block(seed, name, numel, keep_ratio, b) + b * HASH_BLOCK
        for b in range(-(-numel // HASH_BLOCK))
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class _LRU:
    """Thread-safe LRU cache bounded by the total bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(value: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in value if t is not None)

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._data.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        size = self._size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= self._size(old)
            self._data[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._data.popitem(last=False)
                self.bytes -= self._size(dropped)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0


def _iter_grads(grads) -> list[tuple[str, torch.Tensor]]:
    if isinstance(grads, Mapping):
        items = list(grads.items())
    elif isinstance(grads, torch.Tensor) or isinstance(grads, (str, bytes)):
        raise BadInputError(
            "gradients must be a mapping or an iterable of (name, tensor) pairs, got a single "
            + type(grads).__name__
        )
    elif isinstance(grads, Iterable):
        items = []
        for pos, item in enumerate(grads):
            if not (isinstance(item, tuple) and len(item) == 2) and not (
                isinstance(item, list) and len(item) == 2
            ):
                raise BadInputError(f"gradient item #{pos} is not a (name, tensor) pair: {type(item).__name__}")
            items.append((item[0], item[1]))
    else:
        raise BadInputError(
            f"gradients must be a mapping or an iterable of (name, tensor) pairs, got {type(grads).__name__}"
        )
    return items


def _validate(grads) -> tuple[list[tuple[str, torch.Tensor]], int, torch.device]:
    """Sorted (name, tensor) pairs, the batch size and the device, or BadInputError."""
    items = _iter_grads(grads)
    if not items:
        raise BadInputError("no gradient tensors given (empty mapping)")
    seen: set[str] = set()
    batch, first, device = None, None, None
    for name, tensor in items:
        if not isinstance(name, str) or not name:
            raise BadInputError(f"parameter names must be non-empty strings, got {name!r}")
        if name in seen:
            raise BadInputError(f"parameter {name!r} is given twice")
        seen.add(name)
        if not isinstance(tensor, torch.Tensor):
            raise BadInputError(f"gradient of parameter {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise BadInputError(
                f"gradient of parameter {name!r} has dtype {tensor.dtype}; expected float16, bfloat16, float32 or float64"
            )
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise BadInputError(f"gradient of parameter {name!r} must be a dense (strided) tensor")
        if tensor.dim() < 1:
            raise BadInputError(
                f"gradient of parameter {name!r} has no batch dimension (shape {tuple(tensor.shape)}); "
                "expected (B, *param_shape)"
            )
        if batch is None:
            batch, first, device = tensor.shape[0], name, tensor.device
        elif tensor.shape[0] != batch:
            raise BadInputError(
                f"gradient of parameter {name!r} has batch size {tensor.shape[0]} (shape {tuple(tensor.shape)}) "
                f"but {first!r} has {batch}; every tensor needs the same leading batch dimension"
            )
        elif tensor.device != device:
            raise BadInputError(f"gradient of parameter {name!r} is on {tensor.device} but {first!r} is on {device}")
    if batch == 0:
        raise BadInputError(f"gradient of parameter {first!r} has batch size 0")
    items.sort(key=lambda kv: kv[0])
    return items, int(batch), device


_POOL_LOCK = threading.Lock()


def _single_threaded_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch ops with ONE intra-op thread each.

    torch's intra-op thread count is per OS thread once initialised (OpenMP ICV). The
    global value is set to 1 only while the new threads initialise, then restored, so
    the rest of the process is unaffected. Why: an OpenMP parallel region waits for all
    of its threads, so on a machine whose cores are shared with other processes every
    small op can stall for a scheduler tick; single-threaded ops in independent worker
    threads do not (measured ~8x faster under contention, equal when the machine is idle).
    """
    with _POOL_LOCK:
        old = torch.get_num_threads()
        ready = threading.Barrier(workers + 1)

        def init() -> None:
            torch.get_num_threads()  # initialises this thread's intra-op count (now 1)
            ready.wait()

        torch.set_num_threads(1)
        try:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=init)
            for _ in range(workers):
                pool.submit(int)
            ready.wait(timeout=60)
        finally:
            torch.set_num_threads(old)
    return pool


class Projector:
    """Maps per-example gradients to (B, spec.dim) float32 sketches.

    ``project`` accepts a mapping name -> tensor or an iterable of (name, tensor); each
    tensor has shape (B, *param_shape) with the same B. Parameters are processed in
    sorted-name order and summed in float32.
    """

    spec: ProjectionSpec

    def __init__(self, spec: ProjectionSpec) -> None:
        if not isinstance(spec, ProjectionSpec):
            raise BadInputError(f"expected a ProjectionSpec, got {type(spec).__name__}")
        self.spec = spec
        self.dim = spec.dim
        self.keep_ratio = float(spec.keep_ratio)
        # Applied to each parameter's contribution so inner products stay unbiased.
        self.drop_scale = 1.0 if self.keep_ratio == 1.0 else 1.0 / math.sqrt(self.keep_ratio)

    def project(self, grads) -> torch.Tensor:
        """grads: Mapping[str, Tensor] or iterable of (name, Tensor); each tensor has a leading
        batch dim B: shape (B, *param_shape). Returns (B, spec.dim) float32 sketches."""
        items, batch, device = _validate(grads)
        return self._project_items(items, batch, device)

    def _project_items(self, items, batch: int, device) -> torch.Tensor:
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for r0 in range(0, batch, _MAX_ROWS):
            rows = [(name, t[r0 : r0 + _MAX_ROWS]) for name, t in items]
            for contrib in self._contributions(rows):
                out[r0 : r0 + contrib.shape[0]] += contrib
        return out

    __call__ = project

    def project_param(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The (B, dim) contribution of a single parameter (what ``project`` sums)."""
        return self.project({name: grad})

    def _contributions(self, items: list[tuple[str, torch.Tensor]]):
        """Yield each parameter's (rows, dim) float32 contribution, in the order given."""
        raise NotImplementedError

    def _kept_block(self, name: str, numel: int, block: int) -> torch.Tensor | None:
        if self.keep_ratio == 1.0:
            return None
        return _keep_mask_block(self.spec.seed, name, numel, self.keep_ratio, block)


def _flat_rows(tensor: torch.Tensor) -> torch.Tensor:
    rows = tensor.shape[0]
    if tensor.is_contiguous():
        return tensor.view(rows, -1)
    return tensor.reshape(rows, -1)  # copies at most _MAX_ROWS rows of one parameter


class SparseProjector(Projector):
    """CountSketch with seeded random buckets and signs (see the module docstring).

    cache_bytes: bound of the in-memory LRU cache of per-block bucket codes (default
    ``$SKETCHSTORE_PROJECTION_CACHE_BYTES`` or 128 MiB; 0 disables caching).
    num_threads: worker threads (default ``torch.get_num_threads()`` at construction);
    each runs torch ops single-threaded. Results do not depend on it.
    """

    def __init__(self, spec: ProjectionSpec, cache_bytes: int | None = None, num_threads: int | None = None) -> None:
        super().__init__(spec)
        if spec.mode != "sparse":
            raise BadInputError(f"SparseProjector needs mode 'sparse', got {spec.mode!r}")
        if cache_bytes is None:
            env = os.environ.get("SKETCHSTORE_PROJECTION_CACHE_BYTES")
            try:
                cache_bytes = int(env) if env else _DEFAULT_CACHE_BYTES
            except ValueError:
                raise BadInputError(f"SKETCHSTORE_PROJECTION_CACHE_BYTES must be an integer, got {env!r}") from None
        if cache_bytes < 0:
            raise BadInputError(f"cache_bytes must be >= 0, got {cache_bytes!r}")
        self.cache = _LRU(cache_bytes)
        self.num_threads = int(num_threads) if num_threads else torch.get_num_threads()
        self._code_dtype = torch.int16 if 2 * spec.dim <= torch.iinfo(torch.int16).max + 1 else torch.int32
        self._pools: tuple[int, ThreadPoolExecutor, ThreadPoolExecutor | None] | None = None
        self._local = threading.local()  # per-thread scratch buffers (~32 MB each once used)

    def _codes(self, name: str, numel: int, block: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(kept local positions or None, bucket codes h + k*[sign<0]) for one hash block."""
        key = (name, numel, block)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        kept = self._kept_block(name, numel, block)
        n = min(HASH_BLOCK, numel - block * HASH_BLOCK) if kept is None else kept.numel()
        gen = torch.Generator().manual_seed(
            stable_seed(self.spec.seed, name, numel, self.dim, self.keep_ratio, "bucket", block)
        )
        codes = torch.randint(0, 2 * self.dim, (n,), generator=gen, dtype=self._code_dtype)
        value = (None if kept is None else kept.to(torch.int32), codes)
        self.cache.put(key, value)
        return value

    def _scratch(self, rows: int, cols: int, device: torch.device):
        """Per-thread reusable buffers (grown on demand, never per chunk): int64 bucket
        codes, int64 positions, float32 values (at most ~_CHUNK_VALUES + 2 * _CHUNK)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf[2].device != device or buf[0].numel() < cols or buf[2].numel() < rows * cols:
            n_idx = max(cols, 0 if buf is None else buf[0].numel())
            n_val = max(rows * cols, 0 if buf is None else buf[2].numel())
            buf = self._local.buf = (
                torch.empty(n_idx, dtype=torch.int64, device=device),
                torch.empty(n_idx, dtype=torch.int64, device=device),
                torch.empty(n_val, dtype=torch.float32, device=device),
            )
        return buf[0][:cols], buf[1][:cols], buf[2][: rows * cols].view(rows, cols)

    @property
    def accumulator_width(self) -> int:
        """Columns of the accumulator of :meth:`accumulate`: bucket sums of the positive-sign
        entries, then of the negative ones (:meth:`finish` subtracts them)."""
        return 2 * self.dim

    def accumulate(self, acc: torch.Tensor, name: str, grad: torch.Tensor) -> None:
        """acc (B, 2 dim) += parameter ``name``'s rows ``grad`` (B, *shape) hashed to their
        buckets, on the calling thread: for many small calls (a factored build's blocks, one per
        hook), finished once by :meth:`finish`."""
        flat = _flat_rows(grad)
        numel = flat.shape[1]
        for block in range(-(-numel // HASH_BLOCK)):
            self._block_acc(name, flat, numel, block, acc)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """The (B, dim) sketches of an accumulator filled by :meth:`accumulate`."""
        return self._finish(acc)

    def _block_acc(self, name: str, flat: torch.Tensor, numel: int, block: int,
                   acc: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, 2k) float32 accumulator of one hash block of one parameter (added into ``acc``)."""
        rows = flat.shape[0]
        kept, codes = self._codes(name, numel, block)
        start = block * HASH_BLOCK
        stop = min(numel, start + HASH_BLOCK)
        if acc is None:
            acc = torch.zeros(rows, 2 * self.dim, dtype=torch.float32, device=flat.device)
        seg = flat[:, start:stop]
        n = seg.shape[1] if kept is None else kept.numel()
        # rows x cols <= _CHUNK_VALUES values per chunk (16 MB of float32): bounded memory.
        step = max(1 << 12, min(_CHUNK, _CHUNK_VALUES // rows))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            idx, pos, val = self._scratch(rows, c1 - c0, flat.device)
            idx.copy_(codes[c0:c1])
            if kept is not None:  # gather this chunk's kept coordinates (sorted positions)
                pos.copy_(kept[c0:c1])
                if seg.dtype == torch.float32:
                    src = torch.gather(seg, 1, pos.expand(rows, -1), out=val)
                else:
                    src = val.copy_(torch.gather(seg, 1, pos.expand(rows, -1)))
            elif seg.dtype == torch.float32:
                src = seg[:, c0:c1]  # index_add_ reads the input in place
            else:
                src = val.copy_(seg[:, c0:c1])  # fp16/bf16/fp64 -> float32, chunk by chunk
            acc.index_add_(1, idx, src)
        return acc

    def _finish(self, acc: torch.Tensor) -> torch.Tensor:
        k = self.dim
        contrib = acc[:, :k] - acc[:, k:]
        if self.drop_scale != 1.0:
            contrib.mul_(self.drop_scale)
        return contrib

    def _get_pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor | None]:
        """(driver, workers): single-threaded pools, re-created after a fork."""
        pools = self._pools
        if pools is None or pools[0] != os.getpid():
            driver = _single_threaded_pool(1, "sketch-proj-driver")
            workers = _single_threaded_pool(self.num_threads, "sketch-proj") if self.num_threads > 1 else None
            pools = self._pools = (os.getpid(), driver, workers)
        return pools[1], pools[2]

    def _project_items(self, items, batch: int, device) -> torch.Tensor:
        if device.type != "cpu":  # accelerators: no CPU threading games
            return super()._project_items(items, batch, device)
        driver, _ = self._get_pools()
        return driver.submit(super()._project_items, items, batch, device).result()

    def _contributions(self, items):
        """Runs on the driver thread; hash blocks go to the worker threads."""
        units = []  # (param position, hash block) in sorted-name order
        flats = []
        for pos, (name, tensor) in enumerate(items):
            flat = _flat_rows(tensor)
            numel = flat.shape[1]
            flats.append((name, flat, numel))
            units.extend((pos, b) for b in range(max(1, -(-numel // HASH_BLOCK))))
        rows = items[0][1].shape[0]

        def run_unit(unit):
            pos, block = unit
            name, flat, numel = flats[pos]
            if numel == 0:
                return torch.zeros(rows, 2 * self.dim, dtype=torch.float32, device=flat.device)
            return self._block_acc(name, flat, numel, block)

        # worker pool (created by _project_items on the calling thread; never from here)
        pool = self._pools[2] if self._pools is not None and flats[0][1].device.type == "cpu" else None
        if pool is not None and len(units) > 1:
            # group consecutive small units so each task amortises its Python overhead
            sizes = [rows * min(HASH_BLOCK, flats[pos][2] - b * HASH_BLOCK) for pos, b in units]
            target = max(1 << 18, min(1 << 22, sum(sizes) // (4 * self.num_threads)))
            tasks, group, filled = [], [], 0
            for unit, size in zip(units, sizes):
                group.append(unit)
                filled += size
                if filled >= target:
                    tasks.append(group)
                    group, filled = [], 0
            if group:
                tasks.append(group)
            results = (
                acc
                for accs in self._ordered_map(pool, lambda g: [run_unit(u) for u in g], tasks)
                for acc in accs
            )
        else:
            results = (run_unit(u) for u in units)
        acc, current = None, None
        for (pos, _block), block_acc in zip(units, results):
            if pos != current:
                if acc is not None:
                    yield self._finish(acc)
                acc, current = block_acc, pos
            else:
                acc += block_acc
        if acc is not None:
            yield self._finish(acc)

    def _ordered_map(self, pool: ThreadPoolExecutor, fn, tasks):
        """Results of fn over tasks (run in ``pool``), in order, at most 2*workers in flight."""
        window = 2 * self.num_threads
        pending = []
        it = iter(tasks)
        for task in it:
            pending.append(pool.submit(fn, task))
            if len(pending) >= window:
                break
        try:
            while pending:
                head = pending.pop(0)
                for task in it:
                    pending.append(pool.submit(fn, task))
                    break
                yield head.result()
        finally:
            for fut in pending:  # an error or an abandoned generator: drop queued work
                fut.cancel()

    def __del__(self) -> None:
        pools = getattr(self, "_pools", None)
        if pools is not None and pools[0] == os.getpid():
            for pool in pools[1:]:
                if pool is not None:
                    pool.shutdown(wait=False)


class DenseGaussianProjector(Projector):
    """TRAK-style dense Gaussian projection: entries N(0, 1/k), generated in blocks of
    ``DENSE_BLOCK`` input coordinates seeded per (seed, parameter, block). Slow reference."""

    def __init__(self, spec: ProjectionSpec) -> None:
        super().__init__(spec)
        if spec.mode != "dense":
            raise BadInputError(f"DenseGaussianProjector needs mode 'dense', got {spec.mode!r}")

    def _contributions(self, items):
        k = self.dim
        scale = self.drop_scale / math.sqrt(k)
        for name, tensor in items:
            flat = _flat_rows(tensor)
            rows, numel = flat.shape
            out = torch.zeros(rows, k, dtype=torch.float32, device=flat.device)
            for hblock in range(-(-numel // HASH_BLOCK)):
                start = hblock * HASH_BLOCK
                stop = min(numel, start + HASH_BLOCK)
                kept = self._kept_block(name, numel, hblock)
                for b0 in range(start, stop, DENSE_BLOCK):
                    b1 = min(stop, b0 + DENSE_BLOCK)
                    if kept is None:
                        seg = flat[:, b0:b1]
                    else:
                        lo, hi = torch.searchsorted(kept, torch.tensor([b0 - start, b1 - start])).tolist()
                        if hi == lo:
                            continue
                        seg = flat[:, start:stop][:, kept[lo:hi].to(flat.device)]
                    gen = torch.Generator().manual_seed(
                        stable_seed(self.spec.seed, name, numel, k, self.keep_ratio, "dense", b0 // DENSE_BLOCK)
                    )
                    gauss = torch.randn(seg.shape[1], k, generator=gen, dtype=torch.float32)
                    out.addmm_(seg.float(), gauss.to(flat.device))
            out.mul_(scale)
            yield out


def make_projector(spec: ProjectionSpec, **kwargs) -> Projector:
    """The projector for ``spec.mode`` (extra keyword arguments go to SparseProjector)."""
    if not isinstance(spec, ProjectionSpec):
        raise BadInputError(f"expected a ProjectionSpec, got {type(spec).__name__}")
    if spec.mode == "sparse":
        return SparseProjector(spec, **kwargs)
    if spec.mode == "dense":
        if kwargs:
            raise BadInputError(f"dense projector takes no options, got {sorted(kwargs)}")
        return DenseGaussianProjector(spec)
    if spec.mode == "factored":
        raise BadInputError("projection mode 'factored' is computed by sketchstore.factored.FactoredSketcher, not make_projector")
    raise BadInputError(f"unknown projection mode {spec.mode!r}")

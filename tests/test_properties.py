"""Property-based checks (hypothesis): projections are functions of (spec, parameter names, values)
only, and any sequence of appends reads back as stored, with the first writer of a key winning."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sketchstore.projection import make_projector
from sketchstore.spec import ProjectionSpec
from sketchstore.store import SketchBatch, SketchStore
from sketchstore.verify import verify

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-6}
ID_POOL = [f"id-{i}" for i in range(12)] + ["ünï cødé", "with space", "a/b", "'quote'"]

shapes = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 6)), min_size=2, max_size=4)


def grads(seed: int, batch: int, dims) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(batch, *shape, generator=gen) for i, shape in enumerate(dims)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), batch=st.integers(1, 4), dims=shapes, k=st.sampled_from([4, 33]),
       mode=st.sampled_from(["sparse", "dense"]), keep=st.sampled_from([1.0, 0.5]))
def test_projection_is_deterministic_additive_and_row_wise(seed, batch, dims, k, mode, keep):
    spec = ProjectionSpec(dim=k, seed=seed % 101, mode=mode, keep_ratio=keep)
    x = grads(seed, batch, dims)
    whole = make_projector(spec).project(x)
    assert torch.equal(whole, make_projector(spec).project(dict(reversed(list(x.items())))))  # fresh projector, any order
    names = list(x)
    parts = make_projector(spec).project({n: x[n] for n in names[:1]}) + make_projector(spec).project(
        {n: x[n] for n in names[1:]})
    assert torch.allclose(whole, parts, atol=1e-5)  # a parameter subset gives exactly its share
    for row in range(batch):  # each row's sketch depends on that row only
        alone = make_projector(spec).project({n: v[row:row + 1] for n, v in x.items()})
        assert torch.allclose(whole[row:row + 1], alone, atol=1e-6)


metadata_value = st.one_of(st.none(), st.integers(-5, 5), st.floats(-1, 1, allow_nan=False), st.text(max_size=4))
batches = st.lists(st.lists(st.sampled_from(ID_POOL), min_size=1, max_size=8, unique=True), min_size=1, max_size=4)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 24), dtype=st.sampled_from(list(TOLERANCE)), chunk_rows=st.integers(1, 5),
       compressor=st.sampled_from(["none", "zstd", "blosc-lz4"]), splits=batches, seed=st.integers(0, 2**16),
       meta=st.dictionaries(st.sampled_from(["difficulty", "source", "row"]), metadata_value, max_size=3))
def test_appends_round_trip_and_first_writer_wins(dim, dtype, chunk_rows, compressor, splits, seed, meta):
    gen = torch.Generator().manual_seed(seed)
    first: dict[str, torch.Tensor] = {}
    first_meta: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SketchStore.create(Path(tmp) / "s", ProjectionSpec(dim=dim, dtype=dtype), compressor=compressor,
                                   chunk_rows=chunk_rows)
        for number, ids in enumerate(splits):
            x = torch.randn(len(ids), dim, generator=gen) * 10.0 ** (number - 1)
            rows_meta = [{**meta, "batch": number} for _ in ids]
            fresh = [i for i in ids if i not in first]
            added = store.append("c0", "train", SketchBatch(ids, x, x.norm(dim=1).tolist(), [number] * len(ids), rows_meta))
            assert added == len(fresh)
            for key, row, m in zip(ids, x, rows_meta):
                first.setdefault(key, row)
                first_meta.setdefault(key, m)
        ids, got = store.read("c0", "train")
        assert sorted(ids) == sorted(first)
        want = torch.stack([first[key] for key in ids])
        error = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
        assert float(error.max()) <= TOLERANCE[dtype]
        manifest = store.manifest().to_pylist()
        assert len(manifest) == len(first) and {r["id"] for r in manifest} == set(first)
        assert {r["part"] for r in manifest} <= set(store.part_names())
        for r in manifest:
            assert r["batch"] == first_meta[r["id"]]["batch"] and r["n_tokens"] == r["batch"]
            assert 0 <= r["row"] < store.open_part(r["part"]).shape[0]
        assert verify(store) == []

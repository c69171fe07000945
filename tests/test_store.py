"""The Zarr store: spec checks, append-only parts, resume, concurrent writers, crashes, corruption."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from sketchstore.errors import BadInputError, CorruptDataError, SpecMismatchError, StoreNotFoundError, UnknownKeyError
from sketchstore.spec import ProjectionSpec
from sketchstore.store import PARTS_DIR, STAGING_DIR, SketchBatch, SketchStore

DIM = 64


def batch(ids, seed=0, dim=DIM, metadata=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(ids), dim, generator=gen)
    return SketchBatch(ids=list(ids), sketches=x, grad_norms=x.norm(dim=1).tolist(), n_tokens=[7] * len(ids),
                       metadata=metadata or [])


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_create_records_spec_and_reopen_checks_it(tmp_path):
    spec = ProjectionSpec(dim=DIM, seed=3, keep_ratio=0.5, param_hash="abc")
    SketchStore.create(tmp_path / "s", spec, compressor="zstd:3", chunk_rows=16)
    reopened = SketchStore.open(tmp_path / "s")
    assert reopened.spec == spec
    assert reopened.info.compressor == "zstd:3" and reopened.info.chunk_rows == 16
    with pytest.raises(SpecMismatchError, match=r"seed 4 != store 3"):
        SketchStore.open_or_create(tmp_path / "s", ProjectionSpec(dim=DIM, seed=4, keep_ratio=0.5, param_hash="abc"))
    with pytest.raises(SpecMismatchError, match=r"dim 32 != store 64"):
        SketchStore.open_or_create(tmp_path / "s", ProjectionSpec(dim=32, seed=3, keep_ratio=0.5, param_hash="abc"))


def test_not_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="not found"):
        SketchStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(StoreNotFoundError, match="not a sketch store"):
        SketchStore.open(tmp_path / "plain")
    with pytest.raises(StoreNotFoundError, match="not an empty directory"):
        SketchStore.create(tmp_path / "plain", ProjectionSpec(dim=DIM))
    assert (tmp_path / "plain" / "file.txt").read_text() == "x"


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1e-2), ("float32", 1e-6)])
@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc-lz4", "blosc-zstd:3"])
def test_round_trip(tmp_path, dtype, tol, compressor):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM, dtype=dtype), compressor=compressor, chunk_rows=4)
    b = batch([f"p{i}" for i in range(10)])
    assert store.append("c0", "train", b) == 10
    ids, x = store.read("c0", "train")
    assert ids == b.ids
    error = (x - b.sketches).norm(dim=1) / b.sketches.norm(dim=1)
    assert error.max() < tol, error.max()


def test_append_only_and_resume(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM), chunk_rows=4)
    store.append("c0", "train", batch([f"p{i}" for i in range(10)], seed=1))
    before = tree_digest(tmp_path / "s" / PARTS_DIR)
    added = store.append("c0", "train", batch([f"p{i}" for i in range(5, 15)], seed=2))
    assert added == 5  # p5..p9 were already stored
    after = tree_digest(tmp_path / "s" / PARTS_DIR)
    assert all(after[k] == v for k, v in before.items()), "an append rewrote existing files"
    assert store.append("c1", "train", batch(["p0"], seed=3)) == 1  # another checkpoint, same id
    ids, x = store.read("c0", "train")
    assert sorted(ids) == sorted(f"p{i}" for i in range(15))
    first = batch([f"p{i}" for i in range(10)], seed=1).sketches
    assert torch.allclose(x[ids.index("p7")], first[7], atol=1e-2)  # the first writer's row wins
    assert store.keys() == [("c0", "train", 15), ("c1", "train", 1)]


def test_unknown_checkpoint_and_ids(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM))
    store.append("c0", "train", batch(["a", "b"]))
    with pytest.raises(UnknownKeyError, match=r"c9:train.*stored: c0:train"):
        store.read("c9", "train")
    with pytest.raises(UnknownKeyError, match="'zz'"):
        store.read("c0", "train", ids=["a", "zz"])


def test_bad_batch_shape_is_refused_and_store_unchanged(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM))
    store.append("c0", "train", batch(["a"]))
    before = tree_digest(tmp_path / "s")
    with pytest.raises(SpecMismatchError, match=r"shape \(2, 32\), expected \(2, 64\)"):
        store.append("c0", "train", batch(["b", "c"], dim=32))
    assert tree_digest(tmp_path / "s") == before


def _writer(path, ids, seed):
    store = SketchStore.open(path, writable=True)
    for lo in range(0, len(ids), 7):
        store.append("c0", "train", batch(ids[lo:lo + 7], seed=seed + lo))


@pytest.mark.parametrize("writers", [2, 4])
def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path, writers):
    path = tmp_path / "s"
    SketchStore.create(path, ProjectionSpec(dim=DIM), chunk_rows=8)
    every = [f"p{i}" for i in range(60)]
    ctx = mp.get_context("spawn")
    # writers overlap: each takes a window of 40 ids, so most keys are contended
    procs = [ctx.Process(target=_writer, args=(str(path), every[(w * 7) % 20:(w * 7) % 20 + 40], w * 1000))
             for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = SketchStore.open(path)
    manifest = store.manifest(columns=["id"])
    ids = manifest.column("id").to_pylist()
    expected = set().union(*(every[(w * 7) % 20:(w * 7) % 20 + 40] for w in range(writers)))
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert set(ids) == expected, "lost rows"
    got_ids, x = store.read("c0", "train")
    assert x.shape == (len(expected), DIM) and torch.isfinite(x).all()


def _crashing_writer(path):
    store = SketchStore.open(path, writable=True)
    real_rename = os.rename

    def die_before_commit(src, dst):
        if STAGING_DIR in str(src):
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)

    os.rename = die_before_commit
    store.append("c0", "train", batch(["x1", "x2", "x3"], seed=9))


def test_crash_mid_write_leaves_no_half_rows(tmp_path):
    path = tmp_path / "s"
    store = SketchStore.create(path, ProjectionSpec(dim=DIM))
    store.append("c0", "train", batch(["a", "b"]))
    proc = mp.get_context("spawn").Process(target=_crashing_writer, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    assert any((path / STAGING_DIR).iterdir()), "the crash should have happened after data was staged"
    ids, x = SketchStore.open(path).read("c0", "train")
    assert ids == ["a", "b"]
    # resuming writes the rows that were lost
    assert SketchStore.open(path, writable=True).append("c0", "train", batch(["x1", "x2", "x3"], seed=9)) == 3


def _chunk_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / PARTS_DIR).rglob("c/*/*") if p.is_file())


def test_corrupt_chunk_is_detected_and_named(tmp_path):
    path = tmp_path / "s"
    store = SketchStore.create(path, ProjectionSpec(dim=DIM), chunk_rows=4)
    store.append("c0", "train", batch([f"p{i}" for i in range(12)]))
    chunk = _chunk_files(path)[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    part = chunk.relative_to(path / PARTS_DIR).parts[0]
    with pytest.raises(CorruptDataError, match=rf"part {part}.*chunk 1"):
        store.read("c0", "train")


def test_truncated_and_missing_chunks_are_detected(tmp_path):
    path = tmp_path / "s"
    store = SketchStore.create(path, ProjectionSpec(dim=DIM), chunk_rows=4)
    store.append("c0", "train", batch([f"p{i}" for i in range(12)]))
    first, second = _chunk_files(path)[:2]
    first.write_bytes(first.read_bytes()[:10])
    with pytest.raises(CorruptDataError, match="chunk 0"):
        store.read("c0", "train")
    first.unlink()  # zarr would read a missing chunk as zeros
    with pytest.raises(CorruptDataError, match="chunk 0 is missing"):
        store.read("c0", "train")


def test_iter_blocks_is_bounded(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM), chunk_rows=8)
    for i in range(5):
        store.append("c0", "train", batch([f"p{i}-{j}" for j in range(20)], seed=i))
    sizes = [len(ids) for ids, _ in store.iter_blocks("c0", "train", block_rows=8)]
    assert max(sizes) <= 8 and sum(sizes) == 100
    skipped = {f"p0-{j}" for j in range(20)}
    rest = [k for ids, _ in store.iter_blocks("c0", "train", exclude=skipped) for k in ids]
    assert len(rest) == 80 and not skipped & set(rest)


def test_metadata_columns_survive(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM))
    meta = [{"pass_rate": 0.25, "difficulty": 2, "tags": ["a"], "row": "clash"}, {"pass_rate": None, "difficulty": 3}]
    store.append("c0", "train", batch(["a", "b"], metadata=meta))
    table = store.manifest().to_pylist()
    assert table[0]["pass_rate"] == 0.25 and table[1]["pass_rate"] is None
    assert table[0]["tags"] == '["a"]' and table[0]["meta_row"] == "clash" and table[0]["row"] == 0
    assert np.isclose(table[0]["sketch_norm"], float(batch(["a", "b"]).sketches[0].half().float().norm()), rtol=1e-3)


@pytest.mark.parametrize("scale", [1e-9, 1e6])
def test_fp16_keeps_tiny_and_huge_sketches(tmp_path, scale):
    """Plain fp16 would flush 1e-9 to zero and overflow 1e6; unit rows plus stored norms keep both."""
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM, dtype="float16"))
    b = batch(["a", "b"], seed=5)
    b.sketches = b.sketches * scale
    store.append("c0", "train", b)
    _, x = store.read("c0", "train")
    error = (x - b.sketches).norm(dim=1) / b.sketches.norm(dim=1)
    assert error.max() < 2e-3


def test_non_finite_sketch_is_refused(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM))
    b = batch(["a", "b"])
    b.sketches[1, 3] = float("nan")
    with pytest.raises(BadInputError, match="row 'b' is not finite"):
        store.append("c0", "train", b)
    assert store.keys() == []

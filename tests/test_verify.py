"""``verify`` reports every damaged part without changing anything; ``repair`` sets only those aside."""

from __future__ import annotations

import hashlib

import torch

from sketchstore.spec import ProjectionSpec
from sketchstore.store import PARTS_DIR, STAGING_DIR, SketchBatch, SketchStore
from sketchstore.verify import repair, stale_staging, verify

DIM = 32


def add(store, ids, seed):
    x = torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(seed))
    store.append("c0", "train", SketchBatch(list(ids), x, x.norm(dim=1).tolist(), [1] * len(ids)))


def digest(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_verify_and_repair(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM), chunk_rows=4)
    for i in range(3):
        add(store, [f"p{i}-{j}" for j in range(8)], seed=i)
    assert verify(store) == []
    parts = store.part_names()
    flipped = sorted((store.path / PARTS_DIR / parts[0]).rglob("c/1/0"))[0]
    data = bytearray(flipped.read_bytes())
    data[-6] ^= 0x01
    flipped.write_bytes(bytes(data))
    sorted((store.path / PARTS_DIR / parts[2]).rglob("c/0/0"))[0].unlink()
    (store.path / STAGING_DIR / "123-999999999-dead").mkdir()  # an interrupted writer's leftovers

    before = digest(store.path)
    problems = verify(store)
    assert digest(store.path) == before, "verify changed the store"
    assert {p.part for p in problems} == {parts[0], parts[2]}
    assert any("chunk 1" in p.message for p in problems if p.part == parts[0])
    assert any("chunk 0 is missing" in p.message for p in problems if p.part == parts[2])
    assert stale_staging(store) == ["123-999999999-dead"]

    assert repair(store) == [parts[0], parts[2]]
    assert verify(store) == [] and stale_staging(store) == []
    assert store.part_names() == [parts[1]]
    ids, _ = store.read("c0", "train")
    assert sorted(ids) == sorted(f"p1-{j}" for j in range(8))
    add(store, [f"p0-{j}" for j in range(8)], seed=0)  # the rows can be rebuilt
    assert len(store.read("c0", "train")[0]) == 16

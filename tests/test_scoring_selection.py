"""Scoring against brute force, incremental re-scoring, fusion, selection, export, pruning, catalog views."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sketchstore import catalog
from sketchstore.data import read_rows, write_rows
from sketchstore.errors import BadInputError, UnknownKeyError
from sketchstore.scoring import ScoreOptions, SplitRef, load_scores, score
from sketchstore.selection import export_selection, fuse, parse_top, prune, select, tie_key, top_rows
from sketchstore.spec import ProjectionSpec
from sketchstore.store import SketchBatch, SketchStore

DIM = 48


def add(store, ckpt, split, ids, seed, zero=()):
    x = torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(seed))
    for i in zero:
        x[i] = 0
    store.append(ckpt, split, SketchBatch(list(ids), x, x.norm(dim=1).tolist(), [5] * len(ids),
                                          [{"pass_rate": (i % 4) / 4} for i in range(len(ids))]))
    return x


@pytest.fixture
def store(tmp_path):
    s = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM, dtype="float32"), chunk_rows=8)
    add(s, "c0", "train", [f"t{i}" for i in range(30)], seed=1, zero=[3])
    add(s, "c0", "valA", [f"a{i}" for i in range(6)], seed=2)
    add(s, "c0", "valB", [f"b{i}" for i in range(4)], seed=3, zero=[0])
    return s


def brute(train, val, metric, aggregation):
    t, v = train.double(), val.double()
    if metric == "cosine":
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-300)
        v = v[v.norm(dim=1) > 0]
        v = v / v.norm(dim=1, keepdim=True)
    if aggregation == "mean":
        return (t @ v.T).mean(1)
    s = v.sum(0)
    return t @ (s / s.norm() if metric == "cosine" else s)


@pytest.mark.parametrize("metric", ["cosine", "inner"])
@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_scores_match_brute_force(store, metric, aggregation):
    options = ScoreOptions(metric, aggregation)
    train, vals = SplitRef("c0", "train"), [SplitRef("c0", "valA"), SplitRef("c0", "valB")]
    report = score(store, train, vals, options, progress=False)
    assert report.scored == 30 and report.already_scored == 0
    scores = load_scores(store, train, vals, options)
    ids, x = store.read("c0", "train")
    for ref in vals:
        _, v = store.read(ref.checkpoint, ref.split)
        expected = brute(x, v, metric, aggregation)
        got = torch.tensor([scores[ref][i] for i in ids], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-5), (ref, metric, aggregation)
    assert scores[vals[0]]["t3"] == 0.0 or metric == "inner"  # zero gradient aligns with nothing


def test_rescoring_only_scores_new_rows(store):
    train, vals = SplitRef("c0", "train"), [SplitRef("c0", "valA")]
    assert score(store, train, vals, progress=False).scored == 30
    again = score(store, train, vals, progress=False)
    assert (again.scored, again.already_scored) == (0, 30)
    add(store, "c0", "train", [f"n{i}" for i in range(5)], seed=7)
    third = score(store, train, vals, progress=False)
    assert (third.scored, third.already_scored) == (5, 30)
    assert len(load_scores(store, train, vals)[vals[0]]) == 35
    # new validation rows change the target: everything is re-scored under a new key
    add(store, "c0", "valA", ["a-extra"], seed=8)
    assert score(store, train, vals, progress=False).scored == 35
    _, rows = catalog.query(store, "SELECT count(DISTINCT val_fingerprint), count(*) FROM scores")
    assert rows == [(2, 70)]


def test_scoring_unknown_split_and_missing_scores(store):
    with pytest.raises(UnknownKeyError, match="c9:train"):
        score(store, SplitRef("c9", "train"), [SplitRef("c0", "valA")], progress=False)
    with pytest.raises(UnknownKeyError, match="c0:nope"):
        score(store, SplitRef("c0", "train"), [SplitRef("c0", "nope")], progress=False)
    with pytest.raises(BadInputError, match="run `sketch score` first"):
        load_scores(store, SplitRef("c0", "train"), [SplitRef("c0", "valA")])
    with pytest.raises(BadInputError, match="expected CHECKPOINT:SPLIT"):
        SplitRef.parse("train")
    with pytest.raises(BadInputError, match="unknown metric"):
        ScoreOptions(metric="l2")


def test_fusion_rules():
    a = {"x": 0.9, "y": 0.5, "z": 0.1}
    b = {"x": 0.0, "y": 0.8, "z": 0.7}
    assert fuse([a, b], "mean") == pytest.approx({"x": 0.45, "y": 0.65, "z": 0.4})
    assert fuse([a, b], "max") == {"x": 0.9, "y": 0.8, "z": 0.7}
    # ranks: a: x1 y2 z3, b: y1 z2 x3
    assert fuse([a, b], "rrf") == pytest.approx({"x": 1 + 1 / 3, "y": 1 / 2 + 1, "z": 1 / 3 + 1 / 2})
    with pytest.raises(BadInputError, match="unknown fusion"):
        fuse([a], "median")


def test_top_rows_fraction_count_exclude():
    scores = {f"r{i}": float(i) for i in range(20)}
    assert [s.id for s in top_rows(scores, 0.1)] == ["r19", "r18"]
    assert [s.id for s in top_rows(scores, 3, exclude=["r19"])] == ["r18", "r17", "r16"]
    assert [s.rank for s in top_rows(scores, 3)] == [1, 2, 3]
    assert parse_top("0.1") == 0.1 and parse_top("500") == 500 and parse_top("1.0") == 1.0
    for bad in ("0", "-1", "abc", "2.5"):
        with pytest.raises(BadInputError, match="--top"):
            parse_top(bad)


def test_ties_do_not_follow_what_ids_spell():
    """Zero-score ties (e.g. zero-gradient prompts) fill a selection in hash order, not id order:
    with ids that name a family, id order would pick one family first."""
    scores = {f"{family}-{i}": 0.0 for family in ("arith", "word") for i in range(50)}
    scores["word-7"] = 1.0
    chosen = [s.id for s in top_rows(scores, 0.5)]
    assert chosen[0] == "word-7" and chosen == [s.id for s in top_rows(dict(reversed(scores.items())), 0.5)]
    assert 10 < sum(i.startswith("arith") for i in chosen) < 40  # id order would take all 50 arith-* first
    assert chosen[1:] == sorted(chosen[1:], key=tie_key)
    assert fuse([scores], "rrf")["word-7"] == 1.0 and len(set(fuse([scores], "rrf").values())) == 100


def test_select_export_and_prune(store, tmp_path):
    train, vals = SplitRef("c0", "train"), [SplitRef("c0", "valA"), SplitRef("c0", "valB")]
    score(store, train, vals, progress=False)
    chosen = select(store, train, vals, 0.2, fusion="mean")
    assert len(chosen) == 6
    per_set = load_scores(store, train, vals)
    mean = {i: (per_set[vals[0]][i] + per_set[vals[1]][i]) / 2 for i in per_set[vals[0]]}
    assert [s.id for s in chosen] == sorted(mean, key=lambda i: -mean[i])[:6]
    stage2 = select(store, train, vals, 0.2, fusion="mean", exclude=[s.id for s in chosen])
    assert not {s.id for s in chosen} & {s.id for s in stage2}

    for suffix in ("jsonl", "parquet"):
        out = export_selection(chosen, tmp_path / f"sel.{suffix}", extra={"stage": 0})
        rows = read_rows(out, required=("id",))
        assert [r["id"] for r in rows] == [s.id for s in chosen] and rows[0]["stage"] == 0

    data = [{"id": f"t{i}", "prompt": f"q{i}", "response": f"r{i}", "extra": {"k": i}} for i in range(30)]
    write_rows(data, tmp_path / "data.jsonl")
    kept, total = prune(tmp_path / "data.jsonl", tmp_path / "sel.parquet", tmp_path / "pruned.jsonl")
    assert (kept, total) == (6, 30)
    pruned = [json.loads(line) for line in (tmp_path / "pruned.jsonl").read_text().splitlines()]
    wanted = {s.id for s in chosen}
    assert pruned == [row for row in data if row["id"] in wanted]  # original order and all columns
    prune(tmp_path / "data.jsonl", tmp_path / "sel.jsonl", tmp_path / "pruned.parquet")
    assert pq.read_table(tmp_path / "pruned.parquet").num_rows == 6
    write_rows([{"id": "ghost"}], tmp_path / "ghost.jsonl")
    with pytest.raises(BadInputError, match="'ghost'"):
        prune(tmp_path / "data.jsonl", tmp_path / "ghost.jsonl", tmp_path / "p2.jsonl")
    assert not (tmp_path / "p2.jsonl").exists()


def test_catalog_views(store):
    columns, rows = catalog.query(store, "SELECT * FROM sketches LIMIT 1")
    for column in ("id", "checkpoint", "split", "part", "row", "location", "grad_norm", "sketch_norm",
                   "n_tokens", "model_fingerprint", "pass_rate"):
        assert column in columns
    _, rows = catalog.query(store, "SELECT split, count(*) FROM sketches GROUP BY split ORDER BY split")
    assert rows == [("train", 30), ("valA", 6), ("valB", 4)]
    _, rows = catalog.query(store, "SELECT count(*) FROM sketches WHERE grad_norm = 0")
    assert rows == [(2,)]
    _, rows = catalog.query(store, "SELECT location FROM sketches LIMIT 1")
    assert (store.path / "parts").as_posix() in rows[0][0]
    _, rows = catalog.query(store, "SELECT count(*) FROM scores")
    assert rows == [(0,)]
    score(store, SplitRef("c0", "train"), [SplitRef("c0", "valA")], progress=False)
    _, rows = catalog.query(store, "SELECT count(*), min(score) >= -1, max(score) <= 1 FROM scores "
                                   "JOIN sketches USING (id) WHERE sketches.split = 'train'")
    assert rows == [(30, True, True)]
    with pytest.raises(BadInputError, match="query failed"):
        catalog.query(store, "SELECT nope FROM sketches")


def test_scores_from_fp16_store_are_close(tmp_path):
    store = SketchStore.create(tmp_path / "h", ProjectionSpec(dim=DIM), chunk_rows=8)
    x = add(store, "c0", "train", [f"t{i}" for i in range(20)], seed=1)
    v = add(store, "c0", "val", ["v0", "v1"], seed=2)
    score(store, SplitRef("c0", "train"), [SplitRef("c0", "val")], progress=False)
    got = load_scores(store, SplitRef("c0", "train"), [SplitRef("c0", "val")])[SplitRef("c0", "val")]
    expected = brute(x, v, "cosine", "mean")
    assert np.allclose([got[f"t{i}"] for i in range(20)], expected.numpy(), atol=2e-3)

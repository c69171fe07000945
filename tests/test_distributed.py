"""Scoring on an executor (a Dask cluster, a thread pool) equals single-process scoring; cluster errors are
one line; ``--shard auto``."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner
from distributed import LocalCluster

from cli.sketch import main as sketch
from sketchstore import catalog, distributed
from sketchstore.build import in_shard
from sketchstore.data import read_rows
from sketchstore.distributed import dask_client
from sketchstore.scoring import ScoreOptions, SplitRef, load_scores, score, score_block, scored_blocks, validation_target
from sketchstore.selection import select
from sketchstore.spec import ProjectionSpec
from sketchstore.store import SketchBatch, SketchStore
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)

DIM = 64
CHUNK_ROWS = 8
WORKERS = 2
TRAIN = SplitRef("c0", "train")
VALS = [SplitRef("c0", "valA"), SplitRef("c0", "valB")]
SCORE_COLUMNS = "id, train_checkpoint, train_split, val_set, metric, aggregation, val_fingerprint"


def add(store: SketchStore, split: str, ids: list[str], seed: int, zero: tuple[int, ...] = ()) -> None:
    x = torch.randn(len(ids), DIM, generator=torch.Generator().manual_seed(seed)) * (1 + torch.arange(len(ids)))[:, None]
    for i in zero:
        x[i] = 0
    store.append("c0", split, SketchBatch(ids, x, x.norm(dim=1).tolist(), [3] * len(ids)))


def fill(store: SketchStore) -> None:
    """Three train parts (the first spans several tasks) and two validation sets."""
    add(store, "train", [f"t{i}" for i in range(150)], seed=1, zero=(3, 77))
    add(store, "train", [f"u{i}" for i in range(45)], seed=2)
    add(store, "train", [f"w{i}" for i in range(9)], seed=3)
    add(store, "valA", [f"a{i}" for i in range(6)], seed=4)
    add(store, "valB", [f"b{i}" for i in range(4)], seed=5, zero=(0,))


@pytest.fixture(scope="module")
def client():
    # Worker processes (processes=True), as on a real cluster: each worker imports sketchstore and
    # opens the store itself. Starting two takes ~6 s on this 2-core machine, once for the module.
    with dask_client(workers=WORKERS) as dask:
        yield dask


@pytest.fixture
def stores(tmp_path):
    """Two byte-identical fp16 stores filled by ``fill``."""
    local = SketchStore.create(tmp_path / "local", ProjectionSpec(dim=DIM), chunk_rows=CHUNK_ROWS)
    fill(local)
    shutil.copytree(local.path, tmp_path / "dask")
    return local, SketchStore.open(tmp_path / "dask", writable=True)


def stored_scores(store: SketchStore) -> list[tuple]:
    return catalog.query(store, f"SELECT {SCORE_COLUMNS}, score FROM scores ORDER BY {SCORE_COLUMNS}")[1]


def assert_same_scores(local: SketchStore, dask: SketchStore, options: ScoreOptions) -> None:
    expected, got = stored_scores(local), stored_scores(dask)
    assert [row[:-1] for row in got] == [row[:-1] for row in expected]
    assert torch.allclose(torch.tensor([r[-1] for r in got]), torch.tensor([r[-1] for r in expected]), atol=1e-6)
    mine, theirs = load_scores(local, TRAIN, VALS, options), load_scores(dask, TRAIN, VALS, options)
    assert all(mine[ref].keys() == theirs[ref].keys() for ref in VALS)


@pytest.mark.parametrize("metric,aggregation", [("cosine", "mean"), ("inner", "sum")])
def test_dask_scores_equal_single_process(client, stores, metric, aggregation):
    local, dask = stores
    options = ScoreOptions(metric, aggregation)
    single = score(local, TRAIN, VALS, options, progress=False)
    spread = score(dask, TRAIN, VALS, options, progress=False, executor=client)
    assert (spread.scored, spread.already_scored) == (single.scored, single.already_scored) == (204, 0)
    assert_same_scores(local, dask, options)
    exclude = [f"t{i}" for i in range(0, 150, 3)]
    for fusion in ("rrf", "mean"):
        assert select(dask, TRAIN, VALS, 0.2, options, fusion, exclude) == select(local, TRAIN, VALS, 0.2, options, fusion, exclude)
    # appended rows: only they are scored, on the cluster too
    for store in stores:
        add(store, "train", [f"n{i}" for i in range(20)], seed=6)
    assert score(local, TRAIN, VALS, options, progress=False).scored == 20
    again = score(dask, TRAIN, VALS, options, progress=False, executor=client)
    assert (again.scored, again.already_scored) == (20, 204)
    assert_same_scores(local, dask, options)


@pytest.mark.parametrize("metric", ["cosine", "inner"])
def test_thread_pool_scores_equal_single_process(stores, metric):
    local, threaded = stores
    options = ScoreOptions(metric)
    single = score(local, TRAIN, VALS, options, progress=False)
    with ThreadPoolExecutor(max_workers=3) as pool:
        spread = score(threaded, TRAIN, VALS, options, progress=False, executor=pool)
    assert (spread.scored, spread.already_scored) == (single.scored, single.already_scored) == (204, 0)
    assert_same_scores(local, threaded, options)


def test_cli_threads(stores):
    local, threaded = stores
    args = ["score", "--store", str(threaded.path), "--train", str(TRAIN), "--val", ",".join(map(str, VALS)), "--quiet"]
    result = CliRunner().invoke(sketch, [*args, "--threads", "2"])
    assert result.exit_code == 0 and "204 rows scored" in result.output, result.output
    score(local, TRAIN, VALS, progress=False)
    assert_same_scores(local, threaded, ScoreOptions())
    for extra, message in ((["--threads", "0"], "scoring threads must be >= 1"),
                           (["--threads", "2", "--dask-workers", "2"], "not both")):
        result = CliRunner().invoke(sketch, [*args, *extra])
        assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_read_plan_is_chunk_aligned_and_skips_excluded(stores):
    store = stores[0]
    exclude = {"t1", "t2", "u5"}
    tasks = store.plan_reads("c0", "train", exclude, block_rows=2 * CHUNK_ROWS)
    assert [key for t in tasks for key in t.ids] == [k for ids, _ in store.iter_blocks("c0", "train", exclude) for k in ids]
    assert len({k for t in tasks for k in t.ids}) == 204 - len(exclude) and not exclude & {k for t in tasks for k in t.ids}
    for task in tasks:  # one part, one aligned range of two chunks, rows ascending
        first, last = task.span
        assert first // (2 * CHUNK_ROWS) == (last - 1) // (2 * CHUNK_ROWS) and list(task.rows) == sorted(task.rows)
    _, stored = store.read("c0", "train", list(tasks[0].ids))
    assert torch.allclose(store.load(tasks[0]), stored)


@pytest.mark.parametrize("unit", [True, False])
def test_tasks_with_gaps_match_streaming(client, stores, unit):
    store = stores[0]
    options = ScoreOptions("cosine" if unit else "inner")
    matrix = torch.stack([validation_target(store, ref, options).vector for ref in VALS], dim=1)
    exclude = {f"t{i}" for i in range(1, 150, 4)} | {"u0", "u44", "w3"}
    expected = list(store.iter_blocks("c0", "train", exclude=exclude, unit=unit, transform=lambda b: score_block(b, matrix)))
    got = list(scored_blocks(store, TRAIN, exclude, matrix, unit, executor=client, task_rows=3 * CHUNK_ROWS))
    assert len(got) > len(store.part_names())
    assert [key for ids, _ in got for key in ids] == [key for ids, _ in expected for key in ids]
    assert torch.allclose(torch.cat([s for _, s in got]), torch.cat([s for _, s in expected]), atol=1e-5)


def test_cli_dask_scheduler(client, stores):
    local, dask = stores
    args = ["score", "--store", str(dask.path), "--train", str(TRAIN), "--val", ",".join(map(str, VALS)), "--quiet"]
    result = CliRunner().invoke(sketch, [*args, "--dask-scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "204 rows scored" in result.output
    score(local, TRAIN, VALS, progress=False)
    assert_same_scores(local, dask, ScoreOptions())


def test_cli_dask_errors_are_one_line(stores, monkeypatch):
    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT_S", 1.0)
    base = ["score", "--store", str(stores[1].path), "--train", str(TRAIN), "--val", str(VALS[0]), "--quiet"]
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as idle:
        cases = [(["--dask-scheduler", "tcp://127.0.0.1:9"], "cannot reach the Dask scheduler at tcp://127.0.0.1:9"),
                 (["--dask-scheduler", "no-port"], "cannot reach the Dask scheduler at no-port"),
                 (["--dask-scheduler", idle.scheduler_address], "has no workers"),
                 (["--dask-workers", "0"], "number of Dask workers must be >= 1"),
                 (["--dask-workers", "2", "--dask-scheduler", "tcp://127.0.0.1:9"], "not both")]
        for extra, message in cases:
            result = CliRunner().invoke(sketch, [*base, *extra])
            assert result.exit_code == 2, result.output
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not list((stores[1].path / "scores").rglob("*.parquet"))


def test_shard_auto_reads_rank_and_world_size(tiny_model, sft_data, tmp_path):
    _, val = sft_data
    store = tmp_path / "store"
    args = ["build", "--model", str(tiny_model), "--data", str(val), "--store", str(store), "--checkpoint", "c0",
            "--split", "val", "--dim", "256", "--quiet", "--shard", "auto"]
    seen: list[set[str]] = []
    for rank in range(2):
        result = CliRunner().invoke(sketch, args, env={"RANK": str(rank), "WORLD_SIZE": "2"})
        assert result.exit_code == 0, result.output
        seen.append(SketchStore.open(store).existing_ids("c0", "val") - set().union(*seen))
    ids = {row["id"] for row in read_rows(val)}
    assert all(seen[rank] == {key for key in ids if in_shard(key, (rank, 2))} for rank in range(2))
    assert seen[0] and seen[1] and seen[0] | seen[1] == ids
    result = CliRunner().invoke(sketch, args, env={"RANK": None, "WORLD_SIZE": None})
    assert result.exit_code == 2 and "RANK and WORLD_SIZE" in result.stderr

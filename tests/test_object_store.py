"""Stores on S3-compatible object storage, against a real S3 server on loopback (moto's server mode).

The store, the catalog, scoring, verify and the ``sketch`` command run unchanged on
``s3://bucket/prefix``; commits go through the conditional-PUT log (backend.py), so crashed and
concurrent writers lose and duplicate nothing there too.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
import signal
import uuid

import fsspec
import pytest
import torch
from click.testing import CliRunner
from moto.server import ThreadedMotoServer

from cli.sketch import main as sketch
from sketchstore import ProjectionSpec, SketchStore, SplitRef, load_scores, query, score
from sketchstore.backend import LOG_DIR, MANIFEST_NAME, PARTS_DIR, FsspecBackend
from sketchstore.data import read_rows, write_rows
from sketchstore.errors import BadInputError, SketchStoreError, StoreNotFoundError
from sketchstore.verify import repair, stale_staging, verify

from _store_writer import DIM, fill, resume_writer, rows
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)

BUCKET = "sketches"
KILL_ROUNDS = 3


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 and the AWS environment variables pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").mkdir(BUCKET)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def url(s3_env):
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/store"


def test_s3_store_matches_a_local_one(url, tmp_path):
    ids = [f"p-{i}" for i in range(30)]
    remote = SketchStore.create(url, ProjectionSpec(dim=DIM), chunk_rows=4)
    local = SketchStore.create(tmp_path / "local", ProjectionSpec(dim=DIM), chunk_rows=4)
    for store in (remote, local):
        fill(store, ids[:20], 7)
        assert store.append("c0", "train", rows(ids[15:])) == 10  # 15..19 already stored
        store.append("c0", "val", rows(["v-100", "v-101"]))
    reopened = SketchStore.open(url)
    assert reopened.spec == local.spec and reopened.keys() == local.keys() == [("c0", "train", 30), ("c0", "val", 2)]
    got_ids, got = reopened.read("c0", "train")
    want_ids, want = local.read("c0", "train")
    assert got_ids == want_ids and torch.equal(got, want)
    blocks = list(reopened.iter_blocks("c0", "train", block_rows=4, exclude={"p-0"}))
    assert sum(len(b) for b, _ in blocks) == 29 and max(len(b) for b, _ in blocks) <= 4
    assert sorted(reopened.manifest().column("id").to_pylist()) == sorted(local.manifest().column("id").to_pylist())
    columns, result = query(reopened, "SELECT count(*), count(DISTINCT id), min(location), max(difficulty) FROM sketches")
    assert result[0][:2] == (32, 32) and result[0][2].startswith(f"{url}/parts/") and result[0][3] == 2
    writer = SketchStore.open(url, writable=True)
    for store in (writer, SketchStore.open(tmp_path / "local", writable=True)):
        score(store, SplitRef("c0", "train"), [SplitRef("c0", "val")], progress=False)
    remote_scores = load_scores(writer, SplitRef("c0", "train"), [SplitRef("c0", "val")])
    assert remote_scores == load_scores(local, SplitRef("c0", "train"), [SplitRef("c0", "val")])
    assert query(writer, "SELECT count(*) FROM scores JOIN sketches USING (id)")[1] == [(30,)]
    assert verify(writer) == [] and stale_staging(writer) == []


def test_uncommitted_parts_are_invisible_and_repair_retracts_damage(url):
    store = SketchStore.create(url, ProjectionSpec(dim=DIM), chunk_rows=4)
    fill(store, [f"p-{i}" for i in range(12)], 4)
    fs, base = store.backend.fs, store.backend.base
    parts = store.part_names()
    # a writer that died before its log entry: chunks and manifest there, never read
    dead = f"{0:020d}-1-deadbeef"
    fs.copy(f"{base}/{PARTS_DIR}/{parts[0]}", f"{base}/{PARTS_DIR}/{dead}", recursive=True)
    assert fs.exists(f"{base}/{PARTS_DIR}/{dead}/{MANIFEST_NAME}")
    assert SketchStore.open(url).part_names() == parts and SketchStore.open(url).keys() == [("c0", "train", 12)]
    assert stale_staging(store) == [dead]
    # damage a committed part: verify names it, repair retracts it and removes the dead write
    chunk = f"{base}/{PARTS_DIR}/{parts[1]}/sketches/c/0/0"
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    assert {p.part for p in verify(store)} == {parts[1]}
    assert repair(store) == [parts[1]]
    assert verify(store) == [] and stale_staging(store) == [] and not fs.exists(f"{base}/{PARTS_DIR}/{dead}")
    assert store.part_names() == [p for p in parts if p != parts[1]]
    fill(store, [f"p-{i}" for i in range(12)], 4)  # the retracted rows are rebuilt
    ids, x = SketchStore.open(url).read("c0", "train")
    assert sorted(ids) == sorted(f"p-{i}" for i in range(12))
    assert torch.allclose(x, rows(ids).sketches, atol=2e-3 * float(x.abs().max()))


def test_lost_commit_race_retries_without_duplicates(url):
    SketchStore.create(url, ProjectionSpec(dim=DIM))
    first, second = SketchStore.open(url, writable=True), SketchStore.open(url, writable=True)
    second.append("c0", "train", rows(["p-1", "p-2"]))
    stale, real = [], second.backend._entries

    def stale_once():  # `first` reads the log just before `second` committed
        entries = real()
        if not stale:
            stale.append(True)
            return entries[:-1]
        return entries

    first.backend._entries = stale_once
    puts = []
    real_pipe = first.backend.fs.pipe_file

    def counting_pipe(path, value, **kw):
        if f"/{LOG_DIR}/" in path:
            puts.append(path)
        return real_pipe(path, value, **kw)

    first.backend.fs = _Proxy(first.backend.fs, pipe_file=counting_pipe)
    assert first.append("c0", "train", rows(["p-2", "p-3"])) == 1
    assert len(puts) == 2 and puts[0] != puts[1]  # the first try hit the taken entry
    ids = SketchStore.open(url).manifest().column("id").to_pylist()
    assert sorted(ids) == ["p-1", "p-2", "p-3"]


def test_commit_whose_reply_was_lost_is_kept_once(url):
    store = SketchStore.create(url, ProjectionSpec(dim=DIM))
    real_pipe = store.backend.fs.pipe_file

    def succeed_then_report_conflict(path, value, **kw):  # a client retry after the first PUT went through
        real_pipe(path, value, **kw)
        if f"/{LOG_DIR}/" in path:
            raise FileExistsError(path)

    store.backend.fs = _Proxy(store.backend.fs, pipe_file=succeed_then_report_conflict)
    assert store.append("c0", "train", rows(["p-1", "p-2"])) == 2
    reopened = SketchStore.open(url)
    assert len(reopened.part_names()) == 1 and reopened.read("c0", "train")[0] == ["p-1", "p-2"]


class _Proxy:
    """A filesystem whose chosen methods are replaced."""

    def __init__(self, fs, **methods):
        self._fs, self._methods = fs, methods

    def __getattr__(self, name):
        return self._methods.get(name) or getattr(self._fs, name)


def test_storage_without_conditional_writes_is_refused(url, monkeypatch):
    SketchStore.create(url, ProjectionSpec(dim=DIM))
    real = FsspecBackend.__init__

    def ignoring_conditions(self, location):
        real(self, location)
        pipe = self.fs.pipe_file
        self.fs = _Proxy(self.fs, pipe_file=lambda path, value, mode="overwrite", **kw: pipe(path, value, **kw))

    monkeypatch.setattr(FsspecBackend, "__init__", ignoring_conditions)
    with pytest.raises(BadInputError, match=rf"{url} ignores conditional writes"):
        SketchStore.open(url, writable=True)
    assert SketchStore.open(url).keys() == []  # reading needs no conditional writes


def test_missing_bucket_and_existing_store_are_named(s3_env, url):
    with pytest.raises(StoreNotFoundError, match="sketch store not found: s3://no-such-bucket/x"):
        SketchStore.open("s3://no-such-bucket/x")
    with pytest.raises(SketchStoreError, match="cannot create store at s3://no-such-bucket/x: .*bucket does not exist"):
        SketchStore.create("s3://no-such-bucket/x", ProjectionSpec(dim=DIM))
    SketchStore.create(url, ProjectionSpec(dim=DIM))
    with pytest.raises(StoreNotFoundError, match="exists and is not empty"):
        SketchStore.create(url, ProjectionSpec(dim=DIM))


def test_concurrent_and_killed_writers_lose_and_duplicate_nothing(s3_env, url):
    SketchStore.create(url, ProjectionSpec(dim=DIM), chunk_rows=8)
    every = [f"p-{i}" for i in range(30)]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["_store_writer"])
    procs = [ctx.Process(target=resume_writer, args=(s3_env, url, every[w * 10:w * 10 + 20], 5, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = SketchStore.open(url).manifest().column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(every), "lost or duplicated rows"
    # writers killed at random moments: whatever is visible is whole, and a resumed run completes
    more = [f"p-{i}" for i in range(30, 66)]
    rng = random.Random(7)
    for round_ in range(KILL_ROUNDS):
        proc = ctx.Process(target=resume_writer, args=(s3_env, url, more, 4, round_))
        proc.start()
        proc.join(rng.uniform(0.3, 1.5))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        store = SketchStore.open(url)
        assert verify(store) == []
        ids, x = store.read("c0", "train")
        assert len(ids) == len(set(ids))
        assert torch.allclose(x, rows(ids).sketches, atol=2e-3 * float(x.abs().max()))
    resume_writer(s3_env, url, more, 4, 99)
    ids = SketchStore.open(url).manifest().column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == set(every + more)


def test_sketch_command_on_s3(s3_env, url, tiny_model, sft_data, tmp_path):
    train = write_rows(read_rows(sft_data[0])[:12], tmp_path / "train.jsonl")
    val = write_rows(read_rows(sft_data[1])[:3], tmp_path / "val.jsonl")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(sketch, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    common = ["--model", tiny_model, "--store", url, "--checkpoint", "step0", "--dim", 256, "--flush-every", 10, "--quiet"]
    assert "12 rows added" in run("build", *common, "--data", train, "--split", "train")
    run("build", *common, "--data", val, "--split", "val")
    assert "12 rows scored" in run("score", "--store", url, "--train", "step0:train", "--val", "step0:val", "--quiet")
    listing = run("ls", "--store", url)
    assert url in listing and "dim=256" in listing and " 12 " in listing
    assert "0 problems" in run("verify", "--store", url)
    table = run("query", "--store", url, "SELECT split, count(*) AS n FROM sketches GROUP BY split ORDER BY split")
    assert [line.split() for line in table.splitlines()[2:]] == [["train", "12"], ["val", "3"]]
    log = fsspec.filesystem("s3").ls(url.removeprefix("s3://") + f"/{LOG_DIR}", detail=False)
    assert [json.loads(fsspec.filesystem("s3").cat_file(k))["rows"] for k in log] == [10, 2, 3]

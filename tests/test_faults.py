"""Real failures: a full disk (RLIMIT_FSIZE: writes fail with EFBIG), a read-only store (permission
bits, enforced for root by dropping CAP_DAC_OVERRIDE), and writers SIGKILLed at many points.
Each test checks that nothing stored was lost, changed or duplicated."""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sketchstore import BuildConfig, ProjectionSpec, SketchStore, SplitRef, build_sketches, score
from sketchstore.data import read_rows, write_rows
from sketchstore.errors import SketchStoreError
from sketchstore.store import PARTS_DIR, STAGING_DIR
from sketchstore.verify import repair, stale_staging, verify

from _store_writer import DIM, KILL_POINTS, fill, resume_writer, rows
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)

SKETCH = str(Path(sys.executable).with_name("sketch"))
FILE_LIMIT = 12_000  # bytes: more than a manifest, less than one chunk of the parts written below
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
KILL_ROUNDS = 12
KILL_IDS = 80
KILL_FLUSH = 5


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock" and "scores" not in p.parts}


def small_data(sft_data, tmp_path, n_train=6, n_val=3):
    train = write_rows(read_rows(sft_data[0])[:n_train], tmp_path / "train.jsonl")
    val = write_rows(read_rows(sft_data[1])[:n_val], tmp_path / "val.jsonl")
    return train, val


def build(model, data, store, split, dim):
    return build_sketches(BuildConfig(model=model, data=data, store=store, checkpoint="c0", split=split,
                                      spec=ProjectionSpec(dim=dim), flush_rows=3), progress=False)


def one_line_error(code: int, stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    assert "Traceback" not in stderr and all(n in lines[0] for n in needles), lines[0]


# ---------------------------------------------------------------- disk full
def _file_size_limit() -> None:
    """In the child: writes past FILE_LIMIT bytes fail with EFBIG (SIGXFSZ ignored, as a full disk fails a write)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_disk_full_during_append_keeps_the_store(tmp_path):
    store = SketchStore.create(tmp_path / "s", ProjectionSpec(dim=DIM))
    fill(store, [f"p-{i}" for i in range(10)], 5)
    before, keys = digest(store.path), store.keys()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, hard))
    try:
        with pytest.raises(SketchStoreError, match=rf"writing a part to {store.path} failed \(File too large\); "
                                                   r"the store is unchanged"):
            store.append("c0", "train", rows([f"p-{i}" for i in range(10, 400)]))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert digest(store.path) == before and store.keys() == keys
    assert not any((store.path / STAGING_DIR).iterdir()) and verify(store) == []
    assert store.append("c0", "train", rows([f"p-{i}" for i in range(10, 400)])) == 390  # space is back


def test_disk_full_during_sketch_build(tiny_model, sft_data, tmp_path):
    train, val = small_data(sft_data, tmp_path)
    store = tmp_path / "store"
    build(tiny_model, val, store, "val", dim=8192)
    before, keys = digest(store), SketchStore.open(store).keys()
    proc = subprocess.run([SKETCH, "build", "--model", tiny_model, "--data", train, "--store", store, "--checkpoint", "c0",
                           "--split", "train", "--dim", "8192", "--flush-every", "3", "--quiet"],
                          capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit)
    one_line_error(proc.returncode, proc.stderr, f"writing a part to {store} failed", "File too large")
    reopened = SketchStore.open(store)
    assert digest(store) == before and reopened.keys() == keys
    assert not any((store / STAGING_DIR).iterdir()) and verify(reopened) == []


# ---------------------------------------------------------------- read-only store
def _without_write_override() -> None:
    """In the child: as root, drop the capabilities that let root ignore permission bits."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


READ_ONLY_SESSION = """
import json, sys
from click.testing import CliRunner
from cli.sketch import main
out = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    out.append([result.exit_code, result.stdout, result.stderr])
print(json.dumps(out))
"""


def _chmod_tree(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = 0o755 if path.is_dir() else 0o644
        path.chmod(mode if writable else mode & ~0o222)


def test_read_only_store_is_read_and_never_written(tiny_model, sft_data, tmp_path):
    train, val = small_data(sft_data, tmp_path)
    store = tmp_path / "store"
    build(tiny_model, train, store, "train", dim=512)
    build(tiny_model, val, store, "val", dim=512)
    score(SketchStore.open(store, writable=True), SplitRef("c0", "train"), [SplitRef("c0", "val")], progress=False)
    before = digest(store)
    s, sel = str(store), str(tmp_path / "sel.jsonl")
    commands = [
        ["build", "--model", str(tiny_model), "--data", str(train), "--store", s, "--checkpoint", "c1", "--split", "train",
         "--dim", "512", "--quiet"],
        ["score", "--store", s, "--train", "c0:train", "--val", "c0:val", "--quiet"],
        ["ls", "--store", s],
        ["query", "--store", s, "SELECT count(*) AS n FROM sketches JOIN scores USING (id)"],
        ["verify", "--store", s],
        ["select", "--store", s, "--train", "c0:train", "--val", "c0:val", "--top", "2", "--out", sel, "--no-score-missing"],
    ]
    _chmod_tree(store, writable=False)
    try:
        proc = subprocess.run([sys.executable, "-c", READ_ONLY_SESSION, json.dumps(commands)], capture_output=True,
                              text=True, timeout=300, preexec_fn=_without_write_override, cwd=Path(__file__).parents[1])
    finally:
        _chmod_tree(store, writable=True)
    assert proc.returncode == 0, proc.stderr
    (b_code, _, b_err), (s_code, _, s_err), (ls_code, ls_out, _), (q_code, q_out, _), (v_code, v_out, _), (sel_code, _, _) = \
        json.loads(proc.stdout)
    one_line_error(b_code, b_err, f"store {store} is read-only")
    one_line_error(s_code, s_err, f"store {store} is read-only")
    assert ls_code == 0 and "c0" in ls_out and " 6 " in ls_out
    assert q_code == 0 and q_out.splitlines()[2].strip() == "6"
    assert v_code == 0 and "0 problems" in v_out
    assert sel_code == 0 and len(read_rows(sel)) == 2
    assert digest(store) == before


# ---------------------------------------------------------------- SIGKILL at many points
def test_repeated_sigkill_stores_every_key_once_and_bit_identical(tmp_path):
    ids = [f"p-{i}" for i in range(KILL_IDS)]
    reference = SketchStore.create(tmp_path / "reference", ProjectionSpec(dim=DIM), chunk_rows=4)
    fill(reference, ids, KILL_FLUSH)
    ref_ids, ref_x = reference.read("c0", "train")
    ref_meta = {r["id"]: r for r in reference.manifest().to_pylist()}
    path = tmp_path / "killed"
    SketchStore.create(path, ProjectionSpec(dim=DIM), chunk_rows=4)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["_store_writer"])
    rng = random.Random(2024)
    plan = ["timer"] * (KILL_ROUNDS - 2 * len(KILL_POINTS)) + list(KILL_POINTS) * 2
    rng.shuffle(plan)
    kills = 0
    for round_, point in enumerate(plan):
        kill_at = None if point == "timer" else (point, rng.randint(1, 3))
        proc = ctx.Process(target=resume_writer, args=({}, str(path), ids, KILL_FLUSH, round_, kill_at))
        proc.start()
        proc.join(rng.uniform(0.05, 0.6) if point == "timer" else 60)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        kills += proc.exitcode == -signal.SIGKILL
        store = SketchStore.open(path)
        assert verify(store) == [], f"round {round_} ({point})"
        got_ids, got = store.read("c0", "train") if store.keys() else ([], None)
        assert len(got_ids) == len(set(got_ids)), f"duplicated rows after round {round_} ({point})"
        if got_ids:
            assert torch.equal(got, reference.read("c0", "train", ids=got_ids)[1])
    assert kills >= KILL_ROUNDS - 2, "most rounds should have been killed mid-write"
    resume_writer({}, str(path), ids, KILL_FLUSH, 99)
    store = SketchStore.open(path, writable=True)
    got_ids, got = store.read("c0", "train", ids=ref_ids)
    assert torch.equal(got, ref_x)
    manifest = store.manifest().to_pylist()
    assert sorted(r["id"] for r in manifest) == sorted(ids)
    for row in manifest:
        want = ref_meta[row["id"]]
        assert all(row[c] == want[c] for c in ("grad_norm", "sketch_norm", "n_tokens", "difficulty"))
    assert repair(store) == [] and stale_staging(store) == [] and not any((path / STAGING_DIR).iterdir())
    assert len(list((path / PARTS_DIR).iterdir())) == len(store.part_names())

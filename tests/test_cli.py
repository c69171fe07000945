"""The ``sketch`` command end to end, run as a user runs it (subprocesses of the installed script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from sketchstore.data import read_rows, write_rows
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)

SKETCH = [str(Path(sys.executable).with_name("sketch"))]


def run(*args, ok=True):
    proc = subprocess.run(SKETCH + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_build_score_select_prune_ls_query(tiny_model, sft_data, tmp_path):
    train, val = sft_data
    store = tmp_path / "store"
    common = ["--model", tiny_model, "--store", store, "--checkpoint", "step0", "--dim", 1024, "--quiet"]
    out = run("build", *common, "--data", train, "--split", "train").stdout
    assert "24 rows added, 0 already stored, 24 in input" in out
    run("build", *common, "--data", val, "--split", "val")
    again = run("build", *common, "--data", train, "--split", "train").stdout
    assert "0 rows added, 24 already stored" in again

    out = run("score", "--store", store, "--train", "step0:train", "--val", "step0:val", "--quiet").stdout
    assert "24 rows scored, 0 already scored" in out
    sel = tmp_path / "sel.jsonl"
    out = run("select", "--store", store, "--train", "step0:train", "--val", "step0:val", "--top", "0.25", "--out", sel).stdout
    assert "selected 6 rows" in out
    chosen = read_rows(sel, required=("id", "score", "rank"))
    assert [r["rank"] for r in chosen] == [1, 2, 3, 4, 5, 6]
    assert all(a["score"] >= b["score"] for a, b in zip(chosen, chosen[1:]))
    sel2 = tmp_path / "sel2.parquet"
    run("select", "--store", store, "--train", "step0:train", "--val", "step0:val", "--top", "6", "--out", sel2,
        "--exclude", sel)
    assert not {r["id"] for r in chosen} & {r["id"] for r in read_rows(sel2, required=("id",))}

    pruned = tmp_path / "pruned.jsonl"
    assert "kept 6 of 24 rows" in run("prune", "--data", train, "--keep", sel, "--out", pruned).stdout
    assert [r["id"] for r in read_rows(pruned)] == [r["id"] for r in read_rows(train) if r["id"] in {c["id"] for c in chosen}]

    listing = run("ls", "--store", store).stdout
    assert "dim=1024" in listing and "step0" in listing and "train" in listing and " 24 " in listing
    table = run("query", "--store", store, "SELECT split, count(*) AS n FROM sketches GROUP BY split ORDER BY split").stdout
    assert table.splitlines()[0].split() == ["split", "n"]
    assert table.splitlines()[2].split() == ["train", "24"] and table.splitlines()[3].split() == ["val", "6"]
    joined = run("query", "--store", store, "SELECT count(*) FROM scores JOIN sketches USING (id) WHERE difficulty >= 1").stdout
    assert joined.splitlines()[2].strip() == "24"


def one_line_error(proc, pattern):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_errors_are_one_line_with_exit_code_2(tiny_model, sft_data, tmp_path):
    train, val = sft_data
    store = tmp_path / "store"
    base = ["--model", tiny_model, "--store", store, "--checkpoint", "c0", "--dim", 512, "--quiet"]
    run("build", *base, "--data", val, "--split", "val")
    snapshot = sorted(p.relative_to(store) for p in store.rglob("*") if ".lock" not in p.name)

    one_line_error(run("build", *base, "--data", tmp_path / "missing.jsonl", "--split", "t", ok=False), "data file not found")
    write_rows([{"id": 1, "prompt": "x"}], tmp_path / "bad.jsonl")
    one_line_error(run("build", *base, "--data", tmp_path / "bad.jsonl", "--split", "t", ok=False), "missing column(s) response")
    mismatch = ["--model", tiny_model, "--store", store, "--checkpoint", "c0", "--dim", 256, "--quiet"]
    one_line_error(run("build", *mismatch, "--data", train, "--split", "t", ok=False), "dim 256 != store 512")
    one_line_error(run("build", *base, "--data", train, "--split", "t", "--shard", "3/2", ok=False), "invalid shard 3/2")
    one_line_error(run("score", "--store", store, "--train", "c9:train", "--val", "c0:val", ok=False), "c9:train")
    one_line_error(run("score", "--store", store, "--train", "oops", "--val", "c0:val", ok=False), "expected CHECKPOINT:SPLIT")
    one_line_error(run("ls", "--store", tmp_path, ok=False), "not a sketch store")
    one_line_error(run("ls", "--store", tmp_path / "nowhere", ok=False), "not found")
    one_line_error(run("query", "--store", store, "SELECT * FROM nope", ok=False), "query failed")
    one_line_error(run("select", "--store", store, "--train", "c0:val", "--val", "c0:val", "--top", "zero",
                       "--out", tmp_path / "s.jsonl", ok=False), "--top")
    assert sorted(p.relative_to(store) for p in store.rglob("*") if ".lock" not in p.name
                  and "scores" not in p.parts and ".staging" not in p.parts) == [
        p for p in snapshot if "scores" not in p.parts and ".staging" not in p.parts]

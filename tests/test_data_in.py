"""Data in without a conversion step: JSONL/JSON, Parquet, Parquet shards, datasets save_to_disk
directories, GSM8K and MATH rows as released, and column mapping, through `sketch build` and
`cropi rollout`."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from datasets import Dataset, DatasetDict

from cli.cropi import main as cropi_main
from cli.sketch import main as sketch_main
from cropi.tasks import read_tasks
from cropi.trajectory import PartWriter, Trajectory
from gsm8k_math_rows import GSM8K_FINALS, GSM8K_ROWS, MATH_FINALS, MATH_ROWS
from sketchstore import SketchStore
from sketchstore.data import ColumnMap, read_rows, read_source, stable_id, stable_ids, write_rows
from sketchstore.errors import BadInputError


def _run(main, *args):
    return CliRunner().invoke(main, list(map(str, args)))


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and needle in result.output


@pytest.fixture
def sources(tmp_path):
    """The GSM8K rows in every layout a user may have them in, by name."""
    rows = GSM8K_ROWS
    write_rows(rows, tmp_path / "gsm8k.jsonl")
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))
    write_rows(rows, tmp_path / "gsm8k.parquet")
    (tmp_path / "shards").mkdir()
    for i, chunk in enumerate((rows[:2], rows[2:])):
        pq.write_table(pa.Table.from_pylist(chunk), tmp_path / f"shards/train-{i:05d}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(MATH_ROWS), tmp_path / "shards/test-00000-of-00001.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    return {"jsonl": tmp_path / "gsm8k.jsonl", "json": tmp_path / "gsm8k.json", "parquet": tmp_path / "gsm8k.parquet",
            "glob": tmp_path / "shards/train-*.parquet", "hf": tmp_path / "hf"}


def test_every_source_reads_the_same_rows(sources, tmp_path):
    assert sorted((sources["hf"]).glob("*.arrow")) and len(list(sources["hf"].glob("*.arrow"))) == 2
    for name, path in sources.items():
        assert read_source(path) == GSM8K_ROWS, name
    assert read_source(tmp_path / "shards") == MATH_ROWS + GSM8K_ROWS  # a directory: all its shards, by name
    DatasetDict({"train": Dataset.from_list(GSM8K_ROWS), "test": Dataset.from_list(MATH_ROWS)}).save_to_disk(
        str(tmp_path / "dd"))
    assert read_source(tmp_path / "dd/test") == MATH_ROWS
    with pytest.raises(BadInputError, match=r"DatasetDict with splits train, test; give one split's directory"):
        read_source(tmp_path / "dd")
    with pytest.raises(BadInputError, match="no file matches"):
        read_source(tmp_path / "shards/validation-*.parquet")


def test_cropi_reads_gsm8k_and_math_as_released(sources, tmp_path):
    for path in sources.values():
        tasks = read_tasks(path)
        assert [t["answer"] for t in tasks] == GSM8K_FINALS
        assert [t["id"] for t in tasks] == [stable_id(r["question"]) for r in GSM8K_ROWS]
        assert tasks[0]["prompt"] == GSM8K_ROWS[0]["question"] and tasks[0]["response"].endswith("The answer is 18.")
    math = read_tasks(tmp_path / "shards/test-*.parquet")
    assert [t["answer"] for t in math] == MATH_FINALS and math[0]["family"] == "math/Algebra"
    renamed = [{"uid": f"q{i}", "instruction": r["question"], "solution_text": r["answer"]}
               for i, r in enumerate(GSM8K_ROWS)]
    write_rows(renamed, tmp_path / "renamed.parquet")
    mapped = read_tasks(tmp_path / "renamed.parquet", ColumnMap(prompt_column="instruction", id_column="uid",
                                                               answer_column="solution_text"))
    assert [(t["id"], t["answer"]) for t in mapped] == [(f"q{i}", a) for i, a in enumerate(GSM8K_FINALS)]
    with pytest.raises(BadInputError, match=r"no column 'question' \(--prompt-column\); its columns: uid, "
                                            r"instruction, solution_text"):
        read_tasks(tmp_path / "renamed.parquet", ColumnMap(prompt_column="question"))


def test_stable_ids_hash_the_prompt_and_number_repeats():
    assert stable_id("a") == "h-" + hashlib.sha1(b"a").hexdigest()[:16]
    assert stable_ids(["a", "b", "a", "a"]) == [stable_id("a"), stable_id("b"), stable_id("a") + "-1",
                                                stable_id("a") + "-2"]


def test_sketch_build_reads_datasets_dir_and_mapped_shards(tiny_model, sources, tmp_path):
    """One store, three splits of the same rows: the datasets directory (GSM8K layout), native JSONL,
    and renamed Parquet shards through the column options. Their sketches are bit-identical."""
    native = [{"id": stable_id(r["question"]), "prompt": r["question"], "response": r["answer"]} for r in GSM8K_ROWS]
    write_rows(native, tmp_path / "native.jsonl")
    (tmp_path / "renamed").mkdir()
    for i, row in enumerate(native):
        write_rows([{"key": row["id"], "instruction": row["prompt"], "output": row["response"]}],
                   tmp_path / f"renamed/part-{i}.parquet")
    store = tmp_path / "store"
    base = ["build", "--model", tiny_model, "--store", store, "--checkpoint", "c0", "--dim", 256, "--quiet"]
    mapping = ["--prompt-column", "instruction", "--response-column", "output", "--id-column", "key"]
    for split, data, extra in [("hf", sources["hf"], []), ("native", tmp_path / "native.jsonl", []),
                               ("mapped", tmp_path / "renamed/*.parquet", mapping)]:
        result = _run(sketch_main, *base, "--data", data, "--split", split, *extra)
        assert result.exit_code == 0, result.output
        assert "5 rows added" in result.output
    opened = SketchStore.open(store)
    ids, reference = opened.read("c0", "native")
    for split in ("hf", "mapped"):
        other_ids, sketches = opened.read("c0", split)
        assert other_ids == ids and torch.equal(sketches, reference)
    _one_line_error(_run(sketch_main, *base, "--data", sources["hf"], "--split", "bad", "--prompt-column", "prompt"),
                    "no column 'prompt' (--prompt-column); its columns: question, answer")
    write_rows([{"instruction": "x", "output": "y"}], tmp_path / "alpaca.jsonl")
    _one_line_error(_run(sketch_main, *base, "--data", tmp_path / "alpaca.jsonl", "--split", "bad"),
                    "row 0 is missing column(s) id, prompt, response (its columns: instruction, output; name one "
                    "with --id-column or --prompt-column or --response-column)")


def test_prune_keeps_the_released_columns(sources, tmp_path):
    rows = read_rows(sources["hf"], required=("id",))
    assert [sorted(r) for r in rows] == [["answer", "id", "question"]] * 5
    write_rows([{"id": rows[1]["id"]}], tmp_path / "keep.jsonl")
    result = _run(sketch_main, "prune", "--data", sources["hf"], "--keep", tmp_path / "keep.jsonl",
                  "--out", tmp_path / "pruned.jsonl")
    assert result.exit_code == 0, result.output
    assert read_source(tmp_path / "pruned.jsonl") == [{"id": rows[1]["id"], **GSM8K_ROWS[1]}]


def test_cropi_rollout_reads_datasets_dir(tiny_model, sources, tmp_path):
    """The rollout finds every prompt of the datasets directory already sampled under the ids it
    derives (so it starts no engine), and a wrong column is one line naming the columns."""
    out = tmp_path / "traj.parquet"
    out.mkdir()
    PartWriter(out).write([Trajectory(prompt_id=stable_id(r["question"]), behaviour="b", sample=s, prompt_token_ids=[1],
                                      response_token_ids=[2], behaviour_logprobs=[-0.5], temperature=1.0, top_p=1.0,
                                      reward=0.0) for r in GSM8K_ROWS for s in range(2)])
    args = ["rollout", "--model", tiny_model, "--data", sources["hf"], "--out", out, "--n", 2, "--behaviour", "b",
            "--quiet"]
    result = _run(cropi_main, *args)
    assert result.exit_code == 0, result.output
    assert "0 prompts sampled, 5 skipped (of 5)" in result.output
    _one_line_error(_run(cropi_main, *args, "--answer-column", "final"),
                    "no column 'final' (--answer-column); its columns: question, answer")

"""``build_sketches`` on a real (tiny) Qwen2: exact gradients, resume, spec and model checks, fidelity."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from sketchstore import BuildConfig, ProjectionSpec, ScoreOptions, SketchStore, SplitRef, build_sketches, load_scores, score
from sketchstore.data import read_rows, write_rows
from sketchstore.errors import BadInputError, SpecMismatchError
from sketchstore.gradients import load_model
from sketchstore.sft import SFTObjective
from sketchstore_fixtures import other_tiny_model, sft_data, tiny_model  # noqa: F401  (fixtures)

DIM = 2048


def config(model, data, store, **kw):
    base = dict(model=model, data=data, store=store, checkpoint="c0", split="train",
                spec=ProjectionSpec(dim=DIM, seed=1), flush_rows=10, batch_size=4)
    return BuildConfig(**{**base, **kw})


def exact_gradients(model_dir, rows):
    """Flattened gradients from Hugging Face's own label loss (mean NLL over response tokens)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    _, tokenizer = load_model(model_dir)
    objective = SFTObjective(tokenizer)
    out = []
    for row in rows:
        input_ids, labels = objective.encode(row)
        model.zero_grad()
        model(input_ids=input_ids, labels=labels).loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(out)


def test_build_stores_every_row_with_exact_norms(tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    report = build_sketches(config(tiny_model, train, tmp_path / "s"), progress=False)
    assert (report.total, report.added, report.skipped) == (24, 24, 0)
    store = SketchStore.open(tmp_path / "s")
    manifest = {r["id"]: r for r in store.manifest().to_pylist()}
    rows = read_rows(train)
    assert set(manifest) == {r["id"] for r in rows}
    exact = exact_gradients(tiny_model, rows[:3])
    for row, grad in zip(rows[:3], exact):
        assert manifest[row["id"]]["grad_norm"] == pytest.approx(float(grad.norm()), rel=1e-4)
        assert manifest[row["id"]]["difficulty"] == row["difficulty"]  # metadata kept
        assert manifest[row["id"]]["n_tokens"] > 0
    assert store.spec.param_hash  # filled in from the model


def test_resume_after_interrupt_is_identical(tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    build_sketches(config(tiny_model, train, tmp_path / "full"), progress=False)

    def stop_after_first_part(added):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_sketches(config(tiny_model, train, tmp_path / "resumed"), progress=False, on_part=stop_after_first_part)
    assert SketchStore.open(tmp_path / "resumed").keys() == [("c0", "train", 10)]
    again = build_sketches(config(tiny_model, train, tmp_path / "resumed"), progress=False)
    assert (again.added, again.skipped) == (14, 10)
    ids_a, a = SketchStore.open(tmp_path / "full").read("c0", "train")
    ids_b, b = SketchStore.open(tmp_path / "resumed").read("c0", "train", ids=ids_a)
    assert torch.equal(a, b)
    assert build_sketches(config(tiny_model, train, tmp_path / "resumed"), progress=False).added == 0


def test_sketch_does_not_depend_on_batching(tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    build_sketches(config(tiny_model, train, tmp_path / "b1", batch_size=1), progress=False)
    build_sketches(config(tiny_model, train, tmp_path / "b7", batch_size=7, flush_rows=24), progress=False)
    ids, a = SketchStore.open(tmp_path / "b1").read("c0", "train")
    _, b = SketchStore.open(tmp_path / "b7").read("c0", "train", ids=ids)
    assert torch.equal(a, b)


def test_mismatches_are_refused_and_store_kept(tiny_model, other_tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    build_sketches(config(tiny_model, train, tmp_path / "s"), progress=False)
    before = SketchStore.open(tmp_path / "s").manifest().num_rows
    with pytest.raises(SpecMismatchError, match="dim 1024 != store 2048"):
        build_sketches(config(tiny_model, train, tmp_path / "s", spec=ProjectionSpec(dim=1024, seed=1)), progress=False)
    with pytest.raises(SpecMismatchError, match="seed 2 != store 1"):
        build_sketches(config(tiny_model, train, tmp_path / "s", spec=ProjectionSpec(dim=DIM, seed=2)), progress=False)
    with pytest.raises(SpecMismatchError, match="param_hash"):
        build_sketches(config(tiny_model, train, tmp_path / "s", params=("*mlp*",)), progress=False)
    with pytest.raises(SpecMismatchError, match="checkpoint 'c0' in the store was built from other weights"):
        build_sketches(config(other_tiny_model, train, tmp_path / "s", split="val"), progress=False)
    # the other model is fine under its own checkpoint name
    assert build_sketches(config(other_tiny_model, train, tmp_path / "s", checkpoint="c1"), progress=False).added == 24
    assert SketchStore.open(tmp_path / "s").manifest(checkpoint="c0").num_rows == before


def test_bfloat16_builds_close_sketches_and_never_mixes_with_float32(tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    factored = ProjectionSpec(dim=DIM, seed=1, mode="factored")
    build_sketches(config(tiny_model, train, tmp_path / "f32", spec=factored), progress=False)
    build_sketches(config(tiny_model, train, tmp_path / "bf16", spec=factored, compute_dtype="bfloat16"), progress=False)
    ids, a = SketchStore.open(tmp_path / "f32").read("c0", "train")
    _, b = SketchStore.open(tmp_path / "bf16").read("c0", "train", ids=ids)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    assert not torch.equal(a, b) and cos.min() > 0.95  # bf16 arithmetic, the same gradients
    before = SketchStore.open(tmp_path / "f32").read("c0", "train", ids=ids)[1]
    with pytest.raises(SpecMismatchError, match="another --compute-dtype"):  # same weights, other dtype
        build_sketches(config(tiny_model, train, tmp_path / "f32", spec=factored, split="val",
                              compute_dtype="bfloat16"), progress=False)
    assert torch.equal(SketchStore.open(tmp_path / "f32").read("c0", "train", ids=ids)[1], before)
    with pytest.raises(BadInputError, match="unknown compute dtype 'float16'"):
        config(tiny_model, train, tmp_path / "x", compute_dtype="float16")


def test_auto_batch_size_bounds_logits_per_pass(tiny_model, sft_data, tmp_path):
    from sketchstore.build import AUTO_BATCH_LOGITS, MAX_AUTO_BATCH, rows_per_pass

    train, _ = sft_data
    model, _ = load_model(tiny_model)
    vocab = model.get_output_embeddings().weight.shape[0]
    short = config(tiny_model, train, tmp_path / "s", batch_size=0, max_length=16)
    assert rows_per_pass(short, model) == min(MAX_AUTO_BATCH, AUTO_BATCH_LOGITS // (vocab * 16))
    huge = config(tiny_model, train, tmp_path / "s", batch_size=0, max_length=AUTO_BATCH_LOGITS // vocab + 1)
    assert rows_per_pass(huge, model) == 1
    assert rows_per_pass(config(tiny_model, train, tmp_path / "s", batch_size=3), model) == 3


def test_write_rows_keeps_every_column_and_nothing_half_written(tmp_path):
    rows = [{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q", "level": 3}]
    path = write_rows(rows, tmp_path / "rows.parquet")
    assert read_rows(path) == [{"id": "a", "prompt": "p", "level": None}, {"id": "b", "prompt": "q", "level": 3}]
    with pytest.raises(pa.ArrowException):
        write_rows([{"id": "a", "x": 1}, {"id": "b", "x": "text"}], tmp_path / "mixed.parquet")  # no Arrow type fits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet"]


def test_bad_data_is_named(tiny_model, tmp_path):
    write_rows([{"id": "a", "prompt": "1+1?"}], tmp_path / "noresp.jsonl")
    with pytest.raises(BadInputError, match=r"noresp.jsonl: row 0 is missing column\(s\) response"):
        build_sketches(config(tiny_model, tmp_path / "noresp.jsonl", tmp_path / "s"), progress=False)
    write_rows([{"id": "a", "prompt": "p", "response": "r"}] * 2, tmp_path / "dup.jsonl")
    with pytest.raises(BadInputError, match="duplicate id 'a'"):
        build_sketches(config(tiny_model, tmp_path / "dup.jsonl", tmp_path / "s"), progress=False)
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": \n')
    with pytest.raises(BadInputError, match=r"broken.jsonl:2: malformed JSON"):
        build_sketches(config(tiny_model, tmp_path / "broken.jsonl", tmp_path / "s"), progress=False)
    with pytest.raises(BadInputError, match="data file not found"):
        build_sketches(config(tiny_model, tmp_path / "nope.jsonl", tmp_path / "s"), progress=False)
    write_rows([{"id": "a", "prompt": "p", "response": "r"}], tmp_path / "ok.jsonl")
    with pytest.raises(BadInputError, match="no config.json"):
        build_sketches(config(tmp_path, tmp_path / "ok.jsonl", tmp_path / "s"), progress=False)
    with pytest.raises(BadInputError, match="invalid checkpoint name"):
        config(tiny_model, tmp_path / "dup.jsonl", tmp_path / "s", checkpoint="a:b")
    assert not (tmp_path / "s").exists()


def test_shards_are_disjoint_and_cover(tiny_model, sft_data, tmp_path):
    train, _ = sft_data
    added = [build_sketches(config(tiny_model, train, tmp_path / "s", shard=(i, 3)), progress=False).added
             for i in range(3)]
    assert sum(added) == 24 and all(a > 0 for a in added)
    ids = SketchStore.open(tmp_path / "s").manifest().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24


def test_sketch_scores_track_exact_gradient_cosines(tiny_model, sft_data, tmp_path):
    train, val = sft_data
    build_sketches(config(tiny_model, train, tmp_path / "s", spec=ProjectionSpec(dim=8192, seed=1)), progress=False)
    build_sketches(config(tiny_model, val, tmp_path / "s", split="val", spec=ProjectionSpec(dim=8192, seed=1)),
                   progress=False)
    store = SketchStore.open(tmp_path / "s", writable=True)
    score(store, SplitRef("c0", "train"), [SplitRef("c0", "val")], progress=False)
    got = load_scores(store, SplitRef("c0", "train"), [SplitRef("c0", "val")], ScoreOptions())[SplitRef("c0", "val")]
    rows, vrows = read_rows(train), read_rows(val)
    g, v = exact_gradients(tiny_model, rows), exact_gradients(tiny_model, vrows)
    g, v = g / g.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    exact = (g @ v.T).mean(1)
    sketched = torch.tensor([got[r["id"]] for r in rows])
    assert (sketched - exact).abs().max() < 0.05  # JL: ~3/sqrt(8192) per cosine, averaged over 6 val rows
    rank = lambda x: x.argsort().argsort().float()
    spearman = torch.corrcoef(torch.stack([rank(sketched), rank(exact)]))[0, 1]
    assert spearman > 0.9, spearman

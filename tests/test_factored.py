"""Factored sketches on a real tiny Qwen2: equal to the Kronecker projection of exact per-example
gradients (one layer, whole model, tied embedding/lm_head), independent of batching, JL-faithful,
exact norms, spec mixing refused, CLI end to end. The SFT objective here; the same checks under
POPI (cropi's objective) are in test_factored_popi.py, which calls the ``check_*`` helpers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sketchstore import BuildConfig, ProjectionSpec, SketchStore, build_sketches, catalog
from sketchstore.data import read_rows
from sketchstore.errors import BadInputError, SpecMismatchError
from sketchstore import factored_blocks
from sketchstore.factor_projection import CountSketch, FactorProjection, FoldedHash, apply_led, apply_sketch, factor_dims
from sketchstore.factored import FactoredSketcher, fast_bfloat16, plan_passes
from sketchstore.gradients import load_model, per_example_gradients, select_parameters
from sketchstore.sft import SFTObjective
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)

TIED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def sft_rows(sft_data):
    return read_rows(sft_data[0])[:5]


def exact(model, objective, rows, params):
    """Exact per-row gradients by autograd (per_example_gradients freezes unselected parameters:
    restore the flags so later selections see every parameter)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    items = list(per_example_gradients(model, objective, rows, params))
    for p, flag in flags:
        p.requires_grad_(flag)
    return {n: torch.cat([it.grads[n] for it in items]) for n, _ in params}, [it.grad_norm for it in items]


def kronecker(sketcher, grads):
    """P_row G P_col^T with the sketcher's seeded factors as explicit matrices (None = identity)."""
    out = {}
    for name, g in grads.items():
        if g.dim() == 3:
            p_row, p_col = sketcher.projection.factor(name, "row"), sketcher.projection.factor(name, "col")
            g = (p_row if p_row is not None else torch.eye(g.shape[1])) @ g
            g = g @ (p_col if p_col is not None else torch.eye(g.shape[2])).T
        out[name] = g
    return out


def close(a, b, rtol=1e-4):
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale) < rtol


def check_one_linear_layer(model, objective, rows):
    """One projected layer's blocks, norms and sketches against the Kronecker projection of exact gradients."""
    name = "model.layers.0.mlp.down_proj.weight"  # 64 x 384
    params = select_parameters(model, [name])
    spec = ProjectionSpec(dim=128, seed=3, mode="factored", factor_side=32)  # both sides projected
    sketcher = FactoredSketcher(model, params, spec)
    assert factor_dims((64, 384), 32) == (32, 32) and sketcher.projection.factor(name, "row").shape == (32, 64)
    grads, norms = exact(model, objective, rows, params)
    blocks, sq_norms, _ = sketcher.blocks(objective.batch(rows))
    expected = kronecker(sketcher, grads)[name]
    assert blocks[name].shape == (len(rows), 32, 32)
    assert close(blocks[name], expected)
    assert torch.allclose(sq_norms.sqrt(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)
    sketch = sketcher.sketch_batch(objective.batch(rows)).sketches
    assert close(sketch, sketcher.projection.final.project({name: expected}))


def test_one_linear_layer_equals_kronecker_projection(model_tok, sft_rows):
    model, tok = model_tok
    check_one_linear_layer(model, SFTObjective(tok), sft_rows)


def check_whole_model(model, objective, rows, dim):
    """Every parameter's blocks (tied embedding included), norms, sketches and losses against exact gradients."""
    params = select_parameters(model)
    assert TIED in dict(params) and model.lm_head.weight is model.model.embed_tokens.weight
    sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=dim, seed=1, mode="factored"))
    grads, norms = exact(model, objective, rows, params)
    expected = kronecker(sketcher, grads)
    batch = objective.batch(rows)
    blocks, sq_norms, losses = sketcher.blocks(batch)
    assert sorted(blocks) == sorted(expected)
    for name in expected:  # incl. the tied embedding (lm_head + lookup), q/k/v biases, RMSNorm weights
        assert close(blocks[name], expected[name]), name
    assert torch.allclose(sq_norms.sqrt(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)
    result = sketcher.sketch_batch(batch)
    assert close(result.sketches, sketcher.projection.final.project(expected))
    assert close(result.sketches, sketcher.projection.reference(grads))
    assert result.grad_norms == pytest.approx(norms, rel=1e-5)
    for row, loss in zip(rows, losses):
        ref, _ = objective.loss(model, row)
        assert loss == pytest.approx(0.0 if ref is None else float(ref.detach()), abs=1e-5)


@pytest.mark.parametrize("dim", [128, 2048])
def test_whole_model_equals_kronecker_projection(model_tok, sft_rows, dim):
    model, tok = model_tok
    check_whole_model(model, SFTObjective(tok), sft_rows, dim)


def test_parameter_selection_is_respected(model_tok, sft_rows):
    model, tok = model_tok
    params = select_parameters(model, ["*mlp*", "*norm*"])
    sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=512, mode="factored"))
    grads, norms = exact(model, SFTObjective(tok), sft_rows, params)
    result = sketcher.sketch_batch(SFTObjective(tok).batch(sft_rows))
    assert close(result.sketches, sketcher.projection.final.project(kronecker(sketcher, grads)))
    assert result.grad_norms == pytest.approx(norms, rel=1e-5)


def check_batch_independent(model, objective, rows):
    """Each row's sketch and norm alone equal its sketch and norm within the batch."""
    sketcher = FactoredSketcher(model, select_parameters(model), ProjectionSpec(dim=1024, mode="factored"))
    together = sketcher.sketch_batch(objective.batch(rows))
    for i, row in enumerate(rows):
        alone = sketcher.sketch_batch(objective.batch([row]))
        assert torch.allclose(alone.sketches[0], together.sketches[i], rtol=1e-4, atol=1e-6)
        assert alone.grad_norms[0] == pytest.approx(together.grad_norms[i], rel=1e-5, abs=1e-12)


def test_row_sketch_does_not_depend_on_its_batch(model_tok, sft_rows):
    model, tok = model_tok
    check_batch_independent(model, SFTObjective(tok), sft_rows)
    # several passes (lengths far apart) give the same sketches as one pass
    assert len(plan_passes([40, 40, 39, 10, 9])) == 2
    assert [p.tolist() for p in plan_passes([3, 9, 3, 8])] == [[1, 3], [0, 2]]
    assert [p.tolist() for p in plan_passes([5, 5, 5, 5, 5], max_sequences=2)] == [[0, 1], [2, 3], [4]]


def test_sketch_rows_sorts_a_window_by_length_and_reports_rows(model_tok, sft_data):
    """With norms "sketch" the rows of a call form one batch whose passes take sequences of
    similar lengths from all of them (at most batch_size per pass), and progress is reported
    per pass; the sketches are those of batches of batch_size rows in file order."""
    model, tok = model_tok
    objective = SFTObjective(tok)
    rows = read_rows(sft_data[0])[:12]
    spec = ProjectionSpec(dim=1024, seed=3, mode="factored")
    sketcher = FactoredSketcher(model, select_parameters(model), spec, norms="sketch", block_dtype="float32")
    passes, done = [], []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    try:
        sorted_rows = sketcher.sketch_rows(objective, rows, batch_size=4, on_row=done.append)
    finally:
        handle.remove()
    lengths = [len(q) for q in objective.batch(rows).sequences]
    expected = plan_passes(lengths, max_sequences=4)
    assert passes == [len(p) for p in expected] and max(passes) <= 4 and sum(done) == len(rows)
    assert len(done) == len(expected)  # one report per pass
    in_order = torch.cat([sketcher.sketch_batch(objective.batch(rows[lo:lo + 4])).sketches for lo in range(0, 12, 4)])
    assert close(sorted_rows.sketches, in_order, rtol=1e-5)
    # padding: the sorted passes pad less than passes within batches of 4 rows in file order
    def padding(groups):
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)
    file_order = [[lo + int(i) for i in p] for lo in range(0, 12, 4) for p in plan_passes(lengths[lo:lo + 4])]
    assert padding([p.tolist() for p in expected]) < padding(file_order)


def test_sketch_cosines_track_exact_cosines(model_tok, sft_data):
    model, tok = model_tok
    rows = read_rows(sft_data[0])
    params = select_parameters(model)
    grads, _ = exact(model, SFTObjective(tok), rows, params)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1).double()
    sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=8192, seed=7, mode="factored"))
    sk = sketcher.sketch_rows(SFTObjective(tok), rows, batch_size=8).sketches.double()

    def cosines(x):
        x = x / x.norm(dim=1, keepdim=True)
        return (x @ x.T)[torch.triu_indices(len(x), len(x), 1).unbind()]

    exact_cos, sketch_cos = cosines(flat), cosines(sk)
    err = (sketch_cos - exact_cos).abs()  # JL: ~1/sqrt(k) per cosine, plus the Kronecker stage
    assert err.mean() < 0.02 and err.max() < 0.1, (err.mean(), err.max())
    assert torch.corrcoef(torch.stack([sketch_cos, exact_cos]))[0, 1] > 0.95
    inner = (sk @ sk.T) / (flat @ flat.T)  # unbiased inner products: same scale as the gradients
    assert inner.diag().mean() == pytest.approx(1.0, abs=0.05)


def test_store_refuses_mixing_factored_and_sparse(tiny_model, sft_data, tmp_path):
    train, val = sft_data
    common = dict(model=tiny_model, store=tmp_path / "s", checkpoint="c0", flush_rows=24)
    build_sketches(BuildConfig(data=train, split="train", spec=ProjectionSpec(dim=512, mode="factored"), **common),
                   progress=False)
    with pytest.raises(SpecMismatchError, match="mode 'sparse' != store 'factored'"):
        build_sketches(BuildConfig(data=val, split="val", spec=ProjectionSpec(dim=512), **common), progress=False)
    build_sketches(BuildConfig(data=train, split="train", spec=ProjectionSpec(dim=512), model=tiny_model,
                               store=tmp_path / "t", checkpoint="c0"), progress=False)
    with pytest.raises(SpecMismatchError, match="mode 'factored' != store 'sparse'"):
        build_sketches(BuildConfig(data=val, split="val", spec=ProjectionSpec(dim=512, mode="factored"),
                                   model=tiny_model, store=tmp_path / "t", checkpoint="c0"), progress=False)


def test_factor_side_is_part_of_the_spec_and_old_factored_stores_keep_their_rule(tiny_model, sft_data, tmp_path):
    assert ProjectionSpec(dim=8192, mode="factored").factor_side == 128  # the default rule
    assert ProjectionSpec(dim=8192).factor_side == 0  # other modes have none
    legacy = ProjectionSpec(dim=512, mode="factored").to_dict()
    del legacy["factor_side"]  # a factored store written before the field: its rule was 2**ceil(log2(sqrt(8 dim)))
    assert ProjectionSpec.from_dict(legacy).factor_side == 64
    assert ProjectionSpec.from_dict({k: v for k, v in ProjectionSpec(dim=512).to_dict().items()
                                     if k != "factor_side"}) == ProjectionSpec(dim=512)
    for bad, message in ((dict(mode="factored", factor_side=48), "power of two"),
                         (dict(mode="sparse", factor_side=64), "factored only")):
        with pytest.raises(BadInputError, match=message):
            ProjectionSpec(**bad)
    common = dict(model=tiny_model, data=sft_data[1], store=tmp_path / "s", checkpoint="c0", split="val")
    build_sketches(BuildConfig(spec=ProjectionSpec(dim=512, mode="factored", factor_side=64), **common), progress=False)
    with pytest.raises(SpecMismatchError, match="factor_side 32 != store 64"):
        build_sketches(BuildConfig(spec=ProjectionSpec(dim=512, mode="factored", factor_side=32), **common),
                       progress=False)


def test_refusals(model_tok, tiny_model, sft_data, tmp_path):
    model, _ = model_tok
    with pytest.raises(BadInputError, match="keep ratio 1"):
        FactoredSketcher(model, select_parameters(model), ProjectionSpec(mode="factored", keep_ratio=0.1))
    with pytest.raises(BadInputError, match="mode 'factored'"):
        FactoredSketcher(model, select_parameters(model), ProjectionSpec(mode="sparse"))
    with pytest.raises(BadInputError, match="cannot sketch parameter.*stray"):
        FactoredSketcher(model, [("stray", nn.Parameter(torch.zeros(3)))], ProjectionSpec(mode="factored"))
    with pytest.raises(BadInputError, match="keep ratio 1"):
        build_sketches(BuildConfig(model=tiny_model, data=sft_data[0], store=tmp_path / "s", checkpoint="c", split="t",
                                   spec=ProjectionSpec(dim=256, mode="factored", keep_ratio=0.5)), progress=False)
    assert not (tmp_path / "s").exists()  # refused before the store is created


def test_cli_build_projection_factored(tiny_model, sft_data, tmp_path):
    from cli.sketch import main

    store = tmp_path / "store"
    args = ["build", "--model", str(tiny_model), "--data", str(sft_data[0]), "--store", str(store), "--checkpoint",
            "c0", "--split", "train", "--dim", "1024", "--projection", "factored", "--batch-size", "16", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "24 rows added" in result.output
    assert SketchStore.open(store).spec.mode == "factored"
    result = CliRunner().invoke(main, args[:-5] + ["--projection", "sparse", "--quiet"])
    assert result.exit_code != 0 and "mode 'sparse' != store 'factored'" in result.output


def check_sketch_norms(model, objective, rows):
    """norms="sketch": the same sketches, the sketch's own norm as grad_norm, zero where exact is zero."""
    params = select_parameters(model)
    spec = ProjectionSpec(dim=1024, seed=4, mode="factored")
    exact_mode = FactoredSketcher(model, params, spec)
    sketch_mode = FactoredSketcher(model, params, spec, norms="sketch", block_dtype="float32")
    batch = objective.batch(rows)
    a, b = exact_mode.sketch_batch(batch), sketch_mode.sketch_batch(batch)
    assert close(b.sketches, a.sketches, rtol=1e-5)  # same blocks (exact mode may hash an explicit G)
    assert b.grad_norms == b.sketches.norm(dim=1).tolist()  # the store's sketch_norm, bit for bit
    assert b.grad_norms != pytest.approx(a.grad_norms, rel=1e-4)  # an estimate, not the exact norm
    assert [n == 0 for n in b.grad_norms] == [n == 0 for n in a.grad_norms]
    assert sketch_mode.blocks(batch)[1] is None


def test_sketch_norms_equal_the_sketch_norm_and_keep_the_sketches(model_tok, sft_rows):
    model, tok = model_tok
    check_sketch_norms(model, SFTObjective(tok), sft_rows)
    with pytest.raises(BadInputError, match="exact, sketch"):
        FactoredSketcher(model, select_parameters(model), ProjectionSpec(dim=1024, mode="factored"), norms="approx")


def test_sketch_norm_is_unbiased_in_square_over_seeds(model_tok, sft_rows):
    model, tok = model_tok
    params = select_parameters(model)
    grads, norms = exact(model, SFTObjective(tok), sft_rows, params)
    exact_sq = torch.tensor(norms, dtype=torch.float64) ** 2
    # the sketches of explicit gradients under each seed's factors (== sketch_batch's, tested above)
    per_seed = torch.stack([
        FactoredSketcher(model, params, ProjectionSpec(dim=256, seed=seed, mode="factored"))
        .projection.reference(grads).double().pow(2).sum(1).div(exact_sq).mean() for seed in range(48)])
    assert per_seed.std() > 0.005  # a random estimate ...
    assert abs(float(per_seed.mean()) - 1) < 4 * float(per_seed.std()) / 48 ** 0.5, per_seed  # ... unbiased in square


def test_dropping_zero_gradient_tokens_is_exact(model_tok, sft_rows, monkeypatch):
    model, tok = model_tok
    params = select_parameters(model, ["model.layers.1.*", "lm_head.weight", TIED])
    sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=512, seed=5, mode="factored"))
    grads, norms = exact(model, SFTObjective(tok), sft_rows, params)
    kept = []
    compact = factored_blocks.compact

    def counted(a, b, layout):
        out = compact(a, b, layout)
        kept.append(out[0].shape[0] / a.shape[0])
        return out

    monkeypatch.setattr(factored_blocks, "compact", counted)
    blocks, sq_norms, _ = sketcher.blocks(SFTObjective(tok).batch(sft_rows))
    assert min(kept) < factored_blocks.COMPACT_BELOW  # the last layer's prompt tokens carry no gradient
    expected = kronecker(sketcher, grads)
    for name in expected:
        assert close(blocks[name], expected[name]), name
    assert torch.allclose(sq_norms.sqrt(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5)


def test_build_and_cli_record_the_norm_kind(tiny_model, sft_data, tmp_path):
    from cli.sketch import main

    common = ["build", "--model", str(tiny_model), "--data", str(sft_data[0]), "--checkpoint", "c0", "--split",
              "train", "--dim", "512", "--dtype", "float32", "--projection", "factored", "--quiet"]
    for kind in ("exact", "sketch"):
        result = CliRunner().invoke(main, common + ["--store", str(tmp_path / kind), "--norms", kind,
                                                    "--block-dtype", "float32"])
        assert result.exit_code == 0, result.output
    _, rows = catalog.query(SketchStore.open(tmp_path / "sketch"),
                            "SELECT id, grad_norm, sketch_norm, grad_norm_kind FROM sketches ORDER BY id")
    _, exact_rows = catalog.query(SketchStore.open(tmp_path / "exact"),
                                  "SELECT id, grad_norm, sketch_norm, grad_norm_kind FROM sketches ORDER BY id")
    assert [r[3] for r in rows] == ["sketch"] * 24 and [r[3] for r in exact_rows] == ["exact"] * 24
    assert all(r[1] == r[2] for r in rows)
    assert [r[1] for r in rows] != pytest.approx([r[1] for r in exact_rows], rel=1e-4)
    ids, x = SketchStore.open(tmp_path / "sketch").read("c0", "train")
    _, y = SketchStore.open(tmp_path / "exact").read("c0", "train", ids=ids)
    assert torch.allclose(x, y, atol=1e-5)
    result = CliRunner().invoke(main, common[:-3] + ["--store", str(tmp_path / "s"), "--norms", "sketch", "--quiet"])
    assert result.exit_code != 0 and "--norms sketch needs --projection factored" in result.output


def test_factor_version_seeds_shared_column_factors_and_old_stores_keep_theirs(model_tok, tiny_model, sft_data,
                                                                               sft_rows, tmp_path):
    model, tok = model_tok
    assert ProjectionSpec(dim=512, mode="factored").factor_version == 3 and ProjectionSpec(dim=512).factor_version == 0
    with pytest.raises(BadInputError, match="factor version must be 0 or one of"):
        ProjectionSpec(dim=512, mode="factored", factor_version=4)
    legacy = ProjectionSpec(dim=512, mode="factored").to_dict()
    del legacy["factor_version"]  # a factored store written before the field: every factor seeded by its name
    assert ProjectionSpec.from_dict(legacy).factor_version == 1
    with pytest.raises(BadInputError, match="factored only"):
        ProjectionSpec(factor_version=1)
    params = select_parameters(model, ["model.layers.0.self_attn.*", "model.layers.0.mlp.*"])
    q, k, gate = (f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj"))
    spec = ProjectionSpec(dim=512, mode="factored", factor_side=32)
    new, old = (FactoredSketcher(model, params, replace(spec, factor_version=v)).projection for v in (2, 1))
    assert new.sketch(q, "col") is new.sketch(k, "col") and new.sketch(q, "row") is not new.sketch(k, "row")
    assert not torch.equal(new.factor(q, "col"), new.factor(gate, "col"))  # another parent module
    assert not torch.equal(old.factor(q, "col"), old.factor(k, "col"))  # version 1: per parameter name
    # shared factors stay unbiased Kronecker projections; the streaming path projects a shared input once
    sketcher = FactoredSketcher(model, params, replace(spec, factor_version=2), norms="sketch", block_dtype="float32")
    grads, _ = exact(model, SFTObjective(tok), sft_rows, params)
    blocks, _, _ = sketcher.blocks(SFTObjective(tok).batch(sft_rows))
    expected = kronecker(sketcher, grads)
    for name in expected:
        assert close(blocks[name], expected[name]), name
    streamed = sketcher.sketch_batch(SFTObjective(tok).batch(sft_rows)).sketches
    assert close(streamed, sketcher.projection.reference(grads))
    common = dict(model=tiny_model, data=sft_data[1], store=tmp_path / "s", checkpoint="c0", split="val")
    build_sketches(BuildConfig(spec=replace(spec, factor_version=2), **common), progress=False)
    ids, before = SketchStore.open(tmp_path / "s").read("c0", "val")
    with pytest.raises(SpecMismatchError, match="factor_version 3 != store 2"):
        build_sketches(BuildConfig(spec=spec, **common), progress=False)
    store = SketchStore.open(tmp_path / "s")  # refused before writing: the store is as it was
    assert store.spec.factor_version == 2
    assert torch.equal(store.read("c0", "val", ids=ids)[1], before)
    with pytest.raises(BadInputError, match="unknown gradient norms 'approx'; choose one of auto, exact, sketch"):
        BuildConfig(spec=spec, norms="approx", **common)


def test_folded_factors_and_final_hash_follow_their_definition():
    """factor_version 3: coordinate i of a side goes to bucket i mod k (balanced), entry f of a
    parameter's block to (offset + f) mod dim, with seeded signs; both equal their dense definition."""
    sketch = CountSketch(300, 128, "folded", torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(sketch.bucket, torch.arange(300) % 128)
    dense = sketch.dense()
    assert sorted(set(dense.abs().sum(1).tolist())) == [2.0, 3.0]  # 300 = 2 * 128 + 44: balanced loads
    x = torch.randn(4, 5, 300)
    assert close(sketch.apply(x), x @ dense.T)
    hashed = CountSketch(300, 128, "hashed", torch.Generator().manual_seed(0), torch.device("cpu"))
    assert close(hashed.apply(x), x @ hashed.dense().T)
    # the streaming path's factors leave the first slice's signs out (one multiply-add fewer), bit for bit
    for size in (300, 256, 160):  # a partial last slice, whole slices, a partial second slice
        led = CountSketch(size, 128, "folded", torch.Generator().manual_seed(1), torch.device("cpu"))
        y = torch.randn(4, 5, size)
        assert torch.equal(led.apply_led(y), led.lead * led.apply(y)), size
    assert hashed.lead is None and torch.equal(hashed.apply_led(x), hashed.apply(x))
    final = FoldedHash(dim=64, seed=3, device=torch.device("cpu"))
    for name, value in (("w", torch.randn(3, 10, 20)), ("b", torch.randn(3, 40))):  # wraps around dim / fits
        out = torch.zeros(3, 64)
        final.accumulate(out, name, value)
        offset, _, signs = final._key(name, value[0].numel())
        sign = torch.cat(signs)
        expected = torch.zeros(3, 64)
        for f, column in enumerate(value.reshape(3, -1).T):
            expected[:, (offset + f) % 64] += sign[f] * column
        assert close(out, expected), name
    # ... and the final hash takes those signs back: the same sketch as hashing the signed block
    shapes = {"m.weight": (300, 200), "e.weight": (100, 64)}
    for version in (3, 1):
        projection = FactorProjection(ProjectionSpec(dim=512, mode="factored", factor_version=version), shapes,
                                      list(shapes), torch.device("cpu"))
        for name, (m, n) in shapes.items():
            g, x_in = torch.randn(3, 7, m), torch.randn(3, 7, n)
            signed = torch.bmm(apply_sketch(g, projection.sketch(name, "row")).transpose(1, 2),
                               apply_sketch(x_in, projection.sketch(name, "col")))
            led = torch.bmm(apply_led(g, projection.sketch(name, "row")).transpose(1, 2),
                            apply_led(x_in, projection.sketch(name, "col")))
            a, b = projection.accumulator(3), projection.accumulator(3)
            projection.accumulate(a, name, signed)
            projection.accumulate_led(b, name, led)
            assert close(projection.finish(b), projection.finish(a), rtol=1e-6), (version, name)
    assert final._key("w", 200)[0] != final._key("other", 200)[0] or not torch.equal(final._key("w", 200)[2][0][:40],
                                                                                      final._key("other", 200)[2][0][:40])


def test_streaming_computes_logits_at_loss_tokens_only(model_tok, sft_rows):
    """The output embedding sees each pass's loss positions, not its padded width (the sketches
    equal the exact-norm path's: check_sketch_norms)."""
    model, tok = model_tok
    batch = SFTObjective(tok).batch(sft_rows)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        FactoredSketcher(model, select_parameters(model), ProjectionSpec(dim=512, mode="factored"),
                         norms="sketch").sketch_batch(batch)
    finally:
        handle.remove()
    widths = [(len(index), max(len(batch.sequences[int(i)]) for i in index)) for index in plan_passes(
        [len(s) for s in batch.sequences])]
    loss_widths = [int(batch.loss_tokens(index)[2].max()) + 1 for index in plan_passes([len(s) for s in batch.sequences])]
    assert seen == [(n, width) for (n, _), width in zip(widths, loss_widths)]
    assert all(w < t for (_, t), w in zip(widths, loss_widths))


def test_backward_stops_at_the_lowest_sketched_layers(model_tok, sft_rows):
    """Linear weights only: the embedding's output never enters the graph (the first layer's
    q/k/v outputs are the leaves: no input gradient below them), and the sketches still equal
    those of exact gradients."""
    model, tok = model_tok
    params = select_parameters(model, ["model.layers.*proj.weight"])
    objective = SFTObjective(tok)
    in_graph = []  # whether the first layer's q_proj input (the normalised embedding) needs a gradient
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: in_graph.append(args[0].requires_grad))
    try:
        sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=1024, seed=5, mode="factored"), norms="sketch",
                                    block_dtype="float32")
        result = sketcher.sketch_batch(objective.batch(sft_rows))
    finally:
        handle.remove()
    assert in_graph and not any(in_graph)
    grads, _ = exact(model, objective, sft_rows, params)
    assert close(result.sketches, sketcher.projection.reference(grads))


def test_streaming_reuses_its_buffers_across_batches(model_tok, sft_rows):
    model, tok = model_tok
    objective = SFTObjective(tok)
    spec = ProjectionSpec(dim=1024, seed=2, mode="factored")
    sketcher = FactoredSketcher(model, select_parameters(model), spec, norms="sketch", block_dtype="float32")
    first = sketcher.sketch_batch(objective.batch(sft_rows)).sketches
    few = sketcher.sketch_batch(objective.batch(sft_rows[:2])).sketches  # fewer rows: a view of the same buffers
    again = sketcher.sketch_batch(objective.batch(sft_rows)).sketches
    fresh = FactoredSketcher(model, select_parameters(model), spec, norms="sketch", block_dtype="float32")
    assert torch.equal(first, again) and close(few, first[:2], rtol=1e-5)
    # blocks are hashed as they appear: one block scratch (and one for the embedding's lookups) and the
    # pass's sketches, not a buffer per parameter
    assert sorted(sketcher._pool) == ["block", "lookup", "pass"]
    assert torch.equal(fresh.sketch_batch(objective.batch(sft_rows)).sketches, first)


def test_bfloat16_block_products_stay_within_rounding_of_float32(model_tok, tiny_model, sft_data, sft_rows, tmp_path):
    """block_dtype bfloat16: the projected factors and block products run in bfloat16 (the final
    hash in float32); the sketches stay within bfloat16 rounding of the float32 ones, norms and
    cosines with them. auto picks bfloat16 only with sketch norms on a device with fast bfloat16."""
    model, tok = model_tok
    params = select_parameters(model)
    spec = ProjectionSpec(dim=1024, seed=6, mode="factored")
    batch = SFTObjective(tok).batch(sft_rows)
    low = FactoredSketcher(model, params, spec, norms="sketch", block_dtype="bfloat16")
    full = FactoredSketcher(model, params, spec, norms="sketch", block_dtype="float32")
    a, b = low.sketch_batch(batch).sketches, full.sketch_batch(batch).sketches
    assert low._pool["block"].dtype == torch.bfloat16 and full._pool["block"].dtype == torch.float32
    assert not torch.equal(a, b)  # the products really ran in bfloat16 ...
    nonzero = b.norm(dim=1) > 0
    relative = (a - b).norm(dim=1)[nonzero] / b.norm(dim=1)[nonzero]
    assert float(relative.max()) < 1e-2, relative  # ... within its rounding (2^-8 per entry, averaging over T)
    assert float(torch.nn.functional.cosine_similarity(a[nonzero], b[nonzero]).min()) > 0.999
    cos = lambda x: torch.nn.functional.normalize(x[nonzero], dim=1) @ torch.nn.functional.normalize(x[nonzero], dim=1).T
    assert float((cos(a) - cos(b)).abs().max()) < 5e-3
    auto = FactoredSketcher(model, params, spec, norms="sketch").block_dtype
    assert auto == (torch.bfloat16 if fast_bfloat16(torch.device("cpu")) else torch.float32)
    assert FactoredSketcher(model, params, spec).block_dtype == torch.float32  # exact norms: float32 blocks
    with pytest.raises(BadInputError, match="block dtype bfloat16 needs --projection factored with --norms sketch"):
        FactoredSketcher(model, params, spec, norms="exact", block_dtype="bfloat16")
    with pytest.raises(BadInputError, match="unknown block dtype 'half'; choose one of auto, float32, bfloat16"):
        BuildConfig(model=tiny_model, data=sft_data[0], store=tmp_path / "s", checkpoint="c", split="t", spec=spec,
                    block_dtype="half")
    common = dict(model=tiny_model, data=sft_data[0], checkpoint="c0", split="train", spec=spec)
    for dtype in ("bfloat16", "float32"):
        build_sketches(BuildConfig(store=tmp_path / dtype, block_dtype=dtype, **common), progress=False)
    _, kinds = catalog.query(SketchStore.open(tmp_path / "bfloat16"), "SELECT DISTINCT block_dtype FROM sketches")
    assert kinds == [("bfloat16",)]
    ids, x = SketchStore.open(tmp_path / "bfloat16").read("c0", "train")
    _, y = SketchStore.open(tmp_path / "float32").read("c0", "train", ids=ids)
    assert float(torch.nn.functional.cosine_similarity(x.float(), y.float()).min()) > 0.999

"""A build estimates its memory before it starts (sketchstore.budget), prints it and its time after
the first row, and refuses, with one line and nothing written, a build that cannot fit."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sketchstore import BuildConfig, ProjectionSpec, SketchStore, build_sketches
from sketchstore.budget import GB, available_memory, check_fits, estimate_memory
from sketchstore.data import read_rows
from sketchstore.errors import BadInputError
from sketchstore.gradients import load_model, select_parameters
from sketchstore.sft import SFTObjective
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)


def test_estimate_follows_mode_and_tokens(tiny_model, sft_data):  # noqa: F811
    model, tok = load_model(tiny_model)
    params = select_parameters(model)
    rows = read_rows(sft_data[0])
    sparse = estimate_memory(model, params, ProjectionSpec(dim=256), SFTObjective(tok), rows, 8, 256)
    factored = estimate_memory(model, params, ProjectionSpec(dim=256, mode="factored"), SFTObjective(tok), rows, 8, 256)
    short = estimate_memory(model, params, ProjectionSpec(dim=256), SFTObjective(tok, max_length=32), rows, 8, 256)
    largest = max(p.numel() for _, p in params)
    assert sparse.gradients == 2 * largest * 4 and factored.gradients == 0  # factored computes no weight gradient
    assert sparse.model == sum(p.numel() * 4 for p in model.parameters())
    assert factored.activations > sparse.activations > short.activations > 0  # 8 rows per pass vs one row
    assert sparse.projection == sum(p.numel() for _, p in params) * 2 and factored.projection == 0
    assert sparse.sketches == 2 * len(rows) * 256 * 4
    assert sparse.extra == sparse.gradients + sparse.activations + sparse.projection + sparse.sketches
    assert 0 < available_memory()
    check_fits(sparse, sparse.extra)
    with pytest.raises(BadInputError, match=r"needs about .* GB beyond the model"):
        check_fits(sparse, sparse.extra - 1)


def test_build_that_cannot_fit_is_refused_before_writing(tiny_model, sft_data, tmp_path):  # noqa: F811
    store = tmp_path / "store"
    config = BuildConfig(model=tiny_model, data=sft_data[0], store=store, checkpoint="c", split="train",
                         spec=ProjectionSpec(dim=256), memory_limit_gb=1e-6)
    with pytest.raises(BadInputError, match="needs about"):
        build_sketches(config, progress=False)
    assert not SketchStore.exists(store)
    with pytest.raises(BadInputError, match="memory limit"):
        BuildConfig(model=tiny_model, data=sft_data[0], store=store, checkpoint="c", split="train", memory_limit_gb=-1)


def test_build_prints_its_estimates(tiny_model, sft_data, tmp_path, capsys):  # noqa: F811
    config = BuildConfig(model=tiny_model, data=sft_data[1], store=tmp_path / "s", checkpoint="c", split="val",
                         spec=ProjectionSpec(dim=256), memory_limit_gb=4.0)
    assert build_sketches(config, progress=True).added == 6
    err = capsys.readouterr()
    text = err.out + err.err
    assert "estimated memory: model" in text and f"limit {4.0:.1f} GB" in text
    assert "first 1 row(s) in" in text and "for the 5 left" in text


def test_cli_refusal_is_one_line(tiny_model, sft_data, tmp_path):  # noqa: F811
    from cli.sketch import main

    result = CliRunner().invoke(main, ["build", "--model", str(tiny_model), "--data", str(sft_data[1]), "--store",
                                       str(tmp_path / "s"), "--checkpoint", "c", "--split", "val", "--dim", "256",
                                       "--memory-limit-gb", "0.000001", "--quiet"])
    assert result.exit_code == 2
    assert result.output.startswith("error: this build needs about") and result.output.count("\n") == 1
    assert GB == 1 << 30

"""The per-row path projects each parameter's gradient during backward (sketchers.GradientSketcher):
its sketches and gradient norms are bit-identical to projecting full per-row gradients in batches
(the path before, kept here as the reference), for the SFT and POPI objectives, and no more than a
couple of parameters hold a gradient at any moment."""

from __future__ import annotations

import pytest
import torch

from cropi.popi import POPIObjective, read_prompt_groups
from sketchstore import ProjectionSpec
from sketchstore.gradients import load_model, per_example_gradients, select_parameters
from sketchstore.projection import make_projector
from sketchstore.sft import SFTObjective
from sketchstore.data import read_rows
from sketchstore.sketchers import GradientSketcher
from sketchstore_fixtures import sft_data, tiny_model  # noqa: F401  (fixtures)
from test_popi import sample_trajectories

REFERENCE_BATCH = 4
SPECS = [ProjectionSpec(dim=512, seed=3), ProjectionSpec(dim=4096, seed=1, keep_ratio=0.5),
         ProjectionSpec(dim=64, seed=2, mode="dense")]


def batched_reference(model, objective, rows, params, spec, batch_size=REFERENCE_BATCH):
    """Full per-row gradients, projected ``batch_size`` rows at a time (the previous GradientSketcher)."""
    projector = make_projector(spec)
    sketches, norms, pending = [], [], []

    def project():
        names = pending[0].grads.keys()
        sketches.append(projector.project({n: torch.cat([it.grads[n] for it in pending]) for n in names}).cpu())

    for item in per_example_gradients(model, objective, rows, params):
        pending.append(item)
        norms.append(item.grad_norm)
        if len(pending) == batch_size:
            project()
            pending = []
    if pending:
        project()
    return torch.cat(sketches), norms


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):  # noqa: F811
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def popi_rows(tiny_model, tmp_path_factory):  # noqa: F811
    """Prompt groups sampled from the tiny model, one of them with all advantages zero (no backward)."""
    return read_prompt_groups(sample_trajectories(tiny_model, tmp_path_factory.mktemp("straj") / "t.parquet",
                                                  n_prompts=4))


def check_identical(model, objective, rows, params, spec, batch_size=REFERENCE_BATCH):
    expected, expected_norms = batched_reference(model, objective, rows, params, spec, batch_size)
    got = GradientSketcher(model, params, spec).sketch_rows(objective, rows, batch_size=3)
    assert torch.equal(got.sketches, expected)
    assert got.grad_norms == expected_norms


@pytest.mark.parametrize("spec", SPECS[:2], ids=["sparse", "sparse-keep0.5"])
def test_sft_sketches_bit_identical(model_and_tokenizer, sft_data, spec):  # noqa: F811
    model, tok = model_and_tokenizer
    rows = read_rows(sft_data[0])[:6]
    check_identical(model, SFTObjective(tok), rows, select_parameters(model), spec)
    check_identical(model, SFTObjective(tok), rows[:2], select_parameters(model, ["model.layers.1.*"]), spec)


def test_dense_sketches_identical_to_one_row_projections(model_and_tokenizer, sft_data):  # noqa: F811
    """Dense projections are matrix products, whose rounding may depend on the rows multiplied
    together: the per-row path equals projecting each row alone, bit for bit."""
    model, tok = model_and_tokenizer
    rows = read_rows(sft_data[0])[:3]
    check_identical(model, SFTObjective(tok), rows, select_parameters(model), SPECS[2], batch_size=1)


@pytest.mark.parametrize("spec", SPECS[:2], ids=["sparse", "sparse-keep0.5"])
def test_popi_sketches_bit_identical(model_and_tokenizer, popi_rows, spec):
    model, _ = model_and_tokenizer
    assert any(r["group"].zero_advantage for r in popi_rows)
    objective = POPIObjective(clip=0.2) if spec.keep_ratio < 1 else POPIObjective()
    check_identical(model, objective, popi_rows, select_parameters(model), spec)


def test_gradients_are_freed_as_they_are_projected(model_and_tokenizer, sft_data):  # noqa: F811
    model, tok = model_and_tokenizer
    params = select_parameters(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    sketcher = GradientSketcher(model, select_parameters(model, ["model.layers.*"]), SPECS[0])
    live, project = [], sketcher.projector.project_param

    def counting(name, grad):
        live.append(sum(p.grad is not None for _, p in params))
        return project(name, grad)

    sketcher.projector.project_param = counting
    done = sketcher.sketch_rows(SFTObjective(tok), read_rows(sft_data[0])[:2], batch_size=8)
    assert done.sketches.shape == (2, SPECS[0].dim) and len(live) == 2 * len(sketcher.params)
    assert max(live) == 0  # each gradient is released before it is projected; none piles up
    assert all(p.grad is None for _, p in params)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

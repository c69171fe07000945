"""Factored sketches under cropi's POPI objective on the tiny cropi Qwen2: the checks of test_factored.py
(Kronecker projection of exact gradients, batch independence, sketch norms) on trajectories, plus
padding_idx, several passes without padding, the off-policy clip and zero-advantage prompts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cropi.popi import POPIObjective, POPIOptions, PromptGroup, read_prompt_groups
from sketchstore import BuildConfig, ProjectionSpec, SketchStore, build_sketches, catalog
from sketchstore import factored
from sketchstore.factored import FactoredSketcher, plan_passes
from sketchstore.gradients import load_model, select_parameters
from test_factored import (TIED, check_batch_independent, check_one_linear_layer, check_sketch_norms,
                           check_whole_model, close, exact, kronecker)
from test_popi import K, sample_trajectories


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)[0]


@pytest.fixture(scope="module")
def trajectories(tiny_model, tmp_path_factory):
    return sample_trajectories(tiny_model, tmp_path_factory.mktemp("ftraj") / "traj.parquet", n_prompts=6)


@pytest.fixture(scope="module")
def popi_rows(trajectories):
    rows = read_prompt_groups(trajectories)
    # a prompt holding the padding token (id 0): torch gives the embedding's padding row no gradient
    base = next(r["group"] for r in rows if not r["group"].zero_advantage)
    group = PromptGroup(prompt_id="pad", prompt_token_ids=[5, 0, 17, 0, 9], responses=base.responses,
                        behaviour_logprobs=base.behaviour_logprobs, advantages=base.advantages, rewards=base.rewards,
                        temperature=base.temperature, metadata=base.metadata)
    return rows + [{"id": "pad", "group": group}]


def test_one_linear_layer_equals_kronecker_projection(model, popi_rows):
    check_one_linear_layer(model, POPIObjective(), popi_rows)


@pytest.mark.parametrize("dim", [128, 2048])
def test_whole_model_equals_kronecker_projection(model, popi_rows, dim, monkeypatch):
    # no padding allowed: trajectories of 9 to 12 tokens run in several passes
    monkeypatch.setattr(factored, "PASS_WASTE", 0.0)
    assert len(plan_passes([len(q) for q in POPIObjective().batch(popi_rows).sequences])) > 1
    check_whole_model(model, POPIObjective(), popi_rows, dim)


def test_off_policy_clipped_popi_equals_kronecker_projection(tiny_model, popi_rows):
    model, _ = load_model(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # theta != beta: ratios leave the clip range
    params = select_parameters(model)
    sketcher = FactoredSketcher(model, params, ProjectionSpec(dim=512, seed=2, mode="factored"))
    objective = POPIObjective(clip=0.01)
    grads, norms = exact(model, objective, popi_rows, params)
    result = sketcher.sketch_batch(objective.batch(popi_rows))
    assert close(result.sketches, sketcher.projection.final.project(kronecker(sketcher, grads)))
    assert result.grad_norms == pytest.approx(norms, rel=1e-5)
    unclipped, _ = exact(model, POPIObjective(), popi_rows, params)
    assert not torch.allclose(grads[TIED], unclipped[TIED])


def test_row_sketch_does_not_depend_on_its_batch(model, popi_rows):
    check_batch_independent(model, POPIObjective(), popi_rows)


def test_sketch_norms_equal_the_sketch_norm_and_keep_the_sketches(model, popi_rows):
    check_sketch_norms(model, POPIObjective(), popi_rows)


def test_build_popi_zero_advantage_and_exact_norms(tiny_model, trajectories, tmp_path):
    def cfg(store, batch_size, norms="exact"):
        return BuildConfig(model=tiny_model, data=None, store=store, checkpoint="theta0", split="pool",
                           spec=ProjectionSpec(dim=1024, mode="factored", dtype="float32"),
                           objective=POPIOptions(trajectories=trajectories), batch_size=batch_size, flush_rows=4,
                           norms=norms)

    assert cfg(tmp_path / "a", 1, norms="auto").norms == "sketch"  # the default: factored builds skip exact norms
    assert replace(cfg(tmp_path / "a", 1), spec=ProjectionSpec(dim=1024), norms="auto").norms == "exact"
    assert build_sketches(cfg(tmp_path / "a", 1), progress=False).added == 6
    assert build_sketches(cfg(tmp_path / "b", 6), progress=False).added == 6
    a, b = SketchStore.open(tmp_path / "a"), SketchStore.open(tmp_path / "b")
    assert a.spec.mode == "factored"
    ids, x = a.read("theta0", "pool")
    _, y = b.read("theta0", "pool", ids=ids)
    assert torch.allclose(x, y, atol=1e-5)
    _, rows = catalog.query(a, "SELECT id, grad_norm, zero_std, k FROM sketches ORDER BY id")
    assert rows[0] == ("q0", 0.0, True, K)
    assert x[ids.index("q0")].abs().sum() == 0
    model, _ = load_model(tiny_model)
    groups = read_prompt_groups(trajectories)
    _, norms = exact(model, POPIObjective(), groups, select_parameters(model))
    got = dict((r[0], r[1]) for r in rows)
    assert [got[g["id"]] for g in groups] == pytest.approx(norms, rel=1e-5)

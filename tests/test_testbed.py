"""The RL testbed: its families, composition, determinism and the warm start's cache key."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cropi import testbed as tb
from cropi.errors import BadConfigError
from cropi.families import FAMILY_GENERATORS, FAMILY_LEVELS, generate_family
from cropi.rewards import math_verify_reward
from cropi.testbed import DEFAULT_FAMILIES, FamilySpec, pass_at_k, sft_rows, write_testbed
from cropi.testbed_warm import WarmRecipe, ensure_testbed_model, recipe_key
from sketchstore.data import read_rows


@pytest.mark.parametrize("family", sorted(FAMILY_GENERATORS))
def test_every_family_is_verifiable_and_its_wrong_procedure_is_wrong(family):
    import random

    rng = random.Random(7)
    for level in FAMILY_LEVELS:
        for _ in range(20):
            p = generate_family(family, rng, level)
            assert math_verify_reward(p["response"], p["answer"]) == 1.0, p
            if p["alt_response"] is not None:
                assert p["alt_answer"] != p["answer"]
                assert math_verify_reward(p["alt_response"], p["answer"]) == 0.0, p
                # the two procedures differ in their first words (the choice RL has to sharpen)
                assert p["response"].split()[:2] != p["alt_response"].split()[:2]


def test_sets_are_deterministic_disjoint_and_follow_the_setting(tmp_path):
    targeted = tb.testbed_sets(tb.TestbedConfig(pool_size=200, val_size=32, eval_size=64, seed=1))
    assert tb.testbed_sets(tb.TestbedConfig(pool_size=200, val_size=32, eval_size=64, seed=1)) == targeted
    assert tb.testbed_sets(tb.TestbedConfig(pool_size=200, val_size=32, eval_size=64, seed=2))["pool"] != targeted["pool"]
    assert [len(targeted[k]) for k in ("pool", "val", "eval")] == [200, 32, 64]
    assert {r["role"] for r in targeted["pool"]} == {f.role for f in DEFAULT_FAMILIES}
    assert {r["role"] for r in targeted["val"] + targeted["eval"]} == {"target"}
    prompts = {k: {r["prompt"] for r in v} for k, v in targeted.items()}
    assert len(prompts["pool"]) == 200 and not prompts["eval"] & (prompts["pool"] | prompts["val"])
    assert not prompts["val"] & prompts["pool"]
    untargeted = tb.testbed_sets(tb.TestbedConfig(setting="untargeted", pool_size=200, val_size=64, eval_size=128, seed=1))
    assert len({r["role"] for r in untargeted["eval"]}) == len({f.role for f in DEFAULT_FAMILIES})
    files = write_testbed(tb.TestbedConfig(pool_size=20, val_size=4, eval_size=8), tmp_path)
    assert [len(read_rows(files[k])) for k in ("pool", "val", "eval")] == [20, 4, 8]
    wide = write_testbed(tb.TestbedConfig(setting="untargeted", pool_size=20, val_size=40, eval_size=8), tmp_path / "u")
    per_family = tb.split_by_family(wide["val"], tmp_path / "u" / "by-family")
    rows = read_rows(wide["val"])
    assert sorted(per_family) == sorted({r["family"] for r in rows}) and len(per_family) > 1
    assert sorted(r["id"] for p in per_family.values() for r in read_rows(p)) == sorted(r["id"] for r in rows)
    assert all({r["family"] for r in read_rows(p)} == {f} for f, p in per_family.items())


def test_warm_start_references_use_the_right_procedure_at_the_label_accuracy():
    rows = sft_rows(DEFAULT_FAMILIES, 4000, seed=3)
    by_family = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    specs = {f.name: f for f in DEFAULT_FAMILIES}
    for name, family_rows in by_family.items():
        right = sum(r["right_procedure"] for r in family_rows) / len(family_rows)
        assert right == pytest.approx(specs[name].label_accuracy, abs=0.08), name
        for r in family_rows[:50]:  # the flag says which procedure the reference used
            first = r["response"].split()[0]
            assert (first in ("First", "Last", "Length", "Quotient") or r["response"].startswith("From zero")) != \
                r["right_procedure"] or name == "distance"


def test_config_errors_name_the_field():
    with pytest.raises(BadConfigError, match="unknown testbed family 'nope'"):
        FamilySpec("nope", "target")
    with pytest.raises(BadConfigError, match="label_accuracy"):
        FamilySpec("count", "target", label_accuracy=1.5)
    with pytest.raises(BadConfigError, match="role 'target'"):
        tb.TestbedConfig(families=(FamilySpec("count", "distractor"),))
    with pytest.raises(BadConfigError, match="setting"):
        tb.TestbedConfig(setting="other")


def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 2, 8) == 1.0 and pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_recipe_key_covers_every_setting():
    base = WarmRecipe()
    keys = {recipe_key(base)}
    for changed in (replace(base, steps=10), replace(base, lr=1e-4), replace(base, seed=1), replace(base, size="small"),
                    replace(base, batch_size=8), replace(base, weight_decay=0.0),
                    replace(base, families=tuple(replace(f, label_accuracy=0.5) if f.name == "count" else f
                                                 for f in base.families))):
        keys.add(recipe_key(changed))
    assert len(keys) == 8 and recipe_key(WarmRecipe()) == recipe_key(base)


def test_warm_model_is_built_once_and_reproducible(tmp_path):
    recipe = WarmRecipe(steps=4, batch_size=4)
    first = ensure_testbed_model(tmp_path / "a", recipe, threads=1)
    again = ensure_testbed_model(tmp_path / "a", recipe, threads=1)
    other_threads = ensure_testbed_model(tmp_path / "b", recipe, threads=2)
    assert first == again and (first / "warm_start.json").is_file()
    import json

    records = [json.loads((d / "warm_start.json").read_text()) for d in (first, other_threads)]
    assert records[0]["fingerprint"] == records[1]["fingerprint"]  # the thread count does not change the weights
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]

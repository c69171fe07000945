"""Baseline selection strategies of the curriculum."""

from __future__ import annotations

import pytest

from cropi.errors import BadConfigError
from cropi.strategies import (
    count_for,
    influence_selection,
    learnability,
    pass_rate_filter,
    random_subset,
    static_selection,
)

IDS = [f"p{i:02d}" for i in range(40)]
RATES = {i: (n % 5) / 4 for n, i in enumerate(IDS)}  # 0, .25, .5, .75, 1 repeating


def test_counts_and_random():
    assert count_for(0.1, 40) == 4 and count_for(0.01, 40) == 1
    with pytest.raises(BadConfigError, match="fraction"):
        count_for(0, 10)
    a, b = random_subset(IDS, 0.25, seed=1), random_subset(list(reversed(IDS)), 0.25, seed=1)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert random_subset(IDS, 0.25, seed=2) != a


def test_learnability_prefers_half_solved():
    chosen = learnability(IDS, RATES, 0.2)
    assert len(chosen) == 8 and all(RATES[i] == 0.5 for i in chosen)
    ranked = learnability(IDS, RATES, 0.5)
    assert all(RATES[i] in (0.25, 0.5, 0.75) for i in ranked)


def test_pass_rate_filter_only_informative():
    chosen = pass_rate_filter(IDS, RATES, 0.1, seed=0)
    assert len(chosen) == 4 and all(0 < RATES[i] < 1 for i in chosen)
    few = {i: (0.5 if n < 2 else 1.0) for n, i in enumerate(IDS)}
    assert pass_rate_filter(IDS, few, 0.1, seed=0) == ["p00", "p01"]


def test_static_selection_dispatch_and_errors():
    assert static_selection("full", IDS, {}, 0.1, 0) == IDS
    assert len(static_selection("random", IDS, {}, 0.1, 0)) == 4
    with pytest.raises(BadConfigError, match="no behaviour pass rate for prompt 'p00'"):
        static_selection("learnability", IDS, {}, 0.1, 0)
    with pytest.raises(BadConfigError, match="not a static strategy"):
        static_selection("cropi", IDS, RATES, 0.1, 0)


def test_influence_selection_fills():
    ids = [f"p{i:02d}" for i in range(10)]
    best = {i: (0.5 - 0.1 * k if k < 3 else (0.0 if k < 8 else -0.2)) for k, i in enumerate(ids)}  # 3 aligned
    fused = dict(best)
    rates = {i: 0.0 for i in ids} | {"p05": 0.5, "p09": 0.4}
    assert influence_selection(fused, best, 0.2, "ties") == ["p00", "p01"]  # enough aligned: fill unused
    ties = influence_selection(fused, best, 0.5, "ties")
    assert ties[:3] == ["p00", "p01", "p02"] and len(ties) == 5 and set(ties[3:]) <= {f"p0{k}" for k in range(3, 8)}
    assert influence_selection(fused, best, 0.5, "fewer") == ["p00", "p01", "p02"]
    assert influence_selection(fused, best, 0.5, "learnable", rates) == ["p00", "p01", "p02", "p05", "p09"]
    none = {i: 0.0 for i in ids}
    assert len(influence_selection(none, none, 0.3, "fewer")) == 3  # nothing aligns: the fused order
    with pytest.raises(BadConfigError, match="needs the behaviour pass rates"):
        influence_selection(fused, best, 0.5, "learnable")
    with pytest.raises(BadConfigError, match="unknown fill"):
        influence_selection(fused, best, 0.5, "more")

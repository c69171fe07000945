"""Step-level acceleration, as the paper defines it, from accuracy curves; the demo's inputs."""

from __future__ import annotations

import pytest

from cropi.compare import describe_acceleration, results_table
from cropi.demo import DemoConfig, comparison_base
from cropi.errors import BadConfigError
from cropi.stats import (
    acceleration,
    as_statistic,
    bootstrap_mean,
    bootstrap_median,
    curve_area,
    describe,
    describe_difference,
    first_reaching,
    paired_difference,
    sampling_error,
    smooth,
    standard_error,
)
from sketchstore.data import read_rows


def curve(points):
    return [(step, step * 100, acc) for step, acc in points]


def test_acceleration_on_smoothed_curves():
    full = curve([(0, 0.10), (10, 0.20), (20, 0.30), (30, 0.30), (40, 0.30)])
    # smoothed (window 3): 0.10, 0.15, 0.20, 0.267, 0.30 -> target 0.30 at step 40
    fast = curve([(0, 0.10), (10, 0.40), (20, 0.40), (30, 0.40)])  # smoothed 0.1, 0.25, 0.3, 0.4
    result = acceleration(full, fast, share=1.0)  # the paper's target: the full pool's best
    assert result["target_accuracy"] == pytest.approx(0.30) and result["full"] == 40 and result["method"] == 20
    assert result["acceleration"] == pytest.approx(2.0)
    ninety = acceleration(full, fast)  # default: 90% of the full pool's gain, 0.10 + 0.9 * 0.20 = 0.28
    assert ninety["target_accuracy"] == pytest.approx(0.28) and ninety["full"] == 40 and ninety["method"] == 20
    lucky = curve([(0, 0.10), (10, 0.10), (20, 0.10), (30, 0.50), (40, 0.10)])  # one lucky evaluation
    assert acceleration(full, lucky)["method"] is None  # smoothed 0.1, 0.1, 0.1, 0.233, 0.233: never 0.28
    assert acceleration(full, lucky, window=1)["method"] == 30  # unsmoothed, the lucky point decides
    on_rollouts = acceleration(full, curve([(0, 0.10), (20, 0.40), (40, 0.40)]), axis="rollouts", share=1.0)
    assert on_rollouts["full"] == 4000 and on_rollouts["method"] == 4000 and on_rollouts["acceleration"] == 1.0
    assert first_reaching(smooth(full), 0.2) == 20


def test_bootstrap_median_and_words():
    summary = bootstrap_median([2.0, 2.5, 3.0, 1.8, 2.2])
    assert summary["median"] == 2.2 and summary["n"] == 5 and 1.8 <= summary["low"] <= 2.2 <= summary["high"] <= 3.0
    assert "faster than the full pool" in describe(summary)
    assert "not distinguishable" in describe(bootstrap_median([0.0, 2.0, 1.0, 0.5, 3.0]))
    assert "slower" in describe(bootstrap_median([0.5, 0.6, 0.4, 0.7, 0.5]))
    assert as_statistic({"method": None, "acceleration": None}) == 0.0
    assert describe(bootstrap_median([None, None])) == "undefined on every seed"


def _results(full, other):
    def arm(c):
        return {"best_smoothed": max(a for _, _, a in smooth(c)), "area": curve_area(c), "final_accuracy": c[-1][2],
                "rollouts": 10,
                "seconds": 60, "acceleration": acceleration(full, c), "acceleration_rollouts": acceleration(
                    full, c, axis="rollouts")}
    return {"full": arm(full), "random": arm(other)}


def test_results_table_marks_unreached():
    full = curve([(0, 0.1), (10, 0.3)])
    table = results_table(_results(full, curve([(0, 0.1), (10, 0.2)])))
    assert "| random | 0.200 | 0.150 | 0.200 | - | not reached | - | not reached |" in table
    assert "| full | 0.300 | 0.200 | 0.300 | 10 | - | 1000 | - |" in table


def test_acceleration_phrases():
    full = curve([(0, 0.1), (10, 0.3), (20, 0.3)])
    assert describe_acceleration(acceleration(full, curve([(0, 0.1), (5, 0.3), (10, 0.5)]))) == "2.00x (20 vs 10 steps)"
    assert describe_acceleration(acceleration(full, curve([(0, 0.1), (5, 0.2)]))).startswith("not reached")
    assert "started at or above" in describe_acceleration(acceleration(full, curve([(0, 0.4)])))
    assert "its starting accuracy" in describe_acceleration(acceleration(curve([(0, 0.3), (5, 0.2)]), full))


def test_demo_base_uses_the_testbed_and_config_is_checked(tmp_path):
    config = DemoConfig(out=tmp_path, pool_size=40, val_size=8, eval_size=12)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    base = comparison_base(config, tmp_path / "model", "targeted", 3, tmp_path / "run")
    rows = {name: read_rows(path) for name, path in (("pool", base.pool), ("val", base.val_sets["target"]),
                                                     ("eval", base.train.eval_sets["target"]))}
    assert [len(rows[n]) for n in ("pool", "val", "eval")] == [40, 8, 12]
    assert {r["role"] for r in rows["val"] + rows["eval"]} == {"target"}
    assert len({r["role"] for r in rows["pool"]}) > 1 and base.train.seed == 3
    assert not {r["prompt"] for r in rows["eval"]} & {r["prompt"] for r in rows["pool"] + rows["val"]}
    for bad, message in ((dict(strategies=("cropi", "best")), "unknown strategy 'best'"),
                         (dict(metric="pass@8"), "metric must be one of"), (dict(pool_size=0), "pool_size"),
                         (dict(setting="other"), "setting must be one of")):
        with pytest.raises(BadConfigError, match=message):
            DemoConfig(out=tmp_path, **bad)


def test_standard_errors():
    assert standard_error([1.0]) is None
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx((1 / 3) ** 0.5 / 2)  # std 0.577 / sqrt(4)
    # 512 prompts at p = 0.5 with 4 samples each: sampling alone gives ~0.0128 (4/3 * 0.25 / 4 per prompt)
    assert sampling_error([0.5] * 512, 4) == pytest.approx(((4 / 3) * 0.25 / 4) ** 0.5 / 512 ** 0.5)
    assert sampling_error([0.0, 1.0], 4) == 0.0  # all-or-nothing prompts: no sampling noise
    assert sampling_error([0.5], 1) is None


def test_area_and_paired_difference():
    early = [(0, 0, 0.2), (5, 5, 0.4), (10, 10, 0.5)]
    late = [(0, 0, 0.2), (5, 5, 0.25), (10, 10, 0.5)]
    assert curve_area(early) == pytest.approx(0.45) and curve_area(late) == pytest.approx(0.375)
    # both reach 0.5 at step 10, so steps-to-target ties; the area tells them apart
    assert acceleration(late, early, window=1, share=1.0)["acceleration"] == 1.0
    diff = paired_difference([0.45, 0.47, 0.44, 0.46], [0.40, 0.41, 0.43, 0.40])
    assert diff["per_seed"] == pytest.approx([0.05, 0.06, 0.01, 0.06])
    assert diff["mean"] == pytest.approx(0.045) and 0.01 <= diff["low"] <= diff["mean"] <= diff["high"] <= 0.06
    assert "learns more per step than full" in describe_difference(diff, "cropi", "full")
    mixed = paired_difference([0.4, 0.5, 0.45], [0.45, 0.44, 0.45])
    assert "not distinguishable" in describe_difference(mixed, "cropi", "learnability")
    assert "learns less" in describe_difference(paired_difference([0.3, 0.31], [0.4, 0.42]), "random", "full")
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match="two evaluations"):
        curve_area([(0, 0, 0.2)])
    assert bootstrap_mean([])["mean"] is None

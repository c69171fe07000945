"""Step-level acceleration, as the paper defines it, from accuracy curves; the demo's inputs."""

from __future__ import annotations

import pytest

from cropi.compare import acceleration, first_step_reaching, results_table
from cropi.demo import DemoConfig, describe_acceleration, write_demo_tasks
from sketchstore.data import read_rows
from cropi.errors import BadConfigError


def curve(points):
    return [(step, step * 100, acc) for step, acc in points]


def test_acceleration_ratio():
    full = curve([(0, 0.10), (10, 0.20), (20, 0.30), (30, 0.28), (40, 0.30)])
    fast = curve([(0, 0.10), (10, 0.31), (20, 0.29)])
    result = acceleration(full, fast)
    assert result == {"target_accuracy": 0.30, "full_steps": 20, "method_steps": 10, "acceleration": 2.0}
    slow = curve([(0, 0.10), (40, 0.25)])
    assert acceleration(full, slow)["method_steps"] is None and acceleration(full, slow)["acceleration"] is None
    assert first_step_reaching(full, 0.2) == 10


def test_results_table_marks_unreached():
    full = curve([(0, 0.1), (10, 0.3)])
    results = {
        "full": {"best_accuracy": 0.3, "final_accuracy": 0.3, "rollouts": 10, "seconds": 60,
                 "acceleration": acceleration(full, full)},
        "random": {"best_accuracy": 0.2, "final_accuracy": 0.2, "rollouts": 10, "seconds": 60,
                   "acceleration": acceleration(full, curve([(0, 0.1), (10, 0.2)]))},
    }
    table = results_table(results)
    assert "| random | 0.200 | 0.200 | - | not reached |" in table
    assert "| full | 0.300 | 0.300 | 10 | - |" in table


def test_acceleration_phrases():
    full = curve([(0, 0.1), (10, 0.3)])
    assert describe_acceleration(acceleration(full, curve([(0, 0.1), (5, 0.3)]))) == "2.00x (10 vs 5 steps)"
    assert describe_acceleration(acceleration(full, curve([(0, 0.1), (5, 0.2)]))).startswith("not reached")
    assert "started at or above" in describe_acceleration(acceleration(full, curve([(0, 0.4)])))
    assert "its starting accuracy" in describe_acceleration(acceleration(curve([(0, 0.3), (5, 0.2)]), full))


def test_demo_tasks_follow_levels_and_config_is_checked(tmp_path):
    config = DemoConfig(out=tmp_path, pool_size=40, val_size=8, eval_size=12, pool_levels=(1, 3), target_levels=(2,))
    files = write_demo_tasks(config)
    rows = {name: read_rows(path) for name, path in files.items()}
    assert [len(rows[n]) for n in ("pool", "val", "eval")] == [40, 8, 12]
    assert {r["difficulty"] for r in rows["pool"]} == {1, 3}
    assert {r["difficulty"] for r in rows["val"] + rows["eval"]} == {2}
    assert not {r["id"] for r in rows["val"]} & {r["id"] for r in rows["eval"]}
    for bad, message in ((dict(strategies=("cropi", "best")), "unknown strategy 'best'"),
                         (dict(metric="pass@8"), "unknown accuracy metric"), (dict(pool_size=0), "pool_size")):
        with pytest.raises(BadConfigError, match=message):
            DemoConfig(out=tmp_path, **bad)


def test_demo_instruction_is_appended_to_every_prompt(tmp_path):
    plain = write_demo_tasks(DemoConfig(out=tmp_path / "plain", pool_size=6, val_size=2, eval_size=3))
    told = write_demo_tasks(DemoConfig(out=tmp_path / "told", pool_size=6, val_size=2, eval_size=3,
                                       instruction="End with 'The answer is N.'"))
    for name in ("pool", "val", "eval"):
        before, after = read_rows(plain[name]), read_rows(told[name])
        assert [r["prompt"] + " End with 'The answer is N.'" for r in before] == [r["prompt"] for r in after]
        assert [r["answer"] for r in before] == [r["answer"] for r in after]

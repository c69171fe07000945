"""Step-level acceleration, as the paper defines it, from accuracy curves."""

from __future__ import annotations

from cropi.compare import acceleration, first_step_reaching, results_table


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

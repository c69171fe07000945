"""Several strategies under the same budget and seed, and their acceleration over the full pool.

Acceleration (the paper's headline figure, 2.66x on a 1.5B model): the steps the full-pool
run needs to reach a target accuracy, divided by the steps the arm needs to reach it (target:
90% of the full pool's gain by default, its best with ``target_share=1``, see cropi.stats); likewise on the rollouts axis (behaviour rollouts counted). Accuracy is pass@1
averaged over the evaluation sets, read from each run's evaluation log: ``sampled`` by default
(the mean reward of the evaluation samples at the training temperature, what GRPO optimises)
or ``greedy``. "Reached" is decided on curves smoothed by a running mean over evaluations
(:mod:`cropi.stats`), so one lucky evaluation cannot decide it. An arm that never reaches the
target has no acceleration ("not reached"); one that starts at or above it, or a full pool
whose best is its start, leaves the ratio undefined.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sketchstore.atomic import write_text_atomic

from .curriculum import Curriculum, CurriculumConfig
from .engine import close_engine
from .errors import BadConfigError
from .plots import plot_arms
from .run_dir import read_log
from .stats import SMOOTH_WINDOW, TARGET_SHARE, acceleration, curve_area, smooth
from .trainer import start_engine

BASELINE = "full"
METRICS = ("greedy", "sampled")
# Sampled pass@1 is what GRPO optimises and, on a fixed evaluation set, far less noisy than greedy.
DEFAULT_METRIC = "sampled"


def accuracy_curve(run_dir: Path, kind: str = "greedy") -> list[tuple[int, int, float]]:
    """(step, rollouts, mean accuracy over eval sets) for every evaluation of a run."""
    curve = []
    for record in read_log(run_dir):
        if record.get("type") == "eval" and record.get(kind):
            values = list(record[kind].values())
            curve.append((int(record["step"]), int(record["rollouts"]), sum(values) / len(values)))
    return sorted(curve)


def describe_acceleration(acc: dict) -> str:
    """Words for one :func:`cropi.stats.acceleration` result."""
    unit = acc["axis"]
    if not acc["full"]:
        return "undefined (the full pool's best accuracy was its starting accuracy)"
    if acc["method"] is None:
        return "not reached (the arm's smoothed accuracy never reached the target)"
    if acc["method"] == 0:
        return "undefined (the arm started at or above the full pool's best accuracy)"
    return f"{acc['acceleration']:.2f}x ({acc['full']} vs {acc['method']} {unit})"


def results_table(results: dict[str, dict]) -> str:
    """Markdown: each arm's accuracy and its acceleration over the full pool in steps and rollouts."""
    lines = ["| arm | mean acc over the run | best acc (smoothed) | final acc | steps to target | acceleration (steps) | "
             "rollouts to target | acceleration (rollouts) | rollouts | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(name: str, acc: dict) -> str:
        if name == BASELINE:
            return "-"
        return "not reached" if acc["method"] is None else f"{acc['acceleration']:.2f}x" if acc["acceleration"] else "n/a"

    for name, r in results.items():
        steps, rollouts = r["acceleration"], r["acceleration_rollouts"]
        lines.append(f"| {name} | {r['area']:.3f} | {r['best_smoothed']:.3f} | {r['final_accuracy']:.3f} | "
                     f"{steps['method'] if steps['method'] is not None else '-'} | {ratio(name, steps)} | "
                     f"{rollouts['method'] if rollouts['method'] is not None else '-'} | {ratio(name, rollouts)} | "
                     f"{r['rollouts']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def run_comparison(base: CurriculumConfig, strategies: Sequence[str], out: Path,
                   log: Callable[[str], None] = print, metric: str = DEFAULT_METRIC, engine: Any = None,
                   variants: Mapping[str, Mapping[str, Any]] | None = None,
                   smooth_window: int = SMOOTH_WINDOW, target_share: float = TARGET_SHARE) -> dict:
    """Run each strategy (same seed, same stages and steps) under ``out/<strategy>``; report
    accuracy (``metric``: greedy or sampled pass@1) and acceleration over the full pool.
    ``variants`` adds arms named by their key, each ``base`` with those CurriculumConfig fields
    replaced (e.g. ``{"cropi-refresh2": {"strategy": "cropi", "refresh_every": 2}}``). All arms
    share one live engine: ``engine`` if given, else one started (and shut down) here."""
    if metric not in METRICS:
        raise BadConfigError(f"unknown accuracy metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "sampled" and not base.train.eval_samples:
        raise BadConfigError("metric 'sampled' needs eval_samples > 0 in the training config")
    arms = {name: {"strategy": name} for name in [BASELINE, *strategies]}
    for name, overrides in (variants or {}).items():
        if name in arms:
            raise BadConfigError(f"variant name {name!r} clashes with a strategy name")
        arms[name] = {"strategy": base.strategy, **overrides}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = base.train
    own_engine = engine is None
    if own_engine:
        engine = start_engine(t)
    results: dict[str, dict] = {}
    curves = {}
    try:
        for strategy, overrides in arms.items():
            train = replace(t, out=out / strategy / "train")
            log(f"== {strategy}")
            report = Curriculum(replace(base, train=train, **overrides), log=log, engine=engine).run()
            curves[strategy] = accuracy_curve(train.out, metric)
            results[strategy] = {**report,
                                 "best_accuracy": max(c[2] for c in curves[strategy]),
                                 "final_accuracy": curves[strategy][-1][2], "curve": curves[strategy]}
    finally:
        if own_engine:
            close_engine(engine)
    for strategy, r in results.items():
        r["acceleration"] = acceleration(curves[BASELINE], curves[strategy], smooth_window, "steps", target_share)
        r["acceleration_rollouts"] = acceleration(curves[BASELINE], curves[strategy], smooth_window, "rollouts",
                                                  target_share)
        r["best_smoothed"] = max(a for _, _, a in smooth(curves[strategy], smooth_window))
        r["area"] = curve_area(curves[strategy])
    plots = [plot_arms(out / f"accuracy_vs_{axis}.png", {name: [c] for name, c in curves.items()}, axis,
                       ylabel=f"{metric} pass@1") for axis in ("steps", "rollouts")]
    table = results_table(results)
    write_text_atomic(out / "results.md", table + "\n")
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    log(table)
    return {"results": results, "table": table, "plots": [str(p) for p in plots]}

"""Several strategies under the same step budget and seed, and the step-level acceleration.

Acceleration of a method (the paper's headline figure, 2.66x on a 1.5B model): the steps
the full-pool run needs to first reach its best accuracy, divided by the steps the method
needs to first reach that same accuracy. Accuracy is pass@1 averaged over the evaluation
sets, read from each run's evaluation log: greedy by default, or ``sampled`` (the mean reward
of the evaluation samples at the training temperature, what GRPO optimises). A method that
never reaches it has no acceleration (reported as null), and one that starts at or above it is
reported as "reached at step 0" (the ratio is then undefined too).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sketchstore.atomic import write_text_atomic

from .curriculum import Curriculum, CurriculumConfig
from .engine import close_engine
from .errors import BadConfigError
from .run_dir import read_log
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


def first_step_reaching(curve: Sequence[tuple[int, int, float]], target: float) -> int | None:
    return next((step for step, _, acc in curve if acc >= target - 1e-12), None)


def acceleration(full: Sequence[tuple[int, int, float]], method: Sequence[tuple[int, int, float]]) -> dict:
    """The full-pool run's best accuracy, the steps each run needs to reach it, and the ratio."""
    best = max(acc for _, _, acc in full)
    full_steps = first_step_reaching(full, best)
    method_steps = first_step_reaching(method, best)
    ratio = full_steps / method_steps if method_steps and full_steps else None
    return {"target_accuracy": best, "full_steps": full_steps, "method_steps": method_steps, "acceleration": ratio}


def plot_comparison(path_prefix: Path, curves: dict[str, list[tuple[int, int, float]]],
                    metric: str = "greedy") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for index, label in ((0, "step"), (1, "rollouts consumed")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, curve in curves.items():
            ax.plot([c[index] for c in curve], [c[2] for c in curve], "o-", label=name, markersize=3)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} pass@1 (mean over eval sets)")
        ax.legend()
        ax.set_title(f"Accuracy vs {label}")
        fig.tight_layout()
        path = Path(f"{path_prefix}_vs_{'step' if index == 0 else 'rollouts'}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def results_table(results: dict[str, dict]) -> str:
    lines = ["| strategy | best acc | final acc | steps to full's best | acceleration | rollouts | minutes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        acc = r["acceleration"]
        ratio = "-" if name == BASELINE else ("not reached" if acc["method_steps"] is None
                                               else f"{acc['acceleration']:.2f}x" if acc["acceleration"] else "n/a")
        lines.append(f"| {name} | {r['best_accuracy']:.3f} | {r['final_accuracy']:.3f} | "
                     f"{acc['method_steps'] if acc['method_steps'] is not None else '-'} | {ratio} | "
                     f"{r['rollouts']} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def run_comparison(base: CurriculumConfig, strategies: Sequence[str], out: Path,
                   log: Callable[[str], None] = print, metric: str = DEFAULT_METRIC, engine: Any = None,
                   variants: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
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
            start = time.perf_counter()
            train = replace(t, out=out / strategy / "train")
            log(f"== {strategy}")
            report = Curriculum(replace(base, train=train, **overrides), log=log, engine=engine).run()
            curves[strategy] = accuracy_curve(train.out, metric)
            results[strategy] = {**report, "seconds": time.perf_counter() - start,
                                 "best_accuracy": max(c[2] for c in curves[strategy]),
                                 "final_accuracy": curves[strategy][-1][2], "curve": curves[strategy]}
    finally:
        if own_engine:
            close_engine(engine)
    for strategy in results:
        results[strategy]["acceleration"] = acceleration(curves[BASELINE], curves[strategy])
    plots = plot_comparison(out / "accuracy", curves, metric)
    table = results_table(results)
    write_text_atomic(out / "results.md", table + "\n")
    write_text_atomic(out / "results.json", json.dumps(results, indent=1))
    log(table)
    return {"results": results, "table": table, "plots": [str(p) for p in plots]}

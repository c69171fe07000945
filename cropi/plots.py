"""Accuracy plots of training runs (PNG, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sketchstore.atomic import atomic_file

from .run_dir import read_log

PLOT_DPI = 90


def plot_log(out: str | os.PathLike, records: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write accuracy_vs_step.png and accuracy_vs_rollouts.png from a run's eval records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    records = read_log(out) if records is None else records
    evals = [r for r in records if r.get("type") == "eval"]
    if not evals:
        return []
    series: dict[str, list[tuple[int, int, float]]] = {}
    for r in evals:
        for mode in ("greedy", "sampled"):
            for name, acc in (r.get(mode) or {}).items():
                if acc is not None:
                    series.setdefault(f"{name} {mode}", []).append((r["step"], r["rollouts"], acc))
    written = []
    for x_index, xlabel, fname in ((0, "step", "accuracy_vs_step.png"), (1, "rollouts consumed", "accuracy_vs_rollouts.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(series.items()):
            ax.plot([p[x_index] for p in pts], [p[2] for p in pts], marker="o", ms=3,
                    ls="-" if label.endswith("greedy") else "--", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pass@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_file(out / fname) as handle:
            fig.savefig(handle, format="png", dpi=PLOT_DPI)
        plt.close(fig)
        written.append(out / fname)
    return written


def plot_arms(path: str | os.PathLike, curves: dict[str, list[list[tuple[int, int, float]]]], axis: str = "steps",
              ylabel: str = "sampled pass@1", title: str = "") -> Path:
    """One line per arm: the mean over seeds of its accuracy at each evaluation, with a band of
    +-1 standard error over seeds (when there are several). ``curves[arm]`` holds one curve of
    ``(step, rollouts, accuracy)`` per seed; seeds are aligned by evaluation index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = 0 if axis == "steps" else 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in curves.items():
        length = min(len(c) for c in runs)
        xs = [sum(c[i][index] for c in runs) / len(runs) for i in range(length)]
        means, errs = [], []
        for i in range(length):
            values = [c[i][2] for c in runs]
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            means.append(mean)
            errs.append((var / len(values)) ** 0.5)
        line, = ax.plot(xs, means, marker="o", ms=3, label=f"{arm} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(xs, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("GRPO steps" if axis == "steps" else "rollouts consumed (behaviour rollouts included)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=PLOT_DPI + 30)
    plt.close(fig)
    return path

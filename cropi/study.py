"""The multi-seed study: every arm in every setting over several seeds, with statistics.

For each setting (e.g. ``targeted`` and the ``untargeted`` control) and seed, one comparison
(:func:`cropi.compare.run_comparison`: every arm on the same pool, validation and evaluation
sets, step budget and seed, on one shared engine) under ``out/<setting>/seed<seed>``. Then,
per setting and arm (:func:`summarise`):

- the per-seed acceleration over the full pool in steps and in rollouts (behaviour rollouts
  counted), decided on smoothed curves (:mod:`cropi.stats`), and their median with a
  bootstrap 90% interval over seeds (a seed where the arm never reaches the target counts 0);
- the mean smoothed best and final accuracy;
- the area statistic (:func:`cropi.stats.curve_area`: mean accuracy over the run's evaluations,
  which does not saturate as steps-to-target does), and its paired difference against the full
  pool and against learnability (seed by seed, bootstrap 90% interval);
- accuracy against steps and against rollouts, mean over seeds with a +-1 SE band (one plot
  per setting and axis).

Re-running the same study resumes: finished arms are read back from their run directories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sketchstore.atomic import write_text_atomic

from .compare import BASELINE, run_comparison
from .curriculum import CurriculumConfig
from .plots import plot_arms
from .stats import (SMOOTH_WINDOW, TARGET_SHARE, as_statistic, bootstrap_mean, bootstrap_median, curve_area, describe,
                    describe_difference, paired_difference, smooth)

# Arms every other arm's area is compared with, seed by seed (when present).
AREA_REFERENCES = (BASELINE, "learnability")

# (setting, seed, its output directory) -> the comparison's base configuration (files, GRPO settings)
BaseFor = Callable[[str, int, Path], CurriculumConfig]


@dataclass
class StudyResult:
    summary: dict[str, dict[str, dict]]  # setting -> arm -> statistics
    table: str
    plots: list[str]


def summarise(per_seed: Mapping[int, Mapping[str, dict]], window: int = SMOOTH_WINDOW) -> dict[str, dict]:
    """Per arm, statistics over seeds of :func:`run_comparison` results (``{seed: {arm: result}}``)."""
    arms = list(next(iter(per_seed.values())))
    out = {}
    for arm in arms:
        runs = [per_seed[s][arm] for s in per_seed]
        entry: dict[str, Any] = {
            "seeds": list(per_seed),
            "best_smoothed_mean": sum(max(a for _, _, a in smooth(r["curve"], window)) for r in runs) / len(runs),
            "final_mean": sum(r["final_accuracy"] for r in runs) / len(runs),
            "start_mean": sum(r["curve"][0][2] for r in runs) / len(runs),
            "rollouts_mean": sum(r["rollouts"] for r in runs) / len(runs),
            "minutes_mean": sum(r["seconds"] for r in runs) / len(runs) / 60,
        }
        for axis, key in (("steps", "acceleration"), ("rollouts", "acceleration_rollouts")):
            values = [as_statistic(r[key]) for r in runs]
            entry[axis] = {"per_seed": values, "reached": sum(r[key]["method"] is not None for r in runs),
                           **bootstrap_median(values)}
        areas = [curve_area(r["curve"]) for r in runs]
        entry["area"] = {"per_seed": areas, **bootstrap_mean(areas)}
        out[arm] = entry
    for arm, entry in out.items():
        entry["area_vs"] = {ref: paired_difference(entry["area"]["per_seed"], out[ref]["area"]["per_seed"])
                            for ref in AREA_REFERENCES if ref in out and ref != arm and arm != BASELINE}
    return out


def study_table(summary: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown: per setting and arm, accelerations (median and 90% interval over seeds) and accuracies."""
    lines = ["| setting | arm | acceleration in steps (median, 90% CI) | reached | acceleration in rollouts "
             "(median, 90% CI) | start | best (smoothed) | final | minutes/run |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(stat: dict) -> str:
        if stat["median"] is None:
            return "undefined"
        return f"{stat['median']:.2f}x ({stat['low']:.2f}-{stat['high']:.2f})"

    for setting, arms in summary.items():
        for arm, s in arms.items():
            steps = "-" if arm == BASELINE else cell(s["steps"])
            rollouts = "-" if arm == BASELINE else cell(s["rollouts"])
            reached = "-" if arm == BASELINE else f"{s['steps']['reached']}/{len(s['seeds'])}"
            lines.append(f"| {setting} | {arm} | {steps} | {reached} | {rollouts} | {s['start_mean']:.3f} | "
                         f"{s['best_smoothed_mean']:.3f} | {s['final_mean']:.3f} | {s['minutes_mean']:.1f} |")
    lines += ["", "| setting | arm | mean accuracy over the run (area) | minus full pool (90% CI) | "
              "minus learnability (90% CI) |", "|---|---|---|---|---|"]

    def diff(s: dict, ref: str) -> str:
        d = s["area_vs"].get(ref)
        return "-" if d is None else f"{d['mean']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})"

    for setting, arms in summary.items():
        for arm, s in arms.items():
            lines.append(f"| {setting} | {arm} | {s['area']['mean']:.3f} | {diff(s, BASELINE)} | "
                         f"{diff(s, 'learnability')} |")
    return "\n".join(lines)


def verdicts(summary: Mapping[str, Mapping[str, dict]]) -> list[str]:
    """One sentence per setting and arm saying what its acceleration means."""
    words = []
    for setting, arms in summary.items():
        for arm, s in arms.items():
            if arm != BASELINE:
                words.append(f"{setting} / {arm}: steps {describe(s['steps'], 'steps')}; "
                             f"rollouts {describe(s['rollouts'], 'rollouts')}")
            words += [f"{setting} / {arm} vs {ref}, mean accuracy over the run: {describe_difference(d, arm, ref)}"
                      for ref, d in s["area_vs"].items()]
    return words


def run_study(out: str | Path, settings: Sequence[str], seeds: Sequence[int], strategies: Sequence[str],
              base_for: BaseFor, variants: Mapping[str, Mapping[str, Any]] | None = None, metric: str = "sampled",
              engine: Any = None, log: Callable[[str], None] = print, window: int = SMOOTH_WINDOW,
              target_share: float = TARGET_SHARE) -> StudyResult:
    """Run (or resume) every comparison, then write ``study.json``, ``study.md`` and the plots under ``out``."""
    out = Path(out)
    per_setting: dict[str, dict[int, dict]] = {}
    for setting in settings:
        per_setting[setting] = {}
        for seed in seeds:
            run_out = out / setting / f"seed{seed}"
            log(f"=== {setting}, seed {seed}")
            result = run_comparison(base_for(setting, seed, run_out), strategies, run_out, log=log, metric=metric,
                                    engine=engine, variants=variants, smooth_window=window,
                                    target_share=target_share)
            per_setting[setting][seed] = result["results"]
    summary = {setting: summarise(per_seed, window) for setting, per_seed in per_setting.items()}
    plots = []
    for setting, per_seed in per_setting.items():
        curves = {arm: [per_seed[s][arm]["curve"] for s in per_seed] for arm in next(iter(per_seed.values()))}
        for axis in ("steps", "rollouts"):
            plots.append(str(plot_arms(out / f"{setting}_accuracy_vs_{axis}.png", curves, axis,
                                       ylabel=f"held-out {metric} pass@1",
                                       title=f"{setting}: mean over {len(per_seed)} seeds, band = +-1 SE")))
    table = study_table(summary)
    words = verdicts(summary)
    write_text_atomic(out / "study.json", json.dumps({"summary": summary, "verdicts": words, "seeds": list(seeds),
                                                      "settings": list(settings), "metric": metric,
                                                      "smooth_window": window, "target_share": target_share},
                                                     indent=1))
    write_text_atomic(out / "study.md", table + "\n\n" + "\n".join(f"- {w}" for w in words) + "\n")
    return StudyResult(summary=summary, table=table, plots=plots)

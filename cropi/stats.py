"""Acceleration with statistics: smoothed accuracy curves, steps (or rollouts) to a target, and
bootstrap intervals over seeds.

A curve is a list of ``(step, rollouts, accuracy)`` evaluation points. "Reached" is decided on
the curve smoothed by a trailing running mean over ``window`` evaluations, so one lucky
evaluation cannot decide it. The target is ``share`` of the full-pool run's gain: its start
plus ``share`` x (its best smoothed accuracy - its start). ``share = 1`` is the paper's
definition (the full pool's best); the default 0.9 keeps the figure from being decided by
evaluation noise once curves plateau near a common ceiling (measured on the testbed: both the
full pool and a target-only oracle level off at ~0.45, and which of them first touches the
full pool's noisy maximum is chance). An arm's acceleration is (full pool's steps to the
target) / (the arm's steps to the target), and likewise on the rollouts axis (behaviour
rollouts counted).
An arm that never reaches the target within the budget has acceleration 0 in the statistics
(a lower bound: it would need more steps than the budget).

Steps-to-target saturates: with evaluations every E steps and a window of W, no arm can reach
before about W x E steps, so two arms that both learn fast tie at the ceiling (measured on the
testbed: 40 / 15 = 2.67x for the oracle, CROPI and learnability alike on seed 0). The
*area* statistic does not saturate: an arm's mean accuracy over the evaluations after its start
(:func:`curve_area`, the normalised area under its accuracy-vs-step curve: learning sooner and
learning more both raise it), compared between two arms seed by seed
(:func:`paired_difference`: the mean of the per-seed differences with a bootstrap interval).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

Curve = Sequence[tuple[int, int, float]]

SMOOTH_WINDOW = 3
TARGET_SHARE = 0.9
BOOTSTRAP_SAMPLES = 10_000
INTERVAL = 0.9
AXES = {"steps": 0, "rollouts": 1}


def standard_error(per_prompt: Sequence[float]) -> float | None:
    """Standard error of an evaluation's pass@1 (the mean of per-prompt scores, a prompt's score
    being the mean reward of its samples): sample std (ddof 1) / sqrt(prompts). Prompts are the
    independent units, so it covers prompt-to-prompt and sampling variation alike. None for
    fewer than 2 prompts."""
    n = len(per_prompt)
    if n < 2:
        return None
    mean = sum(per_prompt) / n
    return math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / (n - 1) / n)


def sampling_error(per_prompt: Sequence[float], samples: int) -> float | None:
    """Standard error of pass@1 on a fixed set of prompts, from sampling alone (what differs
    between two evaluations of one policy on the same set): sqrt(sum_i s_i^2 / m) / N, with
    s_i^2 = m/(m-1) p_i (1 - p_i) the unbiased variance of prompt i's m 0/1 samples."""
    n = len(per_prompt)
    if n == 0 or samples < 2:
        return None
    var = sum(samples / (samples - 1) * p * (1 - p) for p in per_prompt) / samples
    return math.sqrt(var) / n


def smooth(curve: Curve, window: int = SMOOTH_WINDOW) -> list[tuple[int, int, float]]:
    """The trailing running mean of the accuracies over ``window`` evaluations (fewer at the start)."""
    accs = [a for _, _, a in curve]
    return [(s, r, sum(accs[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)))
            for i, (s, r, _) in enumerate(curve)]


def first_reaching(curve: Curve, target: float, axis: str = "steps") -> int | None:
    """The first step (or rollouts count) at which the curve is at or above ``target``."""
    index = AXES[axis]
    return next((point[index] for point in curve if point[2] >= target - 1e-12), None)


def acceleration(full: Curve, method: Curve, window: int = SMOOTH_WINDOW, axis: str = "steps",
                 share: float = TARGET_SHARE) -> dict:
    """The target (``share`` of the full pool's smoothed gain, see the module docstring), the steps
    (or rollouts) each run needs to reach it on its smoothed curve, and their ratio (None when
    undefined or not reached)."""
    full_s, method_s = smooth(full, window), smooth(method, window)
    start = full_s[0][2]
    target = start + share * (max(a for _, _, a in full_s) - start)
    full_at = first_reaching(full_s, target, axis)
    method_at = first_reaching(method_s, target, axis)
    ratio = full_at / method_at if full_at and method_at else None
    return {"target_accuracy": target, "axis": axis, "full": full_at, "method": method_at, "acceleration": ratio}


def as_statistic(result: dict) -> float | None:
    """An acceleration as a number for statistics: the ratio, 0 when never reached, None when
    undefined (the full pool's target is its starting point, or the arm started above it)."""
    if result["method"] is None:
        return 0.0
    return result["acceleration"]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _bootstrap_interval(values: Sequence[float], statistic: Callable[[Sequence[float]], float], samples: int,
                        level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    stats = sorted(statistic([rng.choice(values) for _ in values]) for _ in range(samples))
    return (stats[int(math.floor((1 - level) / 2 * samples))],
            stats[min(samples - 1, int(math.ceil((1 + level) / 2 * samples)) - 1)])


def bootstrap_median(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, level: float = INTERVAL,
                     seed: int = 0) -> dict:
    """The median of ``values`` (e.g. per-seed accelerations) and a percentile bootstrap interval."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "low": None, "high": None, "n": 0}
    lo, hi = _bootstrap_interval(values, median, samples, level, seed)
    return {"median": median(values), "low": lo, "high": hi, "n": len(values)}


def curve_area(curve: Curve) -> float:
    """Mean accuracy over a curve's evaluations after its first one (the start, shared by every arm)."""
    after = [a for _, _, a in list(curve)[1:]]
    if not after:
        raise ValueError("curve_area needs at least two evaluations")
    return sum(after) / len(after)


def bootstrap_mean(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, level: float = INTERVAL,
                   seed: int = 0) -> dict:
    """The mean of ``values`` (e.g. per-seed differences) and a percentile bootstrap interval."""
    values = list(values)
    if not values:
        return {"mean": None, "low": None, "high": None, "n": 0}
    lo, hi = _bootstrap_interval(values, _mean, samples, level, seed)
    return {"mean": _mean(values), "low": lo, "high": hi, "n": len(values)}


def paired_difference(areas: Sequence[float], reference: Sequence[float]) -> dict:
    """Per-seed differences ``areas[i] - reference[i]`` (same seeds, in order) and their
    :func:`bootstrap_mean`."""
    if len(areas) != len(reference):
        raise ValueError(f"paired_difference needs the same seeds: {len(areas)} vs {len(reference)} values")
    diffs = [a - b for a, b in zip(areas, reference)]
    return {"per_seed": diffs, **bootstrap_mean(diffs)}


def describe_difference(diff: dict, arm: str, reference: str) -> str:
    """Words for a :func:`paired_difference` of mean accuracy (area) between two arms."""
    m, lo, hi = diff["mean"], diff["low"], diff["high"]
    interval = f"{m:+.3f} (90% interval {lo:+.3f} to {hi:+.3f} over {diff['n']} seeds)"
    if lo > 0:
        verdict = f"{arm} learns more per step than {reference}"
    elif hi < 0:
        verdict = f"{arm} learns less per step than {reference}"
    else:
        verdict = f"{arm} and {reference} are not distinguishable"
    return f"{interval}: {verdict}"


def describe(summary: dict, what: str = "steps") -> str:
    """Words for a bootstrap summary of accelerations over seeds."""
    if summary["median"] is None:
        return "undefined on every seed"
    m, lo, hi = summary["median"], summary["low"], summary["high"]
    interval = f"{m:.2f}x (90% interval {lo:.2f}-{hi:.2f}x over {summary['n']} seeds)"
    if lo > 1:
        verdict = f"faster than the full pool in {what}"
    elif hi < 1:
        verdict = f"slower than the full pool in {what}"
    else:
        verdict = f"not distinguishable from the full pool in {what}"
    return f"{interval}: {verdict}"

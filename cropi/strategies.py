"""Which prompts a stage trains on: CROPI's influence selection and the paper's baselines.

Every strategy maps (pool ids, facts about them) to the ids of one stage:

- ``full``: the whole pool (plain GRPO).
- ``random``: a seeded random fraction, drawn once (the same subset every stage).
- ``learnability``: the top fraction by p(1 - p), p = the behaviour policy's pass rate
  (prompts the policy solves about half the time teach it most, per the learnability
  heuristic); ties broken by a hash of the id (sketchstore.selection.tie_key).
- ``pass-rate``: a seeded random fraction among prompts with 0 < p < 1 (all of them if fewer).
- ``influence-once``: CROPI's influence selection made at stage 0 and kept (no curriculum).
- ``cropi``: influence selection re-made at every stage at the current checkpoint.

When fewer pool prompts align with the validation gradient (best score over validation sets
> 0) than the fraction asks for, ``fill`` decides the rest of an influence selection:
``ties`` takes the next by fused score (zero-gradient prompts, cosine 0, in hash order, then
negative ones), ``fewer`` trains on the aligned prompts only, ``learnable`` tops up with the
unaligned prompts of highest p(1 - p). The stage loop's default (cropi.curriculum, ``cropi
demo``; the trainer integrations keep ``ties``: TRL's epoch-per-stage dataset needs the same
count every stage), ``fewer``, was chosen by measurement
(benchmarks/README.md, "Selection when few prompts align"): on the RL testbed at a fraction of
0.4, where 101-143 of 160 slots aligned, it learned more per step than ``ties`` and
``learnable`` on each of 3 seeds; zero-gradient prompts teach nothing at the current policy.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence

from sketchstore.selection import ranked

from .errors import BadConfigError

STRATEGIES = ("cropi", "full", "random", "learnability", "pass-rate", "influence-once")
INFLUENCE_STRATEGIES = ("cropi", "influence-once")
FILLS = ("ties", "fewer", "learnable")
DEFAULT_FILL = "fewer"


def count_for(fraction: float, total: int) -> int:
    """How many prompts a fraction of ``total`` selects (at least one)."""
    if not 0 < fraction <= 1:
        raise BadConfigError(f"selection fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * total))


def random_subset(ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    return random.Random(seed).sample(sorted(ids), count_for(fraction, len(ids)))


def learnability(ids: Sequence[str], pass_rates: Mapping[str, float], fraction: float) -> list[str]:
    learn = {i: pass_rates[i] * (1 - pass_rates[i]) for i in ids}
    return ranked(learn)[:count_for(fraction, len(ids))]


def pass_rate_filter(ids: Sequence[str], pass_rates: Mapping[str, float], fraction: float, seed: int) -> list[str]:
    informative = sorted(i for i in ids if 0 < pass_rates[i] < 1)
    want = count_for(fraction, len(ids))
    return informative if len(informative) <= want else random.Random(seed).sample(informative, want)


def static_selection(strategy: str, ids: Sequence[str], pass_rates: Mapping[str, float], fraction: float,
                     seed: int) -> list[str]:
    """The fixed subset of a non-influence strategy."""
    if strategy == "full":
        return list(ids)
    if strategy == "random":
        return random_subset(ids, fraction, seed)
    missing = [i for i in ids if i not in pass_rates]
    if missing:
        raise BadConfigError(f"no behaviour pass rate for prompt {missing[0]!r} (needed by {strategy})")
    if strategy == "learnability":
        return learnability(ids, pass_rates, fraction)
    if strategy == "pass-rate":
        return pass_rate_filter(ids, pass_rates, fraction, seed)
    raise BadConfigError(f"{strategy!r} is not a static strategy; choose one of {', '.join(STRATEGIES)}")


def influence_selection(fused: Mapping[str, float], best: Mapping[str, float], fraction: float, fill: str,
                        pass_rates: Mapping[str, float] | None = None) -> list[str]:
    """The ids an influence selection trains on: the top ``fraction`` by ``fused`` score, with
    ``fill`` deciding what follows the prompts that align (``best`` score > 0; see the module
    docstring). ``pass_rates`` (behaviour) are needed by ``learnable``."""
    if fill not in FILLS:
        raise BadConfigError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")
    want = count_for(fraction, len(fused))
    order = ranked(fused)
    aligned = [i for i in order if best[i] > 0]
    if fill == "ties" or len(aligned) >= want or not aligned:
        return order[:want]
    if fill == "fewer":
        return aligned
    if pass_rates is None:
        raise BadConfigError("fill 'learnable' needs the behaviour pass rates")
    chosen = set(aligned)
    rest = ranked({i: pass_rates[i] * (1 - pass_rates[i]) for i in fused if i not in chosen})
    return aligned + rest[:want - len(aligned)]

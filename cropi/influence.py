"""CROPI's influence selection at one checkpoint, shared by the stage loop (cropi.curriculum)
and the trainer integrations (cropi.integrations).

Two steps, so a caller whose scores are computed elsewhere (e.g. by ``sketch score`` next to
a verl run) can take the second alone::

    sketch_and_score(store, name, checkpoint, trajectories)   POPI sketches of the pool and of
        each validation set at ``checkpoint`` (sketches the store has for ``name`` are reused),
        then scores of the pool against each validation set that has a gradient (returned)
    stored_selection(store, name, val_splits, fraction, ...)  the ids a stage trains on, from
        the stored scores: validation sets fused, top fraction, ``fill`` for the rest

Splits in the store: ``pool`` for the pool and one split per validation set (the curriculum
names them ``val-<name>``), all under checkpoint ``name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from sketchstore import BuildConfig, ProjectionSpec, ScoreOptions, SketchStore, SplitRef, build_sketches, fuse, load_scores, score

from .errors import BadConfigError, NoValidationSignalError
from .popi import POPIOptions
from .strategies import influence_selection
from .trajectory import read_trajectories

POOL_SPLIT = "pool"


def pass_rates(trajectories: Path) -> dict[str, float]:
    """Each prompt's behaviour pass rate, from a trajectory store."""
    table = read_trajectories(trajectories, columns=["prompt_id", "pass_rate"])
    return dict(zip(table.column("prompt_id").to_pylist(), table.column("pass_rate").to_pylist()))


def val_splits(trajectories: Mapping[str, Path]) -> list[str]:
    """The validation splits of a ``{split: trajectories}`` mapping (every split but the pool)."""
    if POOL_SPLIT not in trajectories:
        raise BadConfigError(f"no {POOL_SPLIT!r} trajectories among {sorted(trajectories)}")
    vals = [s for s in trajectories if s != POOL_SPLIT]
    if not vals:
        raise BadConfigError("influence selection needs behaviour trajectories of at least one validation set")
    return vals


def sketch_and_score(store: Path, name: str, checkpoint: Path, trajectories: Mapping[str, Path],
                     spec: ProjectionSpec = ProjectionSpec(), device: str = "cpu",
                     log: Callable[[str], None] = print) -> list[str]:
    """POPI sketches of every split of ``trajectories`` ({split: behaviour trajectory store}, one
    of them ``pool``) at ``checkpoint``, stored under checkpoint ``name``; then the pool's scores
    against each validation split with a non-zero sketch, which are returned. Raises
    NoValidationSignalError when every validation sketch is zero."""
    vals = val_splits(trajectories)
    for split, traj in trajectories.items():
        report = build_sketches(BuildConfig(model=checkpoint, data=None, store=store, checkpoint=name, split=split,
                                            spec=spec, objective=POPIOptions(trajectories=traj), device=device),
                                progress=False)
        log(f"{split} sketches {report.added} new, {report.skipped} reused")
    sketches = SketchStore.open(store, writable=True)
    live = [v for v in vals if bool((sketches.read(name, v)[1].abs().sum(dim=1) > 0).any())]
    if not live:
        raise NoValidationSignalError(
            f"every validation sketch at {name} is zero ({', '.join(vals)}): the behaviour samples agree on every "
            "validation prompt (all right or all wrong), so there is no validation gradient to align with")
    if len(live) < len(vals):
        log(f"validation sets with only zero sketches left out: {', '.join(v for v in vals if v not in live)}")
    score(sketches, SplitRef(name, POOL_SPLIT), [SplitRef(name, v) for v in live], ScoreOptions(), progress=False)
    return live


def stored_selection(store: Path, name: str, vals: Sequence[str], fraction: float, fusion: str = "rrf",
                     fill: str = "ties", rates: Mapping[str, float] | None = None,
                     pool_split: str = POOL_SPLIT) -> tuple[list[str], dict[str, float]]:
    """(chosen ids, best score over validation sets per pool id) from the scores stored for
    checkpoint ``name``; see :func:`cropi.strategies.influence_selection` for ``fill`` and
    ``rates`` (behaviour pass rates, needed by ``learnable``)."""
    train = SplitRef(name, pool_split)
    refs = [SplitRef(name, v) for v in vals]
    per_set = load_scores(SketchStore.open(store), train, refs)  # read once: the selection and its summary
    fused = fuse([per_set[r] for r in refs], fusion)
    best = {i: max(scores[i] for scores in per_set.values()) for i in fused}
    return influence_selection(fused, best, fraction, fill, rates), best


def describe_influence(stage: int, best: Mapping[str, float], chosen: Sequence[str], fill: str) -> str:
    """One log line: how many pool prompts align with the validation gradient (best score over
    validation sets > 0), how many have none (score 0: zero gradient), how many of the chosen
    align, and what filled the rest (``fill``)."""
    positive = sum(v > 0 for v in best.values())
    zero = sum(v == 0 for v in best.values())
    chosen_positive = sum(best[i] > 0 for i in chosen)
    line = (f"stage {stage}: influence > 0 for {positive} of {len(best)} pool prompts ({zero} with zero gradient); "
            f"{chosen_positive} of {len(chosen)} selected align")
    if chosen_positive < len(chosen):
        filled = {"ties": "zero or negative scores (ties in hash order)", "learnable": "the most learnable "
                  "unaligned prompts (p(1-p))", "fewer": "nothing"}[fill]
        line += f" -- the rest are filled from {filled}"
    return line

"""How a reward reads responses: counts of parsed, unparsed and correct, with examples of each.

``cropi rewards`` runs :func:`check_rewards` on the trajectories of ``cropi rollout``
(:func:`trajectory_rows`) or on a dataset's reference solutions (:func:`dataset_rows`), so a
user sees, before training, whether the reward extracts the answers their policy writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from sketchstore.data import ColumnMap, columns_of, map_columns, read_source

from .errors import BadConfigError
from .rewards import get_scorer
from .tasks import normalize_rows
from .trajectory import read_trajectories

DEFAULT_EXAMPLES = 5
KINDS = ("correct", "wrong", "unparsed")  # wrong: an answer was extracted but scored 0
SHOWN_CHARS = 160  # the tail of a response an example shows
TRAJECTORY_COLUMNS = ("prompt_id", "sample", "answer", "response", "reward")


@dataclass(frozen=True)
class ScoredResponse:
    """One response as the reward read it."""

    id: str
    answer: str
    response: str
    reward: float
    parsed: bool
    extracted: str | None
    stored_reward: float | None = None  # the reward recorded with a trajectory, if any

    @property
    def kind(self) -> str:
        return "correct" if self.reward > 0 else ("wrong" if self.parsed else "unparsed")


@dataclass
class RewardReport:
    """Counts over every response and the first few examples of each :data:`KINDS`."""

    reward: str
    source: str
    total: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: dict[str, list[ScoredResponse]] = field(default_factory=lambda: {k: [] for k in KINDS})
    changed: int = 0  # responses whose reward differs from the stored one

    @property
    def parsed(self) -> int:
        return self.total - self.counts["unparsed"]

    def add(self, scored: ScoredResponse, keep: int) -> None:
        self.total += 1
        self.counts[scored.kind] += 1
        if len(self.examples[scored.kind]) < keep:
            self.examples[scored.kind].append(scored)
        if scored.stored_reward is not None and not math.isclose(scored.stored_reward, scored.reward):
            self.changed += 1

    def as_dict(self) -> dict[str, Any]:
        return {"reward": self.reward, "source": self.source, "total": self.total, "parsed": self.parsed,
                **self.counts, "changed": self.changed,
                "examples": {k: [asdict(e) for e in v] for k, v in self.examples.items()}}

    def summary(self) -> str:
        """The counts, then the examples of each kind, as printed by ``cropi rewards``."""
        share = (lambda n: f"{n / self.total:.1%}") if self.total else (lambda n: "-")
        lines = [f"reward {self.reward} on {self.total} responses of {self.source}",
                 f"  parsed    {self.parsed:>7}  ({share(self.parsed)})",
                 f"  unparsed  {self.counts['unparsed']:>7}  ({share(self.counts['unparsed'])})",
                 f"  correct   {self.counts['correct']:>7}  ({share(self.counts['correct'])})",
                 f"  wrong     {self.counts['wrong']:>7}  ({share(self.counts['wrong'])}; parsed, scored 0)"]
        if self.changed:
            lines.append(f"  {self.changed} responses score differently from the reward stored with them")
        for kind in KINDS:
            if self.examples[kind]:
                lines.append(f"{kind} examples:")
                lines += [f"  [{e.id}] gold {e.answer!r}, extracted {e.extracted!r}: {_tail(e.response)}"
                          for e in self.examples[kind]]
        return "\n".join(lines)


def _tail(text: str) -> str:
    """The end of a response as a Python literal, ``...`` in front when cut."""
    return ("..." if len(text) > SHOWN_CHARS else "") + repr(text[-SHOWN_CHARS:])


def check_rewards(rows: Iterable[Mapping[str, Any]], reward: str = "math_verify", examples: int = DEFAULT_EXAMPLES,
                  source: str = "<rows>") -> RewardReport:
    """Score every row's ``response`` against its ``answer`` with ``reward``; rows carry an ``id``
    (and, from trajectories, the ``stored_reward``)."""
    if examples < 0:
        raise BadConfigError(f"examples must be >= 0, got {examples}")
    score = get_scorer(reward)
    report = RewardReport(reward=reward, source=source)
    for row in rows:
        response, answer = str(row.get("response") or ""), str(row.get("answer") or "")
        result = score(response, answer)
        report.add(ScoredResponse(id=str(row["id"]), answer=answer, response=response, reward=result.reward,
                                  parsed=result.parsed, extracted=result.extracted,
                                  stored_reward=row.get("stored_reward")), examples)
    if report.total == 0:
        raise BadConfigError(f"{source}: no responses to score")
    return report


def trajectory_rows(path: str | os.PathLike, behaviour: str | None = None) -> list[dict[str, Any]]:
    """The responses of a trajectory store (``cropi rollout --out``), id ``PROMPT_ID/SAMPLE``."""
    if not Path(path).exists():
        raise BadConfigError(f"trajectories not found: {path}")
    table = read_trajectories(path, behaviour, columns=TRAJECTORY_COLUMNS)
    return [{"id": f"{r['prompt_id']}/{r['sample']}", "answer": r["answer"], "response": r["response"],
             "stored_reward": r["reward"]} for r in table.to_pylist()]


def dataset_rows(path: str | os.PathLike, columns: ColumnMap | None = None) -> list[dict[str, Any]]:
    """The reference responses of a dataset, read as ``cropi rollout`` reads its tasks (a GSM8K
    row's response is then its solution ending ``The answer is N.``; ``--response-column answer``
    scores the solution as released, ending ``#### N``)."""
    raw = map_columns(read_source(path), columns, str(path))
    present = columns_of(raw)
    if not {"response", "solution"} & set(present) and not {"question", "answer"} <= set(present):
        raise BadConfigError(f"{path}: no response column to score (its columns: {', '.join(present)}); "
                             "name one with --response-column")
    return normalize_rows(raw, str(path))

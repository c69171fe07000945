"""One CROPI selection per stage, made at the stage checkpoint and kept on disk.

Files under ``out``::

    store/                     POPI sketches (checkpoint ``stage<s>``; splits ``pool``, ``val-<name>``)
    selections/stage<s>.jsonl  the ids stage ``s`` trains on (read back when present, e.g. on resume)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from sketchstore import ProjectionSpec
from sketchstore.data import read_rows, write_rows

from ..checks import check_choice
from ..errors import BadConfigError
from ..influence import POOL_SPLIT, describe_influence, pass_rates, sketch_and_score, stored_selection
from ..strategies import FILLS, count_for


def stage_name(stage: int) -> str:
    """The store checkpoint (and selection file stem) of stage ``stage``."""
    return f"stage{stage}"


@dataclass
class StageSelector:
    """CROPI's selection at each stage checkpoint: POPI sketches of the pool and of each
    validation set from their stored behaviour trajectories (``cropi rollout`` output), scores,
    then the top ``fraction`` of the pool (validation sets fused by ``fusion``; ``fill`` as in
    cropi.strategies)."""

    out: Path
    pool: Path
    val: Mapping[str, Path]
    fraction: float = 0.1
    fusion: str = "rrf"
    fill: str = "ties"
    spec: ProjectionSpec = field(default_factory=ProjectionSpec)
    device: str = "cpu"
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.trajectories = {POOL_SPLIT: Path(self.pool), **{f"val-{n}": Path(p) for n, p in self.val.items()}}
        if not self.val:
            raise BadConfigError("CROPI selection needs behaviour trajectories of at least one validation set")
        for split, path in self.trajectories.items():
            if not path.exists():
                raise BadConfigError(f"{split}: behaviour trajectories not found: {path}")
        check_choice("fill", self.fill, FILLS)
        count_for(self.fraction, 1)

    def pool_size(self) -> int:
        """How many prompts the pool's behaviour trajectories hold."""
        return len(pass_rates(self.trajectories[POOL_SPLIT]))

    def stage_size(self) -> int:
        """How many prompts a stage selects (``fill='fewer'`` may select fewer)."""
        return count_for(self.fraction, self.pool_size())

    @property
    def store(self) -> Path:
        return self.out / "store"

    def selection_file(self, stage: int) -> Path:
        return self.out / "selections" / f"{stage_name(stage)}.jsonl"

    def saved(self, stage: int) -> list[str] | None:
        """The ids stage ``stage`` trains on when already selected, else None."""
        path = self.selection_file(stage)
        return [r["id"] for r in read_rows(path, required=("id",))] if path.is_file() else None

    def select(self, stage: int, checkpoint: Path) -> list[str]:
        """The ids stage ``stage`` trains on, selected at ``checkpoint`` (an HF model directory)
        unless already selected."""
        saved = self.saved(stage)
        if saved is not None:
            return saved
        name = stage_name(stage)
        vals = sketch_and_score(self.store, name, Path(checkpoint), self.trajectories, self.spec, self.device,
                                log=lambda line: self.log(f"stage {stage}: {line}"))
        rates = pass_rates(self.trajectories[POOL_SPLIT]) if self.fill == "learnable" else None
        chosen, best = stored_selection(self.store, name, vals, self.fraction, self.fusion, self.fill, rates)
        self.log(describe_influence(stage, best, chosen, self.fill))
        write_rows([{"id": i, "stage": stage} for i in chosen], self.selection_file(stage))
        return chosen

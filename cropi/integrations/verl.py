"""CROPI's stagewise selection as a verl curriculum sampler (extra ``verl``; verl 0.7.1, the
last release with ``AbstractCurriculumSampler`` and ``data.sampler.class_path``).

verl builds the sampler in ``create_rl_sampler`` from ``data.sampler.class_path`` /
``class_name`` and calls its ``update(batch)`` after every training step. At stage ``s`` the
sampler draws from the selection made from the scores the sketch store holds for checkpoint
``checkpoints[s]`` (built and scored beforehand with ``sketch build`` / ``sketch score`` or
:func:`cropi.influence.sketch_and_score`): the top ``fraction`` of split ``pool_split`` by
influence against the ``val`` splits (fused by ``fusion``). It moves to stage ``s + 1`` after
``steps_per_stage`` updates; its next index comes from the new selection (verl requires
``data.dataloader_num_workers=0`` with a curriculum sampler, so nothing is fetched ahead).

Keys under ``data.sampler`` (add them with ``+data.sampler.<key>=...``)::

    store            the sketch store
    val              validation splits (a list)
    checkpoints      the store checkpoint of each stage, in order (a list)
    steps_per_stage  updates per stage
    fraction         share of the pool selected per stage (default 0.1)
    fusion           rrf | mean | max (default rrf)
    fill             ties | fewer (default ties; see cropi.strategies)
    pool_split       the pool's split in the store (default pool)
    id_key           the dataset field holding the store's prompt id (default extra_info.index;
                     dots reach into nested fields)

An epoch is ``fraction x len(dataset)`` draws; within a stage the selection is drawn in a seeded
random order, reshuffled when exhausted (so a ``fewer`` selection still fills the epoch). The
sampler is stateful (``state_dict``/``load_state_dict``): verl's ``StatefulDataLoader`` saves it
with each checkpoint and a resumed run continues at the same step, stage and draw.
"""

from __future__ import annotations

import random
from collections.abc import Sized
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig
from verl import DataProto
from verl.experimental.dataset.sampler import AbstractCurriculumSampler

from sketchstore.errors import BadInputError, UnknownKeyError
from sketchstore.seeds import stable_seed
from sketchstore.selection import FUSIONS

from ..checks import check_choice, check_int
from ..errors import BadConfigError
from ..influence import POOL_SPLIT, stored_selection
from ..strategies import count_for

FILLS = ("ties", "fewer")  # 'learnable' needs behaviour pass rates, which a store does not hold
DEFAULT_ID_KEY = "extra_info.index"


def row_field(row: Any, key: str) -> Any:
    """``row[a][b]...`` for ``key`` = ``a.b...``; a missing field is an error naming it."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BadConfigError(f"dataset row has no field {key!r} (data.sampler.id_key)")
        value = value[part]
    return value


def dataset_ids(data_source: Sized, id_key: str) -> list[str]:
    """The prompt id of each dataset row: from verl's ``RLHFDataset.dataframe`` when present
    (no tokenisation), else from the rows."""
    frame = getattr(data_source, "dataframe", None)
    rows = frame if frame is not None else (data_source[i] for i in range(len(data_source)))
    return [str(row_field(row, id_key)) for row in rows]


class CROPISampler(AbstractCurriculumSampler):
    """Draws each stage's CROPI selection from the sketch store; see the module docstring."""

    def __init__(self, data_source: Sized, data_config: DictConfig) -> None:
        cfg = data_config.sampler
        for key in ("store", "val", "checkpoints", "steps_per_stage"):
            if cfg.get(key) is None:
                raise BadConfigError(f"data.sampler.{key} is required by CROPISampler")
        self.store = Path(cfg.store)
        self.val = [str(v) for v in cfg.val]
        self.checkpoints = [str(c) for c in cfg.checkpoints]
        if not self.val or not self.checkpoints:
            raise BadConfigError("data.sampler.val and data.sampler.checkpoints must not be empty")
        self.steps_per_stage = check_int("data.sampler.steps_per_stage", cfg.steps_per_stage, 1)
        self.fraction = float(cfg.get("fraction", 0.1))
        self.fusion = check_choice("data.sampler.fusion", cfg.get("fusion", "rrf"), FUSIONS)
        self.fill = check_choice("data.sampler.fill", cfg.get("fill", "ties"), FILLS)
        self.pool_split = str(cfg.get("pool_split", POOL_SPLIT))
        self.seed = int(data_config.get("seed") or 0)
        ids = dataset_ids(data_source, str(cfg.get("id_key", DEFAULT_ID_KEY)))
        self.index = {i: n for n, i in enumerate(ids)}
        if len(self.index) != len(ids):
            raise BadConfigError("dataset prompt ids (data.sampler.id_key) are not unique")
        self.size = count_for(self.fraction, len(ids))
        self.step = 0
        self.stage = -1
        self._order: list[int] = []
        self._draws = 0  # shuffles so far (seeds the next one)
        self._left = 0  # draws left in the current epoch
        self._enter(0)

    def _stage_at(self, step: int) -> int:
        return min(step // self.steps_per_stage, len(self.checkpoints) - 1)

    def selection(self, stage: int) -> list[str]:
        """The ids of stage ``stage``, from the scores stored for ``checkpoints[stage]``."""
        name = self.checkpoints[stage]
        try:
            ids, _ = stored_selection(self.store, name, self.val, self.fraction, self.fusion, self.fill,
                                      pool_split=self.pool_split)
        except (BadInputError, UnknownKeyError) as err:
            raise BadConfigError(f"stage {stage}: {err} -- build and score checkpoint {name} (sketch build, "
                                 f"sketch score) before the run reaches it") from err
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise BadConfigError(f"selected prompt {missing[0]!r} ({name}) is not in the dataset "
                                 f"({len(missing)} missing; check data.sampler.id_key)")
        return ids

    def _enter(self, stage: int) -> None:
        self.ids = self.selection(stage)
        self.stage = stage
        self._order = []  # the rest of the previous stage's order is dropped

    def _next(self) -> int:
        if not self._order:
            rng = random.Random(stable_seed("cropi-verl", self.seed, self.stage, self._draws))
            self._order = [self.index[i] for i in self.ids]
            rng.shuffle(self._order)
            self._draws += 1
        return self._order.pop()

    def __iter__(self) -> Iterator[int]:
        if not self._left:  # a new epoch (else: the rest of one restored from a checkpoint)
            self._left = self.size
        while self._left:
            self._left -= 1
            yield self._next()

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler stands: step, stage, the rest of the current order and epoch."""
        return {"step": self.step, "stage": self.stage, "order": list(self._order), "draws": self._draws,
                "left": self._left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the stage's selection is read from the store again)."""
        self.step = state["step"]
        self._enter(state["stage"])
        self._order, self._draws, self._left = list(state["order"]), state["draws"], state["left"]

    def update(self, batch: DataProto) -> None:
        """Called by verl after every training step; enters the next stage when it is due."""
        self.step += 1
        stage = self._stage_at(self.step)
        if stage != self.stage:
            self._enter(stage)

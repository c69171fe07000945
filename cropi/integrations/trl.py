"""CROPI's stagewise selection with TRL's ``GRPOTrainer`` (extra ``trl``).

Two ways in, both selecting with :class:`~cropi.integrations.stages.StageSelector` (POPI
sketches of the pool at the stage checkpoint from stored behaviour trajectories, scores,
top fraction):

- :func:`run_trl_stages`: the stage loop. Per stage, a fresh ``GRPOTrainer`` on the selected
  rows of the user's dataset, resumed from the previous stage's trainer checkpoint (weights,
  optimizer, scheduler, step, RNG), which is also the checkpoint the next selection is made
  at. The learning-rate schedule spans all stages (``max_steps`` = stages x steps per stage).
- :class:`CROPICallback`: for an existing TRL script. Each epoch is a stage. Pass its
  ``train_dataset`` and the callback to your ``GRPOTrainer`` and set ``num_train_epochs`` to the
  number of stages; at the start of training and at every epoch end it saves the model to
  ``out/checkpoints/stage<s>``, selects, and the next epoch's prompts are that selection.
  TRL's own ``RepeatSampler`` keeps drawing slots ``0..n-1`` of a fixed-length dataset, each
  repeated ``num_generations`` times in one generation batch; a slot is resolved to its row of
  the current selection when the dataloader fetches it, and the next epoch's fetches start
  after ``on_epoch_end``, so the ``num_generations`` grouping is TRL's and every prompt of an
  epoch comes from that epoch's selection.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

from datasets import Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trl import GRPOConfig, GRPOTrainer

from ..checks import check_int
from ..errors import BadConfigError
from .stages import StageSelector, stage_name

CHECKPOINT_PREFIX = "checkpoint-"  # transformers' Trainer checkpoint directories


def row_index(dataset: Dataset, id_column: str) -> dict[str, int]:
    """Row number of each id of ``dataset`` (ids must be unique)."""
    if id_column not in dataset.column_names:
        raise BadConfigError(f"dataset has no id column {id_column!r} (columns: {', '.join(dataset.column_names)})")
    ids = [str(i) for i in dataset[id_column]]
    index = {i: n for n, i in enumerate(ids)}
    if len(index) != len(ids):
        raise BadConfigError(f"dataset column {id_column!r} has duplicate ids")
    return index


def check_selected(index: dict[str, int], ids: Sequence[str]) -> None:
    """An id the dataset lacks (a pool prompt that is not a dataset row) is an error."""
    missing = [i for i in ids if i not in index]
    if missing:
        raise BadConfigError(f"selected id {missing[0]!r} is not in the dataset ({len(missing)} missing)")


def selected_rows(dataset: Dataset, index: dict[str, int], ids: Sequence[str]) -> Dataset:
    """The rows of ``ids``, in that order."""
    check_selected(index, ids)
    return dataset.select([index[i] for i in ids])


class _StopAt(TrainerCallback):
    """Stops training and saves a trainer checkpoint at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
        return control


def _one_process(args: TrainingArguments) -> None:
    if args.world_size > 1:
        raise BadConfigError(f"CROPI's TRL integration runs in one process; this run has {args.world_size} "
                             "(each would sketch and select on its own)")


def _stage_checkpoint(output_dir: Path, stage: int, steps_per_stage: int) -> Path:
    return output_dir / f"{CHECKPOINT_PREFIX}{stage * steps_per_stage}"


def run_trl_stages(model: str | Path, dataset: Dataset, reward_funcs: Any, args: GRPOConfig, selector: StageSelector,
                   stages: int, steps_per_stage: int, id_column: str = "id",
                   callbacks: Sequence[TrainerCallback] = (), **trainer_kwargs: Any) -> list[list[str]]:
    """Trains ``stages`` CROPI stages of ``steps_per_stage`` GRPO steps each and returns each
    stage's selected ids. Stage ``s`` selects at ``model`` (s = 0) or at the trainer checkpoint
    ``args.output_dir/checkpoint-<s * steps_per_stage>``; a run whose checkpoints exist resumes
    after the last one. ``reward_funcs``, ``callbacks`` and ``trainer_kwargs`` go to every
    ``GRPOTrainer``."""
    check_int("stages", stages, 1)
    check_int("steps_per_stage", steps_per_stage, 1)
    _one_process(args)
    index = row_index(dataset, id_column)
    output_dir = Path(args.output_dir)
    done = max((s for s in range(1, stages + 1) if _stage_checkpoint(output_dir, s, steps_per_stage).is_dir()),
               default=0)
    selections = [selector.select(s, _stage_checkpoint(output_dir, s, steps_per_stage) if s else Path(model))
                  for s in range(done)]
    for stage in range(done, stages):
        checkpoint = _stage_checkpoint(output_dir, stage, steps_per_stage) if stage else Path(model)
        ids = selector.select(stage, checkpoint)
        selections.append(ids)
        stage_args = copy.deepcopy(args)
        stage_args.max_steps = stages * steps_per_stage  # one schedule over all stages
        stage_args.ignore_data_skip = True  # a resumed stage trains on its own rows from their start
        trainer = GRPOTrainer(model=str(checkpoint), reward_funcs=reward_funcs, args=stage_args,
                              train_dataset=selected_rows(dataset, index, ids),
                              callbacks=[*callbacks, _StopAt((stage + 1) * steps_per_stage)], **trainer_kwargs)
        trainer.train(resume_from_checkpoint=str(checkpoint) if stage else None)
    return selections


class CROPICallback(TrainerCallback):
    """CROPI for an existing ``GRPOTrainer`` script: one stage per epoch (see the module
    docstring). ``train_dataset`` is what the trainer must train on."""

    def __init__(self, selector: StageSelector, dataset: Dataset, id_column: str = "id",
                 log: Callable[[str], None] = print) -> None:
        self.selector = selector
        self.dataset = dataset
        self.index = row_index(dataset, id_column)
        self.log = log
        self.size = selector.stage_size()
        if selector.fill == "fewer":
            raise BadConfigError("fill 'fewer' can select fewer prompts than the fraction; an epoch-per-stage "
                                 "dataset needs the same count every stage (use 'ties' or 'learnable')")
        self.ids: list[str] = []
        self.stage = -1
        self.train_dataset = Dataset.from_dict({"slot": list(range(self.size))})
        self.train_dataset.set_transform(self._rows)

    def _rows(self, batch: dict[str, list]) -> dict[str, list]:
        if not self.ids:
            raise BadConfigError("CROPICallback: no selection yet; pass the callback to the GRPOTrainer")
        rows = self.dataset.select([self.index[self.ids[s]] for s in batch["slot"]])
        return rows.to_dict()

    def _select(self, stage: int, model: Any, processing_class: Any) -> None:
        checkpoint = self.selector.out / "checkpoints" / stage_name(stage)
        if not checkpoint.is_dir():
            model.save_pretrained(checkpoint)
            processing_class.save_pretrained(checkpoint)
        ids = self.selector.select(stage, checkpoint)
        if len(ids) != self.size:
            raise BadConfigError(f"stage {stage} selected {len(ids)} prompts, expected {self.size}")
        check_selected(self.index, ids)
        self.ids, self.stage = ids, stage
        self.log(f"stage {stage}: training on {len(ids)} of {self.selector.pool_size()} pool prompts")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        _one_process(args)
        if args.remove_unused_columns:
            raise BadConfigError("CROPICallback needs remove_unused_columns=False (GRPOConfig's default)")
        per_batch = args.generation_batch_size // args.num_generations
        if self.size % per_batch:
            self.log(f"warning: {self.size % per_batch} of each stage's {self.size} prompts are left out of every "
                     f"epoch (TRL drops a last generation batch with fewer than {per_batch} prompts)")
        self._select(int(state.epoch or 0), model, processing_class)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                     processing_class: Any = None, **kwargs: Any) -> None:
        stage = round(state.epoch)
        if state.global_step < state.max_steps and stage != self.stage:  # another epoch follows
            self._select(stage, model, processing_class)

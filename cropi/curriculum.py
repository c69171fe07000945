"""CROPI's stage loop and the baselines it is compared with, as one resumable run.

A run is consecutive stage segments of one GRPO training run (as the public reference)::

    stage s:  checkpoint theta_s  (HF format, resumable)
              [cropi]  POPI sketches of the pool and of each validation set at theta_s, from the
                       behaviour trajectories (reusing every sketch the store already has for
                       theta_s), score, select the top fraction (validation sets fused by RRF)
              [others] the strategy's subset (fixed from stage 0, see cropi.strategies)
              train ``steps_per_stage`` GRPO steps on the selection

The behaviour policy of POPI is the initial model (trajectories sampled once, before stage 0)
unless ``refresh_every`` = N > 0, which re-samples them from the current policy every N stages.
Files under ``out``::

    train/                 the trainer's run directory (log.jsonl, plots, checkpoints/stage<s>:
                           theta at the start of stage s; stage<S> is the final policy)
    trajectories/<name>/   behaviour trajectories (cropi rollout format) of pool and validation
    store/                 the sketch store (checkpoint "stage<s>", splits "pool" and "val-<name>")
    selections/stage<s>.jsonl   the ids each stage trained on
    curriculum.json        the config and the stages completed (for resume)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from sketchstore import ProjectionSpec
from sketchstore.atomic import write_text_atomic
from sketchstore.data import read_rows, write_rows
from sketchstore.options import option
from sketchstore.selection import FUSIONS

from .checks import check_choice, check_int
from .errors import BadConfigError, NoValidationSignalError
from .influence import POOL_SPLIT, describe_influence, pass_rates, sketch_and_score, stored_selection
from .rollout import RolloutConfig, run_rollouts
from .run_dir import CKPT_DIR
from .strategies import DEFAULT_FILL, FILLS, INFLUENCE_STRATEGIES, STRATEGIES, count_for, static_selection
from .tasks import read_tasks
from .train_config import TrainConfig
from .trainer import GRPOTrainer

STATE_NAME = "curriculum.json"
DEFAULT_FRACTION = 0.1  # the paper selects ~10% of the pool per stage
DEFAULT_VAL_PROMPTS = 100  # the paper's validation target: up to N=100 prompts per set


@dataclass
class CurriculumConfig:
    """A stagewise run. ``train`` holds the GRPO settings (its ``train`` rows are ignored: the
    pool is ``pool``; its seed seeds everything here); ``val_sets`` are the validation sets whose
    gradients guide selection; ``spec`` is the projection of the POPI sketches."""

    train: TrainConfig = option(help="GRPO settings of every stage.")
    pool: Path = option(help="Prompt pool (tasks file).")
    val_sets: dict[str, Path] = option(help="Validation set guiding selection: FILE or NAME=FILE (repeatable).",
                                       flag="val")
    strategy: str = option("cropi", "Which prompts each stage trains on.", choices=STRATEGIES)
    stages: int = option(4, "Stages (a selection is made at the start of each).")
    steps_per_stage: int = option(10, "GRPO steps per stage.")
    fraction: float = option(DEFAULT_FRACTION, "Share of the pool selected per stage (paper: 10%).")
    refresh_every: int = option(0, "Re-sample behaviour trajectories every N stages (0: never, as the reference).")
    popi_n: int = option(8, "Behaviour trajectories per prompt for POPI (K).")
    val_prompts: int = option(DEFAULT_VAL_PROMPTS, "Validation prompts per set (the paper's N = 100).")
    spec: ProjectionSpec = option(default_factory=ProjectionSpec, help="Projection of the POPI sketches.")
    fusion: str = option("rrf", "How validation sets combine.", choices=FUSIONS)
    fill: str = option(DEFAULT_FILL, "What fills an influence selection when fewer prompts align than the fraction asks "
                               "for: ties (next by score), fewer (aligned only), learnable (top p(1-p)).", choices=FILLS)

    def __post_init__(self) -> None:
        self.pool = Path(self.pool)
        self.val_sets = {name: Path(p) for name, p in self.val_sets.items()}
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("fusion", self.fusion, FUSIONS)
        check_choice("fill", self.fill, FILLS)
        if not self.pool.is_file():
            raise BadConfigError(f"pool file not found: {self.pool}")
        if self.strategy in INFLUENCE_STRATEGIES and not self.val_sets:
            raise BadConfigError(f"strategy {self.strategy} needs at least one validation set")
        for name, path in self.val_sets.items():
            if not path.is_file():
                raise BadConfigError(f"validation set {name!r}: file not found: {path}")
        for name, minimum in (("stages", 1), ("steps_per_stage", 1), ("popi_n", 2), ("val_prompts", 1),
                              ("refresh_every", 0)):
            check_int(name, getattr(self, name), minimum)
        count_for(self.fraction, 1)

    @property
    def out(self) -> Path:
        return self.train.out.parent

    @property
    def seed(self) -> int:
        return self.train.seed


def _state(out: Path) -> dict:
    path = out / STATE_NAME
    return json.loads(path.read_text()) if path.is_file() else {"stages_done": 0, "behaviour": None}


def _save_state(out: Path, state: dict) -> None:
    write_text_atomic(out / STATE_NAME, json.dumps(state, indent=1, default=str))


class Curriculum:
    """Runs (or resumes) one strategy's stages; see the module docstring."""

    def __init__(self, config: CurriculumConfig, log: Callable[[str], None] = print, engine: Any = None) -> None:
        self.config = config
        self.log = log
        self.out = config.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.pool_rows = read_tasks(config.pool)
        self.pool_file = write_rows(self.pool_rows, self.out / "pool.jsonl")
        rng = random.Random(config.seed)
        self.val_files = {}
        for name, path in config.val_sets.items():
            rows = read_tasks(path)
            if len(rows) > config.val_prompts:
                rows = rng.sample(rows, config.val_prompts)
            self.val_files[name] = write_rows(rows, self.out / f"val-{name}.jsonl")
        self.state = _state(self.out)
        if self.state["stages_done"] > 0:
            self.trainer = GRPOTrainer.resume(config.train.out, log=log, engine=engine)
        else:
            self.trainer = GRPOTrainer(config.train, log=log, engine=engine)

    # ------------------------------------------------------------------ behaviour trajectories
    def _trajectories(self, data: Path) -> Path:
        out = self.out / "trajectories" / f"{self.state['behaviour']}-{data.stem}"
        t = self.config.train
        report = run_rollouts(RolloutConfig(model=self.config.train.model, data=data, out=out, n=self.config.popi_n,
                                            max_tokens=t.max_tokens, temperature=t.temperature, seed=self.config.seed,
                                            behaviour=self.state["behaviour"], reward=t.reward, device=t.device),
                              progress=False, llm=self.trainer.engine, tokenizer=self.trainer.tokenizer)
        if report.trajectories:  # behaviour rollouts count in the accuracy-vs-rollouts curve
            self.trainer.consume_rollouts(report.trajectories, f"behaviour {self.state['behaviour']}")
        return out

    def _ensure_behaviour(self, stage: int) -> dict[str, Path]:
        """Behaviour trajectories for the pool and validation sets; (re)sampled when due."""
        c = self.config
        due = self.state["behaviour"] is None or (c.refresh_every and stage % c.refresh_every == 0 and stage > 0
                                                    and self.state.get("behaviour_stage") != stage)
        if due:
            self.state["behaviour"] = f"stage{stage}"
            self.state["behaviour_stage"] = stage
            _save_state(self.out, self.state)
        files = {POOL_SPLIT: self.pool_file, **{f"val-{n}": f for n, f in self.val_files.items()}}
        return {split: self._trajectories(data) for split, data in files.items()}

    # ------------------------------------------------------------------ selection
    def influence_selection(self, stage: int, checkpoint: Path, trajectories: dict[str, Path]) -> list[str]:
        c = self.config
        store, name = self.out / "store", f"stage{stage}"
        try:
            vals = sketch_and_score(store, name, checkpoint, trajectories, c.spec, c.train.device,
                                    log=lambda line: self.log(f"stage {stage}: {line}"))
        except NoValidationSignalError as err:
            if stage == 0:
                raise
            self.log(f"stage {stage}: {err}; keeping stage {stage - 1}'s selection")
            return self.stage_selection(stage - 1, checkpoint, trajectories)
        rates = pass_rates(trajectories[POOL_SPLIT]) if c.fill == "learnable" else None
        chosen, best = stored_selection(store, name, vals, c.fraction, c.fusion, c.fill, rates)
        self.log(describe_influence(stage, best, chosen, c.fill))
        return chosen

    def stage_selection(self, stage: int, checkpoint: Path, trajectories: dict[str, Path] | None) -> list[str]:
        """The ids stage ``stage`` trains on (read back when already made, e.g. after a resume)."""
        c = self.config
        path = self.out / "selections" / f"stage{stage}.jsonl"
        if path.is_file():
            return [r["id"] for r in read_rows(path, required=("id",))]
        if stage > 0 and c.strategy != "cropi":
            ids = self.stage_selection(0, checkpoint, trajectories)
        elif c.strategy in INFLUENCE_STRATEGIES:
            ids = self.influence_selection(stage, checkpoint, trajectories)
        else:
            rates = pass_rates(trajectories[POOL_SPLIT]) if trajectories else {}
            ids = static_selection(c.strategy, [r["id"] for r in self.pool_rows], rates, c.fraction, c.seed)
        write_rows([{"id": i, "stage": stage} for i in ids], path)
        return ids

    def checkpoint(self, stage: int) -> Path:
        """theta at the start of ``stage`` (saved once; present already after a resume)."""
        path = self.config.train.out / CKPT_DIR / f"stage{stage}"
        return path if path.is_dir() else self.trainer.save_checkpoint(f"stage{stage}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        c = self.config
        start = time.perf_counter()
        by_id = {r["id"]: r for r in self.pool_rows}
        needs_behaviour = c.strategy in INFLUENCE_STRATEGIES or c.strategy in ("learnability", "pass-rate")
        for stage in range(self.state["stages_done"], c.stages):
            checkpoint = self.checkpoint(stage)
            fresh = stage == 0 or c.strategy == "cropi"
            trajectories = self._ensure_behaviour(stage) if needs_behaviour and fresh else None
            ids = self.stage_selection(stage, checkpoint, trajectories)
            self.log(f"stage {stage}: {c.strategy} trains on {len(ids)} of {len(self.pool_rows)} prompts")
            self.trainer.set_pool([by_id[i] for i in ids])
            self.trainer.run(c.steps_per_stage)
            self.trainer.save_checkpoint(f"stage{stage + 1}")
            self.state["stages_done"] = stage + 1
            self.state["config"] = {k: v for k, v in asdict(c).items() if k != "train"}
            self.state["seconds"] = self.state.get("seconds", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            _save_state(self.out, self.state)
        return {"strategy": c.strategy, "steps": self.trainer.step, "rollouts": self.trainer.rollouts,
                "seconds": self.state.get("seconds", 0.0)}

    def close(self) -> None:
        self.trainer.close()

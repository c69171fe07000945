"""The embedded end-to-end demo: CROPI vs full-pool GRPO vs a random subset, offline, on CPU.

Everything is made here: a warm-started small Qwen2 policy (cached after the first run), a
pool of generated math tasks spanning easy to hard levels, a validation set and a held-out
evaluation set drawn from the target levels (the ones the policy solves only sometimes), the
vLLM engine, the POPI sketches in the store, and the comparison table and plots
(:func:`cropi.compare.run_comparison`). The figure printed at the end is the step-level
acceleration of each method over the full pool.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sketchstore import ProjectionSpec
from sketchstore.atomic import write_text_atomic
from sketchstore.data import write_rows
from sketchstore.options import option
from sketchstore.spec import DEFAULT_DIM

from .compare import BASELINE, DEFAULT_METRIC, METRICS, describe_acceleration, run_comparison
from .curriculum import CurriculumConfig
from .errors import BadConfigError
from .strategies import STRATEGIES
from .tasks import generate_tasks
from .tiny_model import DEFAULT_MODEL_CACHE, ensure_warm_model
from .train_config import DEFAULT_LR, TrainConfig

POOL_LEVELS = (1, 2, 3, 4)  # easy (mostly solved) to hard (never solved) for the warm policy
TARGET_LEVELS = (1, 2)  # solved sometimes when sampled: where RL has room to help
SEED_OFFSETS = {"pool": 31, "val": 32, "eval": 33}  # disjoint generator seeds per file
# The paper selects 10% of pools of tens of thousands of prompts. Of this 400-prompt pool, 10%
# is 40 prompts, which the small policy memorises within a stage (measured: training reward on
# them rises, held-out accuracy falls, for CROPI's and for a random 40 alike); 25% is 100.
DEMO_FRACTION = 0.25


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and GRPO settings of the demo (its measured run time is in README.md)."""

    out: Path = option(Path("runs/cropi-demo"), "Output directory.")
    model_cache: Path = option(DEFAULT_MODEL_CACHE, "Where the warm-started demo policy is cached (made on the first run).")
    strategies: tuple[str, ...] = option(("cropi", "random"), "Compared with the full pool (comma-separated).")
    pool_size: int = option(400, "Prompts in the pool.")
    val_size: int = option(64, "Validation prompts.")
    eval_size: int = option(128, "Held-out evaluation prompts.")
    pool_levels: tuple[int, ...] = option(POOL_LEVELS, "Difficulty levels of the pool.")
    target_levels: tuple[int, ...] = option(TARGET_LEVELS, "Difficulty levels of the validation and evaluation sets.")
    stages: int = option(4, "Stages.")
    steps_per_stage: int = option(15, "GRPO steps per stage.")
    fraction: float = option(DEMO_FRACTION, "Share of the pool selected per stage.")
    prompts_per_step: int = option(16, "Prompts per GRPO step.")
    n: int = option(8, "Samples per prompt in GRPO steps.")
    max_tokens: int = option(48, "Response token limit.")
    temperature: float = option(1.0, "Sampling temperature.")
    lr: float = option(DEFAULT_LR, "Learning rate.")
    eval_every: int = option(10, "Steps between evaluations.")
    eval_samples: int = option(4, "Samples per evaluation prompt.")
    metric: str = option(DEFAULT_METRIC, "Accuracy behind the acceleration.", choices=METRICS)
    popi_n: int = option(8, "Behaviour trajectories per prompt for POPI.")
    dim: int = option(DEFAULT_DIM, "Sketch length k.")
    seed: int = option(0, "Run seed.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    instruction: str = option("", "Appended to every prompt (e.g. the answer format, for a chat model).")

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise BadConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        if self.metric not in METRICS:
            raise BadConfigError(f"unknown accuracy metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        for name in ("pool_size", "val_size", "eval_size"):
            if getattr(self, name) < 1:
                raise BadConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def write_demo_tasks(config: DemoConfig) -> dict[str, Path]:
    """The pool (all levels), validation and evaluation sets (target levels), as JSONL files,
    with ``config.instruction`` appended to every prompt."""
    out = Path(config.out)
    sets = {"pool": (config.pool_size, config.pool_levels), "val": (config.val_size, config.target_levels),
            "eval": (config.eval_size, config.target_levels)}
    files = {}
    for name, (size, levels) in sets.items():
        rows = generate_tasks(size, seed=config.seed + SEED_OFFSETS[name], difficulty=list(levels))
        if config.instruction:
            rows = [{**row, "prompt": f"{row['prompt']} {config.instruction}"} for row in rows]
        files[name] = write_rows(rows, out / f"{name}.jsonl")
    return files


def curriculum_config(config: DemoConfig, model: Path, files: dict[str, Path]) -> CurriculumConfig:
    """The shared settings of every arm (the strategy and run directory are set per arm)."""
    train = TrainConfig(model=model, out=Path(config.out) / BASELINE / "train", eval_sets={"target": files["eval"]},
                        steps=config.stages * config.steps_per_stage, prompts_per_step=config.prompts_per_step,
                        n=config.n, max_tokens=config.max_tokens, temperature=config.temperature, lr=config.lr,
                        eval_every=config.eval_every, eval_samples=config.eval_samples, seed=config.seed,
                        device=config.device)
    return CurriculumConfig(train=train, pool=files["pool"], val_sets={"target": files["val"]}, strategy=BASELINE,
                            stages=config.stages, steps_per_stage=config.steps_per_stage, fraction=config.fraction,
                            popi_n=config.popi_n, val_prompts=config.val_size, spec=ProjectionSpec(dim=config.dim))


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Warm start (cached), tasks, then the comparison; writes ``out/report.json`` and returns it."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_warm_model(config.model_cache, size="small", log=log)
    warm_seconds = time.perf_counter() - start
    files = write_demo_tasks(config)
    result = run_comparison(curriculum_config(config, model, files), list(config.strategies), out, log=log,
                            metric=config.metric)
    report = {
        "metric": config.metric, "model": str(model), "warm_start_seconds": warm_seconds,
        "seconds": time.perf_counter() - start, "table": result["table"], "plots": result["plots"],
        "acceleration": {name: r["acceleration"] for name, r in result["results"].items() if name != BASELINE},
        "best_accuracy": {name: r["best_accuracy"] for name, r in result["results"].items()},
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    for name, acc in report["acceleration"].items():
        log(f"acceleration of {name} over the full pool ({config.metric} pass@1 {acc['target_accuracy']:.3f}): "
            + describe_acceleration(acc))
    log(f"{(time.perf_counter() - start) / 60:.1f} min; table {out / 'results.md'}; plots {', '.join(result['plots'])}")
    return report

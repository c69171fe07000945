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

from sketchstore.data import write_rows
from .errors import BadConfigError

from .compare import BASELINE, METRICS, run_comparison
from .curriculum import CurriculumConfig
from .strategies import STRATEGIES
from .tasks import generate_tasks
from .tiny_model import ensure_warm_model
from .trainer import DEFAULT_LR, TrainConfig

POOL_LEVELS = (1, 2, 3, 4)  # easy (mostly solved) to hard (never solved) for the warm policy
TARGET_LEVELS = (1, 2)  # solved sometimes when sampled: where RL has room to help
SEED_OFFSETS = {"pool": 31, "val": 32, "eval": 33}  # disjoint generator seeds per file
# The paper selects 10% of pools of tens of thousands of prompts. Of this 400-prompt pool, 10%
# is 40 prompts, which the small policy memorises within a stage (measured: training reward on
# them rises, held-out accuracy falls, for CROPI's and for a random 40 alike); 25% is 100.
DEMO_FRACTION = 0.25


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and GRPO settings of the demo (defaults: 13.5 minutes on an idle 2-core CPU,
    warm start included; see README.md)."""

    out: Path
    model_cache: Path = Path(".cache/models")
    strategies: tuple[str, ...] = ("cropi", "random")
    pool_size: int = 400
    val_size: int = 64
    eval_size: int = 128
    pool_levels: tuple[int, ...] = POOL_LEVELS
    target_levels: tuple[int, ...] = TARGET_LEVELS
    stages: int = 4
    steps_per_stage: int = 15
    fraction: float = DEMO_FRACTION
    prompts_per_step: int = 16
    n: int = 8
    max_tokens: int = 48
    temperature: float = 1.0
    lr: float = DEFAULT_LR
    eval_every: int = 10
    eval_samples: int = 4
    metric: str = "sampled"
    popi_n: int = 8
    dim: int = 8192
    seed: int = 0
    device: str = "cpu"
    instruction: str = ""  # appended to every prompt (e.g. the answer format, for a chat model)

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
                            popi_n=config.popi_n, val_prompts=config.val_size, dim=config.dim, seed=config.seed)


def describe_acceleration(acc: dict) -> str:
    """One phrase for an :func:`cropi.compare.acceleration` result."""
    if acc["method_steps"] is None:
        return "not reached (the method never matched the full pool's best accuracy)"
    if not acc["full_steps"]:
        return "undefined (the full pool's best accuracy was its starting accuracy)"
    if acc["method_steps"] == 0:
        return "undefined (the method started at or above the full pool's best accuracy)"
    return f"{acc['acceleration']:.2f}x ({acc['full_steps']} vs {acc['method_steps']} steps)"


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
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for name, acc in report["acceleration"].items():
        log(f"acceleration of {name} over the full pool ({config.metric} pass@1 {acc['target_accuracy']:.3f}): "
            + describe_acceleration(acc))
    log(f"{(time.perf_counter() - start) / 60:.1f} min; table {out / 'results.md'}; plots {', '.join(result['plots'])}")
    return report

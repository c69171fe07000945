"""The main job: influence-guided selection against the full pool and the usual heuristics, on
the RL testbed (cropi.testbed), offline on CPU.

Everything is made here: the testbed's warm-started policy (cached after the first run), its
pool, validation and held-out evaluation sets for a setting and seed, the vLLM engine, the
POPI sketches in the store, and the comparison table and plots (:func:`cropi.compare.run_comparison`).
The figure printed at the end is each arm's acceleration over the full pool, in GRPO steps and
in rollouts consumed, decided on smoothed accuracy curves. ``benchmarks/curriculum.py`` runs the
same comparison over several seeds and both settings (:func:`comparison_base` is shared).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sketchstore import ProjectionSpec
from sketchstore.atomic import write_text_atomic
from sketchstore.options import option
from sketchstore.spec import DEFAULT_DIM

from .checks import check_choice, check_int
from .compare import BASELINE, DEFAULT_METRIC, METRICS, describe_acceleration, run_comparison
from .curriculum import CurriculumConfig
from .errors import BadConfigError
from .strategies import DEFAULT_FILL, FILLS, STRATEGIES
from .testbed import SETTINGS, TestbedConfig, write_testbed
from .testbed_warm import WarmRecipe, ensure_testbed_model
from .tiny_model import DEFAULT_MODEL_CACHE
from .train_config import TrainConfig

DEMO_STRATEGIES = ("cropi", "learnability", "random")


@dataclass(frozen=True)
class DemoConfig:
    """The testbed comparison's sizes and GRPO settings (its measured run time is in README.md)."""

    out: Path = option(Path("runs/cropi-demo"), "Output directory.")
    model_cache: Path = option(DEFAULT_MODEL_CACHE, "Where the warm-started testbed policy is cached (made on the first run).")
    strategies: tuple[str, ...] = option(DEMO_STRATEGIES, "Compared with the full pool (comma-separated).")
    setting: str = option("targeted", "targeted (validation = the target families) or untargeted (drawn like the pool).",
                          choices=SETTINGS)
    seed: int = option(0, "Seed of the testbed sets and of the runs.")
    pool_size: int = option(400, "Prompts in the pool.")
    val_size: int = option(64, "Validation prompts (the selection's target).")
    eval_size: int = option(512, "Held-out evaluation prompts.")
    stages: int = option(4, "Stages.")
    steps_per_stage: int = option(15, "GRPO steps per stage.")
    fraction: float = option(0.1, "Share of the pool selected per stage.")
    fill: str = option(DEFAULT_FILL, "What fills an influence selection when too few prompts align.", choices=FILLS)
    prompts_per_step: int = option(16, "Prompts per GRPO step.")
    n: int = option(8, "Samples per prompt in GRPO steps.")
    max_tokens: int = option(24, "Response token limit.")
    temperature: float = option(1.0, "Sampling temperature.")
    lr: float = option(5e-4, "Learning rate (the tiny testbed policy; measured: 1e-3 saturates within 10-20 steps).")
    eval_every: int = option(5, "Steps between evaluations.")
    eval_samples: int = option(4, "Samples per evaluation prompt.")
    metric: str = option(DEFAULT_METRIC, "Accuracy behind the acceleration.", choices=METRICS)
    popi_n: int = option(8, "Behaviour trajectories per prompt for POPI.")
    dim: int = option(DEFAULT_DIM, "Sketch length k.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise BadConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        check_choice("metric", self.metric, METRICS)
        check_choice("setting", self.setting, SETTINGS)
        for name in ("pool_size", "val_size", "eval_size"):
            check_int(name, getattr(self, name), 1)


def comparison_base(config: DemoConfig, model: Path, setting: str, seed: int, out: Path) -> CurriculumConfig:
    """The testbed sets of ``setting`` and ``seed`` written under ``out``, and the settings every arm
    shares (the strategy and run directory are set per arm)."""
    files = write_testbed(TestbedConfig(setting=setting, seed=seed, pool_size=config.pool_size,
                                        val_size=config.val_size, eval_size=config.eval_size), out)
    train = TrainConfig(model=model, out=Path(out) / BASELINE / "train", eval_sets={"target": files["eval"]},
                        steps=config.stages * config.steps_per_stage, prompts_per_step=config.prompts_per_step,
                        n=config.n, max_tokens=config.max_tokens, temperature=config.temperature, lr=config.lr,
                        eval_every=config.eval_every, eval_n=None, eval_samples=config.eval_samples, seed=seed,
                        device=config.device)
    return CurriculumConfig(train=train, pool=files["pool"], val_sets={"target": files["val"]}, strategy=BASELINE,
                            stages=config.stages, steps_per_stage=config.steps_per_stage, fraction=config.fraction,
                            fill=config.fill, popi_n=config.popi_n, val_prompts=config.val_size,
                            spec=ProjectionSpec(dim=config.dim))


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Warm start (cached), testbed sets, then the comparison; writes ``out/report.json`` and returns it."""
    start = time.perf_counter()
    out = Path(config.out)
    model = ensure_testbed_model(config.model_cache, WarmRecipe(), log=log)
    warm_seconds = time.perf_counter() - start
    base = comparison_base(config, model, config.setting, config.seed, out)
    result = run_comparison(base, list(config.strategies), out, log=log, metric=config.metric)
    arms = {name: r for name, r in result["results"].items() if name != BASELINE}
    report = {
        "setting": config.setting, "seed": config.seed, "metric": config.metric, "model": str(model),
        "warm_start_seconds": warm_seconds, "seconds": time.perf_counter() - start, "table": result["table"],
        "plots": result["plots"], "acceleration": {name: r["acceleration"] for name, r in arms.items()},
        "acceleration_rollouts": {name: r["acceleration_rollouts"] for name, r in arms.items()},
        "area": {name: r["area"] for name, r in result["results"].items()},
    }
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    target = result["results"][BASELINE]["acceleration"]["target_accuracy"]
    log(f"target: 90% of the full pool's gain in smoothed {config.metric} pass@1 on the held-out {config.setting} set, "
        f"{target:.3f}")
    for name, r in arms.items():
        log(f"{name}: {describe_acceleration(r['acceleration'])}; in rollouts consumed: "
            f"{describe_acceleration(r['acceleration_rollouts'])}; mean accuracy over the run {r['area']:.3f} "
            f"({r['area'] - report['area'][BASELINE]:+.3f} vs the full pool)")
    log("one seed: a single run's figures are noisy, and fast arms tie in steps-to-target at the resolution of the "
        "evaluation grid (the mean accuracy over the run does not); benchmarks/curriculum.py gives medians, paired "
        "differences and intervals over seeds")
    log(f"{(time.perf_counter() - start) / 60:.1f} min; table {out / 'results.md'}; plots {', '.join(result['plots'])}")
    return report

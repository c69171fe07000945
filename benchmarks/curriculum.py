"""CROPI vs the paper's baselines over several seeds: step-level acceleration with its spread.

Each seed runs the embedded demo's comparison (cropi.demo: the same generated pool, validation
and evaluation sets per seed, the same step budget per arm) with more steps than the demo,
and every strategy of the paper's table, plus CROPI with behaviour trajectories re-sampled
every N stages (``--refresh-every``; the reference keeps the initial policy's). Reported per strategy: the acceleration over the
full pool for each seed (steps the full pool needs to first reach its best accuracy divided by
the steps the method needs to reach it; null when never reached), the median and range over
seeds, how many seeds reached the target, and best accuracies.

    python benchmarks/curriculum.py                          # warm-started small policy, 3 seeds
    python benchmarks/curriculum.py --seeds 0 --stages 2 --steps-per-stage 4   # smoke run
    python benchmarks/curriculum.py --model DIR --device cuda  # another policy (e.g. SmolLM2)

Ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from cropi.compare import run_comparison
from cropi.demo import DemoConfig, curriculum_config, write_demo_tasks
from cropi.engine import close_engine
from cropi.tiny_model import ensure_warm_model
from cropi.trainer import start_engine

STRATEGIES = ("cropi", "random", "learnability", "pass-rate", "influence-once")


def summarise(per_seed: list[dict]) -> dict:
    """Acceleration and best accuracy per arm across seeds."""
    summary = {}
    for name in per_seed[0]:
        ratios = [r[name]["acceleration"]["acceleration"] for r in per_seed]
        reached = [x for x in ratios if x is not None]
        best = [r[name]["best_accuracy"] for r in per_seed]
        summary[name] = {
            "acceleration": ratios,
            "acceleration_median": statistics.median(reached) if reached else None,
            "acceleration_range": [min(reached), max(reached)] if reached else None,
            "seeds_reaching_full_best": len(reached),
            "best_accuracy_mean": statistics.fmean(best),
            "best_accuracy": best,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/curriculum-bench"))
    parser.add_argument("--model", type=Path, default=None, help="initial policy (default: the warm-started demo policy)")
    parser.add_argument("--model-cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--steps-per-stage", type=int, default=15)
    parser.add_argument("--fraction", type=float, default=DemoConfig.fraction)
    parser.add_argument("--pool-size", type=int, default=DemoConfig.pool_size)
    parser.add_argument("--val-size", type=int, default=DemoConfig.val_size)
    parser.add_argument("--eval-size", type=int, default=DemoConfig.eval_size)
    parser.add_argument("--prompts-per-step", type=int, default=DemoConfig.prompts_per_step)
    parser.add_argument("--lr", type=float, default=DemoConfig.lr)
    parser.add_argument("--max-tokens", type=int, default=DemoConfig.max_tokens)
    parser.add_argument("--metric", default=DemoConfig.metric)
    parser.add_argument("--n", type=int, default=DemoConfig.n, help="samples per prompt in a GRPO step")
    parser.add_argument("--popi-n", type=int, default=DemoConfig.popi_n, help="behaviour trajectories per prompt")
    parser.add_argument("--eval-every", type=int, default=DemoConfig.eval_every)
    parser.add_argument("--eval-samples", type=int, default=DemoConfig.eval_samples)
    parser.add_argument("--instruction", default=DemoConfig.instruction,
                        help="appended to every prompt (e.g. the answer format, for a chat model such as SmolLM2)")
    parser.add_argument("--refresh-every", type=int, default=2,
                        help="adds the arm cropi-refreshN: behaviour trajectories re-sampled every N stages (0: no arm)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    model = args.model or ensure_warm_model(args.model_cache, size="small", log=print)
    per_seed = []
    engine = None
    try:
        for seed in args.seeds:
            demo = DemoConfig(out=args.out / f"seed{seed}", strategies=tuple(args.strategies), stages=args.stages,
                              steps_per_stage=args.steps_per_stage, fraction=args.fraction, lr=args.lr,
                              max_tokens=args.max_tokens, metric=args.metric, seed=seed, device=args.device,
                              pool_size=args.pool_size, val_size=args.val_size, eval_size=args.eval_size,
                              prompts_per_step=args.prompts_per_step, n=args.n, popi_n=args.popi_n,
                              eval_every=args.eval_every, eval_samples=args.eval_samples, instruction=args.instruction)
            base = curriculum_config(demo, model, write_demo_tasks(demo))
            if engine is None:  # one engine, on all cores, serves every seed and arm
                engine = start_engine(replace(base.train, threads=os.cpu_count()))
            variants = ({f"cropi-refresh{args.refresh_every}": {"strategy": "cropi", "refresh_every": args.refresh_every}}
                        if args.refresh_every else {})
            result = run_comparison(base, list(args.strategies), demo.out, log=print, metric=args.metric,
                                    engine=engine, variants=variants)
            per_seed.append(result["results"])
            print(json.dumps({"seed": seed, **{n: r["acceleration"] for n, r in result["results"].items()}}))
    finally:
        if engine is not None:
            close_engine(engine)
    figures = {"model": str(model), "seeds": args.seeds, "stages": args.stages, "fraction": args.fraction,
               "steps_per_stage": args.steps_per_stage, "metric": args.metric,
               "summary": summarise(per_seed), "seconds": time.perf_counter() - start}
    (args.out / "curriculum.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()

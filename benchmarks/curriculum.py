"""The multi-seed study on the RL testbed: every arm, both settings, with statistics.

Per setting (``targeted``: validation = the target families; ``untargeted``: validation drawn
like the pool, the control) and seed, every arm trains on the same testbed sets, budget and
seed (cropi.demo.comparison_base, the settings of ``make demo``), on one shared engine.
Reported (cropi.study): per arm, the acceleration over the full pool in steps and in rollouts
consumed (median over seeds with a bootstrap 90% interval; "reached" on smoothed curves),
accuracy curves with +-1 SE bands, and a sentence saying what each figure means.

    python benchmarks/curriculum.py                                   # 5 seeds, both settings, all arms
    python benchmarks/curriculum.py --seeds 0 --settings targeted --stages 1 --steps-per-stage 2   # smoke run

Re-running resumes (finished arms are read back). Ends with one JSON line of its figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from cropi.demo import DemoConfig, comparison_base
from cropi.engine import close_engine
from cropi.strategies import FILLS
from cropi.study import run_study
from cropi.testbed import ROLES, SETTINGS, split_by_family
from cropi.testbed_warm import WarmRecipe, ensure_testbed_model
from cropi.trainer import start_engine
from sketchstore.data import read_rows

STRATEGIES = ("random", "learnability", "pass-rate", "influence-once", "cropi")
DEMO_FIELDS = ("stages", "steps_per_stage", "fraction", "fill", "prompts_per_step", "n", "max_tokens", "lr",
               "eval_every", "eval_samples", "popi_n", "pool_size", "val_size", "eval_size", "dim")


def selection_roles(out: Path, settings: list[str], seeds: list[int], arms: list[str]) -> dict:
    """Per setting and arm, the share of each testbed role among the prompts its stages trained on
    (all seeds and stages pooled): which kinds of prompts a selection picks."""
    shares: dict = {}
    for setting in settings:
        for arm in arms:
            counts = dict.fromkeys(ROLES, 0)
            for seed in seeds:
                run = out / setting / f"seed{seed}"
                role = {r["id"]: r["role"] for r in read_rows(run / "pool.jsonl")}
                for stage in sorted((run / arm / "selections").glob("stage*.jsonl")):
                    for r in read_rows(stage, required=("id",)):
                        counts[role[r["id"]]] += 1
            total = sum(counts.values())
            if total:
                shares.setdefault(setting, {})[arm] = {k: round(v / total, 3) for k, v in counts.items()}
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/curriculum-study"))
    parser.add_argument("--model-cache", type=Path, default=DemoConfig.model_cache)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--refresh-every", type=int, default=2,
                        help="adds the arm cropi-refreshN: behaviour trajectories re-sampled every N stages (0: none)")
    parser.add_argument("--fills", nargs="*", default=[], choices=FILLS,
                        help="adds an arm cropi-fill-F per fill policy F (other than the default's)")
    defaults = DemoConfig()
    for name in DEMO_FIELDS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    parser.add_argument("--val-by", choices=("set", "family"), default="set",
                        help="family: one validation set per task family, scored separately and fused by rank "
                             "(--fusion of CROPI: rrf), instead of one set and its averaged gradient")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of the engine and the trainer [default: every core]; "
                             "two studies at 1 thread each share 2 cores better than one at 2")
    args = parser.parse_args()
    start = time.perf_counter()
    demo = replace(defaults, device=args.device, **{name: getattr(args, name) for name in DEMO_FIELDS})
    model = ensure_testbed_model(args.model_cache, WarmRecipe(), log=print)
    variants = {}
    if args.refresh_every:
        variants[f"cropi-refresh{args.refresh_every}"] = {"strategy": "cropi", "refresh_every": args.refresh_every}
    for fill in args.fills:
        if fill != demo.fill:
            variants[f"cropi-fill-{fill}"] = {"strategy": "cropi", "fill": fill}

    def base_for(setting: str, seed: int, out: Path):
        base = comparison_base(demo, model, setting, seed, out)
        if args.val_by == "family":
            base = replace(base, val_sets=split_by_family(base.val_sets["target"], out / "val-by-family"))
        return base

    probe = base_for(args.settings[0], args.seeds[0], args.out / args.settings[0] / f"seed{args.seeds[0]}")
    engine = start_engine(replace(probe.train, threads=args.threads))  # one engine serves every arm
    try:
        result = run_study(args.out, args.settings, args.seeds, args.strategies, base_for, variants=variants,
                           metric=demo.metric, engine=engine)
    finally:
        close_engine(engine)
    print(result.table)
    figures = {"model": str(model), "config": {k: str(v) if isinstance(v, Path) else v
                                                for k, v in dataclasses.asdict(demo).items()},
               "seeds": args.seeds, "settings": args.settings, "summary": result.summary, "plots": result.plots,
               "selection_roles": selection_roles(args.out, args.settings, args.seeds,
                                                  ["full", *args.strategies, *variants]),
               "minutes": (time.perf_counter() - start) / 60}
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()

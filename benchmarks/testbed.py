"""Is the RL testbed a valid instrument? Each of issue 14's validity conditions, measured in one run.

On one setting and seed of the testbed (the sets and GRPO settings of ``make demo``,
cropi.demo.comparison_base), on one shared engine:

1. room for RL: the warm start's pass@1 and pass@k (unbiased, ``--k`` of ``--samples``
   samples per held-out prompt) on the held-out target set;
2. the full pool's gain: held-out sampled pass@1, best smoothed minus start (needs >= 0.15);
3. evaluation noise: per evaluation, the standard error from sampling on the fixed set (what
   differs between two evaluations of one policy: needs <= 0.01) and over prompts;
4. determinism: the full pool trained twice with the same seed (arm ``full-repeat``): how many
   evaluation records are equal bit for bit, and the largest difference in sampled pass@1;
5. sensitivity to what is trained on: the full pool's GRPO on the target families' pool prompts
   only (``oracle``) and on the distractor families only (``off-target``), with their
   acceleration over the full pool: a selection can only show its value when these differ;
6. with ``--thread-check``: the warm start trained at 1 and at 2 torch threads has the same
   weights (so the thread count need not be in its cache key).

    python benchmarks/testbed.py --out runs/testbed-validity                 # seed 0, targeted
    python benchmarks/testbed.py --out runs/testbed-validity --thread-check  # + the warm start at 1 and 2 threads

Re-running resumes the arms. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer

from cropi.compare import BASELINE, describe_acceleration, run_comparison
from cropi.demo import DemoConfig, comparison_base
from cropi.engine import close_engine
from cropi.rollout import Sampling, sample_groups
from cropi.run_dir import read_log
from cropi.stats import smooth
from cropi.testbed import SETTINGS, pass_at_k
from cropi.testbed_warm import RECORD_NAME, WarmRecipe, ensure_testbed_model, train_testbed_model
from cropi.tiny_model import build_tiny_model
from cropi.trainer import start_engine
from sketchstore.data import read_rows, write_rows

GAIN_NEEDED = 0.15
SE_ALLOWED = 0.01
# Pool roles each sensitivity arm trains on.
SUBSET_ARMS = {"oracle": ("target",), "off-target": ("distractor",)}


def warm_pass_at_k(engine, model: Path, rows: list[dict], samples: int, k: int, demo: DemoConfig, seed: int) -> dict:
    """Mean pass@1 and pass@k of the engine's current policy over ``rows`` (``samples`` each)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    sampling = Sampling(n=samples, max_tokens=demo.max_tokens, temperature=demo.temperature, seed=seed,
                        behaviour="warm-check")
    trajectories, _ = sample_groups(engine, tokenizer, rows, sampling)
    correct: dict[str, int] = {}
    for t in trajectories:
        correct[t.prompt_id] = correct.get(t.prompt_id, 0) + (t.reward > 0)
    return {f"pass@{j}": sum(pass_at_k(samples, c, j) for c in correct.values()) / len(correct) for j in (1, k)}


def eval_records(run_dir: Path) -> list[dict]:
    return [{key: r[key] for key in ("step", "rollouts", "greedy", "sampled", "se", "se_sampling")}
            for r in read_log(run_dir) if r.get("type") == "eval"]


def thread_check(recipe: WarmRecipe) -> dict:
    """The warm start trained at 1 and at 2 threads from the same initial model: fingerprints."""
    prints = {}
    with tempfile.TemporaryDirectory() as scratch:
        init = Path(scratch) / "init"
        build_tiny_model(init, size=recipe.size, seed=recipe.seed)
        for threads in (1, 2):
            record = train_testbed_model(init, Path(scratch) / f"t{threads}", recipe, threads=threads)
            prints[threads] = record["fingerprint"]
    return {"fingerprints": prints, "identical": len(set(prints.values())) == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/testbed-validity"))
    parser.add_argument("--model-cache", type=Path, default=DemoConfig.model_cache)
    parser.add_argument("--setting", default="targeted", choices=SETTINGS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out prompt for the warm pass@k")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--stages", type=int, default=DemoConfig.stages)
    parser.add_argument("--steps-per-stage", type=int, default=DemoConfig.steps_per_stage)
    parser.add_argument("--thread-check", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    demo = DemoConfig(stages=args.stages, steps_per_stage=args.steps_per_stage, device=args.device)
    recipe = WarmRecipe()
    model = ensure_testbed_model(args.model_cache, recipe, log=print)
    run_out = args.out / args.setting / f"seed{args.seed}"
    base = comparison_base(demo, model, args.setting, args.seed, run_out)
    pool = read_rows(base.pool)
    variants = {"full-repeat": {"strategy": BASELINE}}
    for arm, roles in SUBSET_ARMS.items():
        subset = write_rows([r for r in pool if r["role"] in roles], run_out / f"pool-{arm}.jsonl")
        variants[arm] = {"strategy": BASELINE, "pool": subset}
    engine = start_engine(replace(base.train, threads=os.cpu_count()))
    try:
        room = warm_pass_at_k(engine, model, read_rows(base.train.eval_sets["target"]), args.samples, args.k, demo,
                              args.seed)
        print(f"warm start on the held-out set: {room}")
        result = run_comparison(base, [], run_out, metric=demo.metric, engine=engine, variants=variants)
    finally:
        close_engine(engine)
    runs = result["results"]
    full_curve = runs[BASELINE]["curve"]
    gain = max(a for _, _, a in smooth(full_curve)) - full_curve[0][2]
    records = {arm: eval_records(run_out / arm / "train") for arm in (BASELINE, "full-repeat")}
    noise = [(r["se_sampling"]["target"], r["se"]["sampled"]["target"]) for r in records[BASELINE]]
    figures = {
        "setting": args.setting, "seed": args.seed, "model": str(model),
        "warm": {"fingerprint": json.loads((model / RECORD_NAME).read_text())["fingerprint"], **room},
        "full_start": full_curve[0][2], "full_best_smoothed": full_curve[0][2] + gain, "full_gain": gain,
        "gain_ok": gain >= GAIN_NEEDED,
        "se_sampling_max": max(s for s, _ in noise), "se_prompts_max": max(p for _, p in noise),
        "se_ok": max(s for s, _ in noise) <= SE_ALLOWED,
        "repeat": {"identical_evaluations": sum(a == b for a, b in zip(*records.values())),
                   "evaluations": len(records[BASELINE]),
                   "max_sampled_difference": max(abs(a["sampled"]["target"] - b["sampled"]["target"])
                                                 for a, b in zip(*records.values()))},
        "sensitivity": {arm: {"best_smoothed": runs[arm]["best_smoothed"],
                              "acceleration_steps": describe_acceleration(runs[arm]["acceleration"]),
                              "pool_prompts": len(read_rows(variants[arm]["pool"]))} for arm in SUBSET_ARMS},
    }
    if args.thread_check:
        figures["warm_threads"] = thread_check(recipe)
    figures["minutes"] = (time.perf_counter() - start) / 60
    print(result["table"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

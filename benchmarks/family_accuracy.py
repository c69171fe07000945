"""Where a selection's accuracy comes from: per task family, the held-out sampled pass@1 of each
arm's start and final policy in a finished study (benchmarks/curriculum.py), next to the share
of each family among the prompts the arm trained on.

The aggregate accuracy of a study hides which families a selection improved and which it
neglected; this re-evaluates the saved checkpoints (stage0 = the shared start, the last stage =
the end) on the seed's own held-out evaluation set, with the run's own sampling settings and
seeds, on one engine whose weights are swapped per checkpoint (cropi.engine.sync_weights).

    python benchmarks/family_accuracy.py --study runs/curriculum-study --setting untargeted

Ends with one JSON line: per arm and family, mean over seeds of start and final accuracy (for
the families the evaluation set holds) and the family's share of the arm's training prompts.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from cropi.engine import close_engine, sync_weights
from cropi.rollout import Sampling, sample_groups
from cropi.train_config import TrainConfig
from cropi.trainer import start_engine
from sketchstore.data import read_rows

DEFAULT_ARMS = ("full", "cropi", "learnability")
START_CHECKPOINT = "stage0"


def final_checkpoint(train_dir: Path) -> Path:
    """The last stage checkpoint of an arm's training directory."""
    stages = sorted((p for p in (train_dir / "checkpoints").glob("stage*") if p.is_dir()),
                    key=lambda p: int(p.name[len("stage"):]))
    if not stages:
        raise SystemExit(f"no stage checkpoints under {train_dir / 'checkpoints'}")
    return stages[-1]


def family_accuracy(engine, checkpoint: Path, rows: list[dict], config: TrainConfig) -> dict[str, float]:
    """Sampled pass@1 per family of ``rows`` for the policy saved at ``checkpoint``."""
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint))
    sync_weights(engine, model)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sampling = Sampling(n=config.eval_samples, max_tokens=config.eval_max_tokens or config.max_tokens,
                        temperature=config.temperature, seed=config.seed, reward=config.reward, behaviour="family-eval")
    trajectories, _ = sample_groups(engine, tokenizer, rows, sampling)
    family = {r["id"]: r["family"] for r in rows}
    right, total = defaultdict(float), defaultdict(int)
    for t in trajectories:
        right[family[t.prompt_id]] += t.reward > 0
        total[family[t.prompt_id]] += 1
    return {f: right[f] / total[f] for f in sorted(total)}


def trained_shares(arm_dir: Path, pool: list[dict]) -> dict[str, float]:
    """Share of each family among the prompts the arm's stages trained on (all pool for none saved)."""
    family = {r["id"]: r["family"] for r in pool}
    counts: dict[str, int] = defaultdict(int)
    stages = sorted((arm_dir / "selections").glob("stage*.jsonl"))
    ids = [r["id"] for s in stages for r in read_rows(s, required=("id",))] if stages else list(family)
    for i in ids:
        counts[family[i]] += 1
    return {f: counts[f] / len(ids) for f in sorted(set(family.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("runs/curriculum-study"))
    parser.add_argument("--setting", default="untargeted")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # arm -> family -> key -> values
    engine = None
    try:
        for seed in args.seeds:
            run = args.study / args.setting / f"seed{seed}"
            rows, pool = read_rows(run / "eval.jsonl"), read_rows(run / "pool.jsonl")
            for arm in args.arms:
                train_dir = run / arm / "train"
                config = TrainConfig(**{**json.loads((train_dir / "config.json").read_text()), "resume": False})
                if engine is None:
                    engine = start_engine(replace(config, threads=args.threads))
                points = {"start": train_dir / "checkpoints" / START_CHECKPOINT, "final": final_checkpoint(train_dir)}
                for key, checkpoint in points.items():
                    for fam, acc in family_accuracy(engine, checkpoint, rows, config).items():
                        per[arm][fam][key].append(acc)
                for fam, share in trained_shares(run / arm, pool).items():
                    per[arm][fam]["trained_share"].append(share)
                print(f"seed {seed} {arm}: " + ", ".join(f"{f} {sum(v['final']) / len(v['final']):.3f}"
                                                         for f, v in per[arm].items() if v.get("final")), flush=True)
    finally:
        if engine is not None:
            close_engine(engine)
    summary = {arm: {fam: {k: round(sum(v) / len(v), 4) for k, v in keys.items() if v} for fam, keys in fams.items()}
               for arm, fams in per.items()}
    print("| arm | family | trained share | start | final | gain |\n|---|---|---:|---:|---:|---:|")
    for arm, fams in summary.items():
        for fam, s in fams.items():
            evaluated = "final" in s  # a family the evaluation set does not hold has a trained share only
            print(f"| {arm} | {fam} | {s['trained_share']:.3f} | " + (
                f"{s['start']:.3f} | {s['final']:.3f} | {s['final'] - s['start']:+.3f} |" if evaluated else "- | - | - |"))
    print(json.dumps({"study": str(args.study), "setting": args.setting, "seeds": args.seeds, "families": summary}))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()

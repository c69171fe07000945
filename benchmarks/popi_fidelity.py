"""How faithful are POPI influence scores, and what does coordinate dropping do to them?

Part 1 (off-policy drift). beta = the warm-started embedded policy. Pool and validation
prompts get K trajectories from beta (real vLLM engine). theta_d = beta after d GRPO steps
on the pool (one run, the drift a curriculum's stage checkpoints see). For each d, pool prompts are scored (cosine of the prompt's sketch
with the mean normalised validation sketch) by
  (a) POPI: gradients at theta_d from beta's old trajectories (importance-weighted), and
  (b) on-policy: gradients at theta_d from fresh theta_d trajectories (the exact online
      influence, up to sampling noise),
  (c) on-policy again with another sampling seed: the noise ceiling for (a) vs (b).
Reported: Spearman and top-10% overlap of (a) vs (b) and (c) vs (b), random overlap (10%),
and the drift: mean per-token KL(beta || theta_d) on beta's trajectories.

Part 2 (keep-ratio and dtype ablation, at theta = beta). Exact unprojected POPI gradients
give the exact influence ranking; sketches at keep ratios 1, 0.3, 0.1, 0.01, 0.001 and two
sketch sizes k are compared by precision of the top-10% selection and Spearman, with
projection time per prompt; and with the gradient cast to fp32/bf16/fp16 before projecting
(the reference casts whole gradients to fp16).

    python benchmarks/popi_fidelity.py            # full run (< 30 min on 2 CPU cores)
    python benchmarks/popi_fidelity.py --quick    # smoke run

Ends with one JSON line of its figures; writes a plot next to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from cropi.demo import DemoConfig
from cropi.engine import make_engine, sync_weights
from cropi.rollout import RolloutConfig, run_rollouts
from cropi.tasks import generate_tasks
from cropi.tiny_model import ensure_warm_model, load_policy
from cropi.train_config import TrainConfig
from cropi.trainer import GRPOTrainer
from sketchstore import (BuildConfig, ProjectionSpec, ScoreOptions, SketchStore, SplitRef, build_sketches,
                         load_scores, score)
from sketchstore.data import write_rows
from sketchstore.gradients import per_example_gradients, select_parameters
from cropi.popi import POPIObjective, POPIOptions, read_prompt_groups, response_logprobs
from sketchstore.projection import make_projector

KEEP_RATIOS = (1.0, 0.3, 0.1, 0.01, 0.001)
INPUT_DTYPES = ("float32", "bfloat16", "float16")
TOP_FRACTION = 0.1


def spearman(a: list[float], b: list[float]) -> float:
    def rank(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        ranks = torch.empty_like(t)
        ranks[order] = torch.arange(len(x), dtype=torch.float64)
        for value in set(x):  # average ranks of ties (zero-gradient prompts tie at 0)
            idx = (t == value).nonzero().flatten()
            if len(idx) > 1:
                ranks[idx] = ranks[idx].mean()
        return ranks

    return float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])


def top_set(scores: dict[str, float], fraction: float = TOP_FRACTION) -> set[str]:
    n = max(1, round(fraction * len(scores)))
    return set(sorted(scores, key=lambda i: (-scores[i], i))[:n])


def overlap(a: dict[str, float], b: dict[str, float]) -> float:
    return len(top_set(a) & top_set(b)) / len(top_set(b))


def drift_models(beta_dir: Path, pool: Path, out_dir: Path, steps: list[int], lr: float, llm) -> dict[int, Path]:
    """theta_d = beta after d GRPO steps on the pool (the drift CROPI's stage checkpoints see),
    one run with a checkpoint at every d; the engine is left holding the last theta."""
    thetas = {0: beta_dir} if 0 in steps else {}
    later = sorted(d for d in steps if d > 0)
    if not later:
        return thetas
    config = TrainConfig(model=beta_dir, out=out_dir, train=pool, steps=later[-1], lr=lr, eval_sets=None,
                         eval_at_start=False, eval_every=0, plots=False, seed=0)
    trainer = GRPOTrainer(config, log=lambda _: None, engine=llm)
    for d in later:
        trainer.run(d - trainer.step)
        thetas[d] = trainer.save_checkpoint(f"grpo-{d}")
    return thetas


def mean_kl(beta_traj: Path, theta_dir: Path) -> float:
    """Mean per-token KL(beta || theta) estimated on beta's samples: E[log beta - log theta]."""
    model, _ = load_policy(theta_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in read_prompt_groups(beta_traj):
            group = row["group"]
            responses = [r for r in group.responses if r]
            logps = response_logprobs(model, group.prompt_token_ids, responses, group.temperature)
            for logp, behaviour in zip(logps, [b for r, b in zip(group.responses, group.behaviour_logprobs) if r]):
                total += float((torch.tensor(behaviour) - logp).sum())
                count += len(behaviour)
    return total / max(count, 1)


def popi_scores(model_dir: Path, pool_traj: Path, val_traj: Path, store: Path, checkpoint: str,
                dim: int) -> dict[str, float] | None:
    """Cosine influence of each pool prompt at ``model_dir``; None when every validation prompt
    has zero advantage (all rewards equal), where cosine scores are undefined."""
    spec = ProjectionSpec(dim=dim, seed=0)
    for traj, split in ((pool_traj, "pool"), (val_traj, "val")):
        build_sketches(BuildConfig(model=model_dir, data=None, store=store, checkpoint=checkpoint, split=split,
                                   spec=spec, objective=POPIOptions(trajectories=traj)), progress=False)
    s = SketchStore.open(store, writable=True)
    train, vals = SplitRef(checkpoint, "pool"), [SplitRef(checkpoint, "val")]
    if not any(n > 0 for n in s.manifest(checkpoint, "val").column("grad_norm").to_pylist()):
        return None
    score(s, train, vals, ScoreOptions(), progress=False)
    return load_scores(s, train, vals)[vals[0]]


def compare_scores(a: dict[str, float] | None, b: dict[str, float] | None) -> tuple[float, float]:
    """(Spearman, top-10% overlap of ``a`` with ``b``); NaN when either is undefined."""
    if a is None or b is None:
        return math.nan, math.nan
    ids = sorted(b)
    return spearman([a[i] for i in ids], [b[i] for i in ids]), overlap(a, b)


def drift_experiment(args, work: Path, beta: Path, pool_path: Path, val_path: Path, llm) -> list[dict]:
    def rollouts(model_dir: Path, data: Path, name: str, seed: int) -> Path:
        out = work / "traj" / f"{name}-{data.stem}-s{seed}"
        run_rollouts(RolloutConfig(model=model_dir, data=data, out=out, n=args.k, max_tokens=args.max_tokens,
                                   temperature=args.temperature, seed=seed, behaviour=name), progress=False, llm=llm)
        return out

    beta_pool, beta_val = rollouts(beta, pool_path, "beta", 1), rollouts(beta, val_path, "beta", 1)
    thetas = drift_models(beta, pool_path, work / "drift", args.drift_steps, args.drift_lr, llm)
    results = []
    for d in args.drift_steps:
        t0 = time.perf_counter()
        theta = thetas[d]
        sync_weights(llm, load_policy(theta)[0])
        name = f"theta{d}"
        store = work / f"store-{name}"
        off = popi_scores(theta, beta_pool, beta_val, store, f"{name}-offpolicy", args.dim)
        on = popi_scores(theta, rollouts(theta, pool_path, name, 2), rollouts(theta, val_path, name, 2),
                         store, f"{name}-onpolicy", args.dim)
        again = popi_scores(theta, rollouts(theta, pool_path, name, 3), rollouts(theta, val_path, name, 3),
                            store, f"{name}-onpolicy2", args.dim)
        rho, top = compare_scores(off, on)
        rho_again, top_again = compare_scores(again, on)
        row = {"drift_steps": d, "kl_beta_theta": mean_kl(beta_pool, theta),
               "spearman_popi_vs_onpolicy": rho, "top10_overlap_popi_vs_onpolicy": top,
               "spearman_onpolicy_reseed": rho_again, "top10_overlap_onpolicy_reseed": top_again,
               "top10_overlap_random": TOP_FRACTION, "seconds": time.perf_counter() - t0}
        results.append(row)
        print(json.dumps(row))
    sync_weights(llm, load_policy(beta)[0])
    return results


def flat_exact(named: list[dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([g[n].flatten() for n in names]) for g in named])


def influence(train: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    t = train / train.norm(dim=1, keepdim=True).clamp_min(1e-30)
    v = val / val.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return t @ v.mean(0)


def keep_ratio_experiment(args, beta: Path, pool_traj: Path, val_traj: Path) -> list[dict]:
    model, _ = load_policy(beta)
    params = select_parameters(model)
    names = [n for n, _ in params]
    objective = POPIObjective()
    grads = {}
    for split, traj in (("pool", pool_traj), ("val", val_traj)):
        rows = read_prompt_groups(traj)
        grads[split] = ([r["id"] for r in rows],
                        [{n: g[0].clone() for n, g in item.grads.items()} for item in per_example_gradients(model, objective, rows, params)])
    pool_ids, pool_grads = grads["pool"]
    _, val_grads = grads["val"]
    nonzero = [i for i, g in enumerate(pool_grads) if any(t.abs().sum() > 0 for t in g.values())]
    exact = influence(flat_exact(pool_grads, names), flat_exact(val_grads, names))
    exact_scores = {pool_ids[i]: float(exact[i]) for i in nonzero}
    results = []
    for dim in args.ablation_dims:
        for keep in KEEP_RATIOS:
            for dtype in INPUT_DTYPES if keep in (1.0, 0.1) else ("float32",):
                projector = make_projector(ProjectionSpec(dim=dim, seed=0, keep_ratio=keep))
                cast = getattr(torch, dtype)

                def sketch(items):
                    out = []
                    for g in items:
                        out.append(projector.project({n: g[n].to(cast)[None] for n in names})[0])
                    return torch.stack(out)

                t0 = time.perf_counter()
                pool_sk = sketch(pool_grads)
                per_prompt = (time.perf_counter() - t0) / len(pool_grads)
                scores = influence(pool_sk, sketch(val_grads))
                sketched = {pool_ids[i]: float(scores[i]) for i in nonzero}
                ids = sorted(exact_scores)
                row = {"dim": dim, "keep_ratio": keep, "input_dtype": dtype,
                       "precision_top10": overlap(sketched, exact_scores),
                       "spearman": spearman([sketched[i] for i in ids], [exact_scores[i] for i in ids]),
                       "projection_ms_per_prompt": per_prompt * 1000}
                results.append(row)
                print(json.dumps(row))
    return results


def plot(path: Path, drift: list[dict], ablation: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kl = [r["kl_beta_theta"] for r in drift]
    a.plot(kl, [r["spearman_popi_vs_onpolicy"] for r in drift], "o-", label="Spearman POPI vs on-policy")
    a.plot(kl, [r["top10_overlap_popi_vs_onpolicy"] for r in drift], "s-", label="top-10% overlap POPI vs on-policy")
    a.plot(kl, [r["top10_overlap_onpolicy_reseed"] for r in drift], "^--", label="top-10% overlap on-policy reseeded")
    a.axhline(TOP_FRACTION, color="grey", linestyle=":", label="random selection overlap")
    a.set_xlabel("mean per-token KL(beta || theta)")
    a.set_title("Off-policy influence as the policy drifts")
    a.legend(fontsize=7)
    for dim in sorted({r["dim"] for r in ablation}):
        rows = [r for r in ablation if r["dim"] == dim and r["input_dtype"] == "float32"]
        b.semilogx([r["keep_ratio"] for r in rows], [r["precision_top10"] for r in rows], "o-", label=f"k={dim}")
    b.set_xlabel("keep ratio (fraction of gradient coordinates projected)")
    b.set_ylabel("precision of top-10% vs exact gradients")
    b.set_title("Coordinate dropping before projection")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/popi-fidelity"))
    parser.add_argument("--model-cache", type=Path, default=Path(".cache/models"))
    parser.add_argument("--model", type=Path, default=None, help="behaviour policy (default: the warm-started demo policy)")
    parser.add_argument("--pool", type=int, default=160)
    parser.add_argument("--val", type=int, default=32)
    parser.add_argument("--k", type=int, default=16, help="trajectories per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--drift-steps", type=int, nargs="+", default=[0, 15, 45, 120], help="GRPO steps from beta")
    parser.add_argument("--drift-lr", type=float, default=DemoConfig.lr, help="GRPO learning rate of the drift run (the demo's)")
    parser.add_argument("--ablation-dims", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args = argparse.Namespace(**{**vars(args), "pool": 20, "val": 6, "k": 4, "max_tokens": 24,
                                     "drift_steps": [0, 5], "ablation_dims": [256, 1024]})
    start = time.perf_counter()
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    beta = args.model or ensure_warm_model(args.model_cache, size="small", log=print)
    pool_path = write_rows(generate_tasks(args.pool, seed=501, difficulty=range(1, 5)), work / "pool.jsonl")
    val_path = write_rows(generate_tasks(args.val, seed=502, difficulty=range(1, 5)), work / "val.jsonl")
    llm = make_engine(beta, seed=0, cpu_threads=os.cpu_count())
    drift = drift_experiment(args, work, beta, pool_path, val_path, llm)
    ablation = keep_ratio_experiment(args, beta, work / "traj" / "beta-pool-s1", work / "traj" / "beta-val-s1")
    plot(args.out / "popi_fidelity.png", drift, ablation)
    best = max((r for r in ablation if r["input_dtype"] == "float32"), key=lambda r: r["precision_top10"])
    figures = {
        "pool": args.pool, "val": args.val, "k": args.k, "dim": args.dim,
        "drift": drift, "ablation": ablation,
        "best_keep_ratio": best["keep_ratio"], "best_keep_dim": best["dim"],
        "precision_top10_keep1": {r["dim"]: r["precision_top10"] for r in ablation
                                  if r["keep_ratio"] == 1.0 and r["input_dtype"] == "float32"},
        "precision_top10_keep0.1": {r["dim"]: r["precision_top10"] for r in ablation
                                    if r["keep_ratio"] == 0.1 and r["input_dtype"] == "float32"},
        "seconds": time.perf_counter() - start,
    }
    (args.out / "popi_fidelity.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    random.seed(0)
    main()

"""Build throughput and fidelity: per-prompt sketches (the paper's recipe and our sparse
variants) vs factored sketches (many prompts per backward), on the embedded "small" Qwen2
(~3.5M params).

Rows are POPI prompts: K trajectories per prompt sampled from the model itself at temperature
0.7 (top_p = 1, behaviour log-probs from the sampling distribution, random 0/1 rewards, GRPO
advantages), as in tests/test_popi.py but with real generated task prompts in the chat
template. Each method runs ``build_sketches`` in its own subprocess (peak RSS = that process's
VmHWM, and ru_maxrss as reported by getrusage) on the same prompts, same k (--dim):

  faithful        the paper's recipe (CROPI, arXiv 2510.26491): one backward per prompt, keep
                  ratio 0.1 (random drop), dense Gaussian projection. The paper uses k = 32768;
                  here every method uses the same k. Runs on the first --faithful-prompts train
                  prompts (default 64 = one projection batch; 0 = all): it is the slow one.
  sparse_drop     the same with our sparse CountSketch in place of the Gaussian (CROPI's recipe
                  with our projection)
  sparse          one backward per prompt, keep ratio 1, sparse CountSketch (our default)
  factored        --batch-size prompts per forward/backward, factored projection
                  (sketchstore/factored.py), grad_norm = sketch norm (``--norms sketch``)
  factored_exact  the same with exact per-row gradient norms (``--norms exact``, the default):
                  same sketches, shows what exact norms cost

The headline ratio is factored_over_faithful (vs the paper's recipe); factored_over_sparse_drop
and factored_over_sparse compare with our own per-prompt paths, whose projection is cheap, so
that no one reads the headline as "factored vs the fastest per-prompt path".

Fidelity vs exact unprojected gradients (one more subprocess computes them): influence score of
a train prompt = mean over validation prompts of cos(g, v) (sketchstore.score's default);
Spearman of the scores and precision of the top-10% selection against the exact ones, for
every method on the same prompts (those every method scored, i.e. faithful's, with a
non-negligible exact gradient); keys ending in _all: each method over all the prompts it scored. Throughput counts train prompts only: wall time of ``build_sketches`` (model load
included) for the train split, after the validation split was built in the same process.

    python benchmarks/build_throughput.py                 # default run, k = 8192 (~5 min on 2 idle CPU cores)
    python benchmarks/build_throughput.py --dim 32768     # the paper's k (~9 min)
    python benchmarks/build_throughput.py --quick         # smoke run

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: method -> (ProjectionSpec fields, BuildConfig.norms); see the module docstring.
METHODS = {
    "faithful": (dict(mode="dense", keep_ratio=0.1), "exact"),
    "sparse_drop": (dict(mode="sparse", keep_ratio=0.1), "exact"),
    "sparse": (dict(mode="sparse", keep_ratio=1.0), "exact"),
    "factored": (dict(mode="factored", keep_ratio=1.0), "sketch"),
    "factored_exact": (dict(mode="factored", keep_ratio=1.0), "exact"),
}
TOP_FRACTION = 0.1
PAIR_ROWS = 64  # train prompts whose pairwise cosines are compared with the exact ones


# ------------------------------------------------------------------------------------ children
def peak_rss() -> dict:
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return {"peak_rss_mb": hwm / 1024, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def find_model(cache: Path, work: Path) -> tuple[Path, str]:
    """A warm-started small model under ``cache`` if one exists, else a fresh random init."""
    from cropi.tiny_model import build_tiny_model

    warm = sorted(p for p in cache.glob("warm-small-*") if (p / "warm_start.json").is_file()) if cache.is_dir() else []
    if warm:
        return warm[0], "warm"
    return build_tiny_model(work / "small-init", size="small", seed=0), "random-init"


def child_prepare(args) -> dict:
    """Sample K trajectories per prompt from the model (batched generate with a KV cache)."""
    import pyarrow.parquet as pq
    import torch

    from cropi.tasks import generate_tasks
    from cropi.tiny_model import load_policy
    from cropi.trajectory import Trajectory, to_table
    from sketchstore.prompts import prompt_text
    from sketchstore.seeds import stable_seed

    model, tok = load_policy(args.model)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    stop = [tok.eos_token_id, tok.bos_token_id]
    out = {}
    for split, n, seed in (("train", args.prompts, 11), ("val", args.val_prompts, 12)):
        tasks = generate_tasks(n, seed=seed)
        rows = []
        for lo in range(0, n, 32):
            chunk = tasks[lo:lo + 32]
            if args.prompt_len:  # random token prompts, as tests/test_popi.py
                enc = [torch.randint(4, model.config.vocab_size, (args.prompt_len,), generator=gen).tolist()
                       for _ in chunk]
            else:  # the generated task prompt in the chat template
                enc = [tok(prompt_text(tok, t["prompt"]), add_special_tokens=False)["input_ids"] for t in chunk]
            width = max(len(e) for e in enc)
            ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):
                ids[i, width - len(e):] = torch.tensor(e)
                mask[i, width - len(e):] = 1
            with torch.no_grad():
                res = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                     top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                                     num_return_sequences=args.k, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=tok.pad_token_id, eos_token_id=stop)
            scores = torch.stack(res.scores, 1)  # (n*K, steps, V): logits / T
            new = res.sequences[:, width:]
            logps = torch.log_softmax(scores.float(), -1).gather(2, new[:, :, None]).squeeze(2)
            for i, task in enumerate(chunk):
                samples = []
                for s_ in range(args.k):
                    j = i * args.k + s_
                    length = int(torch.randint(args.min_new_tokens, args.max_new_tokens + 1, (1,), generator=gen))
                    length = min(length, new.shape[1])  # generation stops when every sample has ended
                    ended = [t for t in range(length) if int(new[j, t]) in stop]
                    length = ended[0] + 1 if ended else length  # a sample ends at its first stop token
                    samples.append((new[j, :length].tolist(), logps[j, :length].tolist()))
                # a 0/1 reward that is a function of the response (a stand-in verifier): identical
                # responses get identical rewards, and a prompt whose rewards agree has A = 0
                rewards = [float(stable_seed("reward", *tokens) % 2) for tokens, _ in samples]
                mean = sum(rewards) / args.k
                std = (sum((r - mean) ** 2 for r in rewards) / args.k) ** 0.5
                for s_, (tokens, lps) in enumerate(samples):
                    rows.append(Trajectory(prompt_id=task["id"], behaviour="beta", sample=s_, prompt=task["prompt"],
                                           answer=str(task["answer"]), prompt_token_ids=enc[i], response_token_ids=tokens,
                                           behaviour_logprobs=lps, response="", finish_reason="stop",
                                           temperature=args.temperature, top_p=1.0, reward=rewards[s_],
                                           reward_parsed=True, advantage=(rewards[s_] - mean) / (std + 1e-4),
                                           group_mean=mean, group_std=std, pass_rate=mean, zero_std=std == 0))
        pq.write_table(to_table(rows), Path(args.work) / f"{split}.parquet")
        lengths = [len(r.prompt_token_ids) + len(r.response_token_ids) for r in rows]
        out[split] = {"prompts": n, "sequences": len(rows), "mean_seq_tokens": sum(lengths) / len(lengths),
                      "zero_advantage_prompts": sum(r.zero_std for r in rows) // args.k}
    return out


def child_exact(args) -> dict:
    """Exact influence scores from unprojected per-prompt gradients (and their norms)."""
    import torch

    from sketchstore.gradients import load_model, per_example_gradients, select_parameters
    from cropi.popi import POPIObjective, read_prompt_groups

    model, _ = load_model(args.model)
    params = select_parameters(model)
    target = None
    for item in per_example_gradients(model, POPIObjective(), read_prompt_groups(Path(args.work) / "val.parquet"),
                                      params):
        flat = torch.cat([g.flatten() for g in item.grads.values()]).double()
        flat = flat / flat.norm() if item.grad_norm > 0 else flat * 0
        target = flat if target is None else target + flat
    rows = read_prompt_groups(Path(args.work) / "train.parquet")
    target /= len(read_prompt_groups(Path(args.work) / "val.parquet"))
    scores, norms, kept = {}, {}, []
    start = time.perf_counter()
    for item in per_example_gradients(model, POPIObjective(), rows, params):
        flat = torch.cat([g.flatten() for g in item.grads.values()]).double()
        scores[item.row["id"]] = float(flat @ target / flat.norm()) if item.grad_norm > 0 else 0.0
        norms[item.row["id"]] = item.grad_norm
        if len(kept) < 2 * PAIR_ROWS and item.grad_norm > 0:
            kept.append((item.row["id"], item.grad_norm, (flat / flat.norm()).float()))
    seconds = time.perf_counter() - start
    floor = tiny_norm(list(norms.values()))
    kept = [(i, v) for i, n, v in kept if n > floor][:PAIR_ROWS]
    unit = torch.stack([v for _, v in kept])
    return {"scores": scores, "grad_norms": norms, "seconds": seconds, "pair_ids": [i for i, _ in kept],
            "pair_cosines": pair_cosines(unit), **peak_rss()}


def tiny_norm(norms: list[float]) -> float:
    """Gradients below this norm cancelled to rounding noise (e.g. K identical responses with
    opposite advantages): their direction is noise in every method, so fidelity skips them."""
    positive = sorted(n for n in norms if n > 0)
    return 1e-4 * positive[len(positive) // 2] if positive else 0.0


def pair_cosines(unit) -> list[float]:
    """Cosines of all pairs (i < j) of unit rows."""
    import torch

    iu = torch.triu_indices(len(unit), len(unit), 1)
    return (unit.double() @ unit.double().T)[iu[0], iu[1]].tolist()


def child_build(args) -> dict:

    from cropi.popi import POPIOptions
    from sketchstore import (BuildConfig, ProjectionSpec, ScoreOptions, SketchStore, SplitRef, build_sketches,
                             load_scores, score)

    fields, norms = METHODS[args.method]
    store = Path(args.work) / f"store-{args.method}"
    spec = ProjectionSpec(dim=args.dim, seed=0, **fields)
    common = dict(model=Path(args.model), data=None, store=store, checkpoint="theta", spec=spec,
                  batch_size=args.batch_size, flush_rows=max(256, args.batch_size), norms=norms)
    val = build_sketches(BuildConfig(split="val", objective=POPIOptions(trajectories=Path(args.work) / "val.parquet"),
                                     **common), progress=False)
    trajectories = Path(args.work) / "train.parquet"
    if args.limit:
        import pyarrow.parquet as pq

        table = pq.read_table(trajectories)
        keep = sorted(set(table.column("prompt_id").to_pylist()), key=table.column("prompt_id").to_pylist().index)
        keep = set(keep[:args.limit])
        trajectories = Path(args.work) / f"train-{args.limit}.parquet"
        pq.write_table(table.filter([p in keep for p in table.column("prompt_id").to_pylist()]), trajectories)
    start = time.perf_counter()
    report = build_sketches(BuildConfig(split="train", objective=POPIOptions(trajectories=trajectories), **common),
                            progress=False)
    seconds = time.perf_counter() - start
    opened = SketchStore.open(store, writable=True)
    score(opened, SplitRef("theta", "train"), [SplitRef("theta", "val")], ScoreOptions(), progress=False)
    scores = load_scores(opened, SplitRef("theta", "train"), [SplitRef("theta", "val")])[SplitRef("theta", "val")]
    manifest = opened.manifest(checkpoint="theta", split="train").to_pylist()
    pairs = json.loads(Path(args.pairs).read_text()) if args.pairs else []
    pairs = [i for i in pairs if i in scores]
    cosines = []
    if len(pairs) > 1:
        _, rows = opened.read("theta", "train", ids=pairs)
        cosines = pair_cosines(rows.float() / rows.float().norm(dim=1, keepdim=True))
    return {"pair_ids": pairs, "pair_cosines": cosines, "prompts": report.added, "seconds": seconds, "prompts_per_s": report.added / seconds,
            "val_seconds": val.seconds, "scores": scores, "grad_norms": {r["id"]: r["grad_norm"] for r in manifest},
            **peak_rss()}


# ------------------------------------------------------------------------------------ parent
def run_child(args, task: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--work", str(args.work), "--model", str(args.model),
           "--prompts", str(args.prompts), "--val-prompts", str(args.val_prompts), "--k", str(args.k),
           "--dim", str(args.dim), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--min-new-tokens", str(args.min_new_tokens), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", str(args.temperature), "--prompt-len", str(args.prompt_len), "--threads", str(args.threads)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode >= 0 or attempt:
            break
        # killed by a signal (the machine is shared): start that run again from scratch
        print(f"child {task} {extra} killed by signal {-proc.returncode}; running it again", flush=True)
        if "method" in extra:
            shutil.rmtree(Path(args.work) / f"store-{extra['method']}", ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {task} {extra} failed (exit status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    def rank(x):
        x = np.asarray(x, dtype=np.float64)
        order = x.argsort(kind="stable")
        ranks = np.empty(len(x))
        ranks[order] = np.arange(len(x))
        return ranks

    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def fidelity(exact: dict, got: dict, ids: list[str]) -> dict:
    """Fidelity of one method's scores and grad norms against the exact ones, over ``ids``."""
    e, g = [exact["scores"][i] for i in ids], [got["scores"][i] for i in ids]
    n_top = max(1, round(TOP_FRACTION * len(ids)))
    top = lambda s: set(sorted(ids, key=lambda i: -s[i])[:n_top])
    precision = len(top(exact["scores"]) & top(got["scores"])) / n_top
    norm_err = [abs(got["grad_norms"][i] - exact["grad_norms"][i]) / exact["grad_norms"][i] for i in ids]
    out = {}
    if got.get("pair_cosines") and got["pair_ids"] == exact["pair_ids"]:
        errors = [abs(a - b) for a, b in zip(got["pair_cosines"], exact["pair_cosines"])]
        out = {"mean_abs_cos_error": sum(errors) / len(errors), "max_abs_cos_error": max(errors)}
    return {**out, "spearman": spearman(e, g), "precision_top10": precision, "n_scored": len(ids),
            "max_abs_score_error": max(abs(x - y) for x, y in zip(e, g)), "max_rel_grad_norm_error": max(norm_err),
            "mean_rel_grad_norm_error": sum(norm_err) / len(norm_err)}


def run_regime(args, label: str, methods: list[str]) -> dict:
    """Sample trajectories, exact scores, then every method; one subprocess each."""
    prep = run_child(args, "prepare")
    print(f"[{label}] model {args.model}; train {prep['train']}; val {prep['val']}", flush=True)
    exact = run_child(args, "exact")
    (args.work / "pairs.json").write_text(json.dumps(exact["pair_ids"]))
    print(f"[{label}] exact gradients: {exact['seconds']:.1f}s, peak RSS {exact['peak_rss_mb']:.0f} MB; exact score "
          f"std {_std(list(exact['scores'].values())):.4f}, mean |pair cosine| "
          f"{sum(abs(c) for c in exact['pair_cosines']) / len(exact['pair_cosines']):.4f}", flush=True)
    results = {"_prep": prep}
    for name in methods:
        extra = {"method": name, "pairs": args.work / "pairs.json"}
        if name == "faithful" and 0 < args.faithful_prompts < args.prompts:
            extra["limit"] = args.faithful_prompts
        results[name] = res = run_child(args, "build", **extra)
        print(f"[{label}] {name:14s} {res['prompts']:4d} prompts {res['seconds']:7.1f}s {res['prompts_per_s']:8.2f} "
              f"prompts/s  peak RSS {res['peak_rss_mb']:.0f} MB (ru_maxrss {res['ru_maxrss_mb']:.0f})", flush=True)
    floor = tiny_norm(list(exact["grad_norms"].values()))
    common = set.intersection(*(set(results[name]["scores"]) for name in methods))
    ids = [i for i in exact["scores"] if i in common and exact["grad_norms"][i] > floor]
    for name in methods:
        res = results[name]
        own = [i for i in exact["scores"] if i in res["scores"] and exact["grad_norms"][i] > floor]
        if len(own) > len(ids):  # also over every prompt this method scored
            res.update({f"{key}_all": value for key, value in fidelity(exact, res, own).items()
                        if key in ("spearman", "precision_top10", "n_scored")})
        res.update(fidelity(exact, res, ids))
        print(f"[{label}] {name:14s} spearman {res['spearman']:.3f}  precision@10% {res['precision_top10']:.3f}  "
              f"mean|cos err| {res.get('mean_abs_cos_error', float('nan')):.4f}  grad norm rel err mean "
              f"{res['mean_rel_grad_norm_error']:.2e} max {res['max_rel_grad_norm_error']:.2e} ({len(ids)} prompts)",
              flush=True)
    return results


def _std(x: list[float]) -> float:
    mean = sum(x) / len(x)
    return (sum((v - mean) ** 2 for v in x) / len(x)) ** 0.5


def summarise(results: dict, prefix: str = "") -> dict:
    out = {f"{prefix}mean_seq_tokens": round(results["_prep"]["train"]["mean_seq_tokens"], 1),
           f"{prefix}zero_advantage_prompts": results["_prep"]["train"]["zero_advantage_prompts"],
           f"{prefix}n_scored": results["factored"]["n_scored"],
           **{f"{prefix}factored_over_{name}": results["factored"]["prompts_per_s"] / results[name]["prompts_per_s"]
              for name in METHODS if name != "factored"}}
    for name, res in results.items():
        if name.startswith("_"):
            continue
        for key in ("prompts_per_s", "spearman", "precision_top10", "mean_abs_cos_error", "max_abs_score_error",
                    "peak_rss_mb", "ru_maxrss_mb", "spearman_all", "precision_top10_all", "n_scored_all"):
            if key in res:
                out[f"{prefix}{key}_{name}"] = round(res[key], 4)
        out[f"{prefix}prompts_{name}"] = res["prompts"]
    for name in ("factored", "factored_exact"):
        for key in ("mean_rel_grad_norm_error", "max_rel_grad_norm_error"):
            out[f"{prefix}{key}_{name}"] = results[name][key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256, help="train prompts")
    parser.add_argument("--val-prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="trajectories per prompt")
    parser.add_argument("--prompt-len", type=int, default=0,
                        help="0: generated task prompts in the chat template; N: random-token prompts of N tokens "
                             "(tests/test_popi.py; their gradients are nearly orthogonal, so rankings are noise)")
    parser.add_argument("--min-new-tokens", type=int, default=3, help="response lengths uniform in [min, max]")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--long-prompts", type=int, default=96,
                        help="second regime: this many prompts with 16-48 token responses (0: skip)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (the machine is shared)")
    parser.add_argument("--dim", type=int, default=8192, help="sketch length k (all methods)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per backward (factored) / per projection")
    parser.add_argument("--faithful-prompts", type=int, default=64,
                        help="train prompts for the (slow) paper-recipe run: the first N (0 = all); the headline "
                             "fidelity of every method is on those N (keys *_all: each method on all its prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: warm cache or random init)")
    parser.add_argument("--model-cache", type=Path, default=ROOT / ".cache" / "models")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: few prompts")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        fn = {"prepare": child_prepare, "exact": child_exact, "build": child_build}[args.child]
        print(json.dumps(fn(args)))
        return
    if args.quick:
        args.prompts, args.val_prompts, args.batch_size, args.long_prompts, args.faithful_prompts = 32, 8, 16, 16, 16

    with tempfile.TemporaryDirectory(prefix="build-throughput-") as tmp:
        root = Path(args.work or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.model is None:
            sys.path.insert(0, str(ROOT))
            args.model, origin = find_model(args.model_cache, root)
        else:
            origin = "given"
        args.work = root / "short"
        args.work.mkdir(exist_ok=True)
        short = run_regime(args, "short", list(METHODS))
        summary = {"model": origin, "model_dir": Path(args.model).name, "params": "all", "dim": args.dim, "k_trajectories": args.k, "prompts": args.prompts,
                   "val_prompts": args.val_prompts, "batch_size": args.batch_size, "threads": args.threads,
                   **summarise(short)}
        if args.long_prompts:
            args.work = root / "long"
            args.work.mkdir(exist_ok=True)
            args.prompts, args.min_new_tokens, args.max_new_tokens = args.long_prompts, 16, 48
            summary.update(summarise(run_regime(args, "long", list(METHODS)), prefix="long_"))
            summary["long_prompts"] = args.long_prompts
        summary["total_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

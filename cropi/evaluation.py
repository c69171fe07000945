"""Held-out evaluation with the live engine: greedy and sampled pass@1 per evaluation set.

Sampled-eval seeds are fixed per (set, prompt, sample), so successive evaluations share their
random numbers (less noise in the differences between evaluations of one run, and between
runs evaluated on the same set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .rewards import RewardStats, get_reward
from .sampler import derive_seed
from .stats import sampling_error, standard_error


@dataclass(frozen=True)
class EvalSettings:
    samples: int  # samples per prompt for sampled pass@1 (0: greedy only)
    max_tokens: int
    temperature: float
    seed: int
    reward: str


class Evaluator:
    """Scores the engine's current policy on fixed evaluation sets."""

    def __init__(self, eval_sets: Mapping[str, Sequence[dict[str, Any]]], tokenizer, settings: EvalSettings,
                 encode: Callable[[dict[str, Any]], list[int]], stats: RewardStats | None = None) -> None:
        self.eval_sets = dict(eval_sets)
        self.tokenizer = tokenizer
        self.settings = settings
        self.encode = encode
        self.reward_stats = stats if stats is not None else RewardStats()
        self._reward_fn = get_reward(settings.reward)

    def score(self, token_ids: Sequence[int], row: dict[str, Any]) -> float:
        """The reward of one response (token ids) to an evaluation row."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return float(self._reward_fn(text, row["answer"], stats=self.reward_stats))

    def evaluate(self, engine) -> dict[str, dict]:
        """``{"greedy": {set: acc}, "sampled": {set: acc}, "n": {set: prompts}, "se": {"greedy": {set: se},
        "sampled": {set: se}}, "se_sampling": {set: se}}``: ``se`` over prompts
        (:func:`cropi.stats.standard_error`), ``se_sampling`` of sampled pass@1 on these prompts
        (:func:`cropi.stats.sampling_error`)."""
        from vllm import SamplingParams

        s = self.settings
        out: dict[str, dict] = {"greedy": {}, "sampled": {}, "n": {}, "se": {"greedy": {}, "sampled": {}},
                                "se_sampling": {}}
        for name, rows in self.eval_sets.items():
            prompts = [{"prompt_token_ids": self.encode(r)} for r in rows]
            greedy = SamplingParams(temperature=0.0, max_tokens=s.max_tokens, detokenize=False)
            outs = engine.generate(prompts, greedy, use_tqdm=False)
            scores = [self.score(o.outputs[0].token_ids, r) for o, r in zip(outs, rows)]
            out["greedy"][name] = sum(scores) / len(scores)
            out["se"]["greedy"][name] = standard_error(scores)
            out["n"][name] = len(rows)
            if s.samples > 0:
                params = [SamplingParams(n=s.samples, temperature=s.temperature, max_tokens=s.max_tokens,
                                         seed=derive_seed("eval", s.seed, name, r["id"]), detokenize=False)
                          for r in rows]
                outs = engine.generate(prompts, params, use_tqdm=False)
                per_prompt = [sum(self.score(x.token_ids, r) for x in o.outputs) / len(o.outputs)
                              for o, r in zip(outs, rows)]
                out["sampled"][name] = sum(per_prompt) / len(per_prompt)
                out["se"]["sampled"][name] = standard_error(per_prompt)
                out["se_sampling"][name] = sampling_error(per_prompt, s.samples)
        return out

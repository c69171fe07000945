"""The GRPO trainer: an HF policy trained with AdamW, sampled by a live vLLM engine.

One step (:meth:`GRPOTrainer.train_step`)::

    prompts   <- the prompt sampler (cropi.sampler; replaced per stage by ``set_pool(rows)``)
    K samples <- the live engine (cropi.rollout.sample_groups: behaviour log-probs, rewards,
                 GRPO group advantages; per-sample vLLM seeds derived from (seed, step))
    update    <- cropi.update.grpo_update (clipped surrogate over the non-zero-advantage groups)
    sync      <- cropi.engine.sync_weights: the engine samples the next step with the new weights

The parts: cropi.train_config (settings), cropi.policy (model and log-probs), cropi.update (the
GRPO update), cropi.evaluation (held-out pass@1), cropi.run_dir (log, checkpoints, resume),
cropi.plots; this module only orchestrates them.

Choices
-------
* Old log-probs: ``"behaviour"`` (default) uses the log-probs vLLM returned with the samples
  (post-temperature). With float32 on both sides the engine and the HF policy agree to ~1e-6
  per token, so with one optimiser update per batch the ratio is 1 and this *is* on-policy
  GRPO, minus one forward pass of the whole batch. The log's ``ratio_mean``/``ratio_max`` show
  the engine/trainer agreement. ``"recompute"`` evaluates the HF policy before the update
  instead: use it when engine and trainer numerics differ (bfloat16, GPU kernels).
* Loss aggregation: ``token-mean`` by default (see :mod:`cropi.grpo`).
* Evaluation (``eval_every`` steps, at step 0 and at the end of every :meth:`run`): greedy and
  sampled pass@1 through the live engine (:mod:`cropi.evaluation`).
* Resume (``TrainConfig(resume=True)`` or :meth:`GRPOTrainer.resume`) loads the newest
  checkpoint: weights (also into the engine), AdamW state, step, rollouts consumed, the prompt
  pool and sampler position, RNG states, and the log as it was then. Nothing in a step draws
  from a global RNG, so on CPU in float32 the resumed run repeats the uninterrupted run's steps
  (tests check rewards and losses after resume). On GPUs, batch-dependent kernels can flip
  rare tokens, after which the runs diverge.
* Threads (CPU): the in-process engine fixes torch's thread count for the process when it
  starts (``threads``); ``train_threads`` lets the update use another count.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sketchstore.prompts import encode_prompt

from .checks import check_int
from .engine import close_engine, make_engine, sync_weights
from .errors import BadConfigError
from .evaluation import EvalSettings, Evaluator
from .plots import plot_log
from .policy import Policy, load_causal_lm, quiet_hf
from .rewards import RewardStats
from .rollout import Sampling, sample_groups
from .run_dir import PERIODIC_PREFIX, RunDir, latest_checkpoint, read_log
from .sampler import PoolSampler, derive_seed
from .tasks import load_task_rows
from .threads import torch_threads
from .train_config import TrainConfig
from .trajectory import Trajectory
from .update import UpdateSettings, grpo_update, make_optimizer

__all__ = ["GRPOTrainer", "start_engine", "train_grpo"]

PROMPT_CACHE_SIZE = 200_000  # prompts whose token ids the trainer keeps (a pool's worth)


def start_engine(config: TrainConfig, model_dir: str | os.PathLike | None = None):
    """A live vLLM engine with ``config``'s device, dtype, memory and thread settings, loaded
    from ``model_dir`` (default: ``config.model``)."""
    return make_engine(model_dir or config.model, seed=config.seed, device=config.device, dtype=config.dtype,
                       max_model_len=config.max_model_len, kv_cache_gib=config.kv_cache_gib,
                       gpu_memory_utilization=config.gpu_memory_utilization, cpu_threads=config.threads)


class GRPOTrainer:
    """GRPO with a live vLLM engine; see the module docstring.

    Attributes the caller may read: ``step`` (updates done), ``rollouts`` (responses sampled,
    cumulative, behaviour rollouts counted by :meth:`consume_rollouts` included), ``policy``
    (the HF model), ``tokenizer``, ``engine`` (vllm.LLM). ``log``: one-line messages.
    ``engine``: a live engine of the same architecture to reuse (e.g. shared by the arms of a
    comparison) instead of starting one.
    """

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None, engine: Any = None):
        c = self.config = config
        self._log_msg = log or (lambda msg: None)
        self.run_dir = RunDir(c.out)
        self.out = c.out
        self.step = self.rollouts = 0
        self._t_start = time.perf_counter()
        self._last_eval_step: int | None = None
        self.sampler: PoolSampler | None = None
        self._prompt_ids: dict[str, list[int]] = {}
        self.reward_stats = RewardStats()
        ckpt = latest_checkpoint(c.out) if c.resume else None
        if c.resume and ckpt is None:
            raise BadConfigError(f"{c.out}: no checkpoint to resume from")
        if not c.resume and self.run_dir.holds_run():
            raise BadConfigError(f"{c.out}: already holds a run (log.jsonl); resume it or use another out dir")
        c.out.mkdir(parents=True, exist_ok=True)
        weights_dir = ckpt if ckpt is not None else c.model

        from .tiny_model import load_tokenizer

        self.tokenizer = load_tokenizer(weights_dir)
        self.device = torch.device(c.device)
        self.policy = load_causal_lm(weights_dir, self.device)
        self.policy.train()
        self.policy_logprobs = Policy(self.policy, self.tokenizer, c.temperature, c.dtype, c.share_prompt)
        self.ref_policy = load_causal_lm(c.model, self.device).eval().requires_grad_(False) if c.kl_coef > 0 else None
        self.optimizer = make_optimizer(self.policy, c.lr, c.betas, c.weight_decay)
        self.evaluator = Evaluator(self._eval_sets(ckpt), self.tokenizer,
                                   EvalSettings(samples=c.eval_samples, max_tokens=c.eval_max_tokens or c.max_tokens,
                                                temperature=c.temperature, seed=c.seed, reward=c.reward),
                                   encode=self._encode, stats=self.reward_stats)
        self.eval_sets = self.evaluator.eval_sets
        t0 = time.perf_counter()
        self._owns_engine = engine is None
        if engine is None:
            self.engine = start_engine(c, weights_dir)
            self._log_msg(f"engine started in {time.perf_counter() - t0:.1f}s")
        else:
            self.engine = engine
            sync_weights(self.engine, self.policy)
        self.engine_start_seconds = time.perf_counter() - t0
        if ckpt is not None:
            self._load_state(ckpt)
        if self.sampler is None and c.train is not None:
            self.set_pool(load_task_rows(c.train, "train"))

    def _eval_sets(self, ckpt: Path | None) -> dict[str, list[dict[str, Any]]]:
        """Fixed on the first start (written under out/eval), re-read on resume."""
        c = self.config
        if ckpt is not None:
            names = self.run_dir.checkpoint_state(ckpt).get("eval_sets", [])
            return {name: self.run_dir.read_eval_set(name) for name in names}
        sets = {}
        for name, src in c.eval_sets.items():
            rows = load_task_rows(src, f"eval set {name!r}")[: c.eval_n]
            if not rows:
                raise BadConfigError(f"eval set {name!r} is empty")
            self.run_dir.write_eval_set(name, rows)
            sets[name] = rows
        self.run_dir.write_config(c.to_json())
        return sets

    @classmethod
    def resume(cls, out: str | os.PathLike, log: Callable[[str], None] | None = None, engine: Any = None,
               **overrides: Any) -> "GRPOTrainer":
        """A trainer continuing the run in ``out`` from its newest checkpoint (config from
        ``out/config.json``; ``overrides`` replace fields, e.g. ``steps``)."""
        saved = RunDir(out).read_config()
        return cls(TrainConfig.from_json(saved, **{**overrides, "out": Path(out), "resume": True}), log=log,
                   engine=engine)

    def set_pool(self, rows: Sequence[dict[str, Any]] | str | os.PathLike, seed: int | None = None) -> None:
        """Train on ``rows`` from now on; the sampler's seed derives from the config seed and the
        current step unless given, so a resumed curriculum draws the same prompts."""
        seed = derive_seed("set_pool", self.config.seed, self.step) if seed is None else seed
        self.sampler = PoolSampler(load_task_rows(rows, "pool"), seed=seed)

    def _encode(self, row: dict[str, Any]) -> list[int]:
        ids = self._prompt_ids.get(row["prompt"])
        if ids is None:
            ids = encode_prompt(self.tokenizer, row["prompt"])
            if len(self._prompt_ids) < PROMPT_CACHE_SIZE:
                self._prompt_ids[row["prompt"]] = ids
        return ids

    def sample(self, rows: Sequence[dict[str, Any]], key: Any) -> tuple[list[Trajectory], float]:
        """K responses per row from the live engine (current weights) and the seconds spent in
        generate. Seeds derive from (config seed, ``key``, prompt id, sample): training steps use
        ``key = step``; use another key (e.g. ``"select-3"``) for rollouts outside training and
        count them with :meth:`consume_rollouts`. A prompt drawn twice gets ids ``id#2``, ..."""
        c, seen, tasks = self.config, {}, []
        for r in rows:
            seen[r["id"]] = k = seen.get(r["id"], 0) + 1
            tasks.append(r if k == 1 else {**r, "id": f"{r['id']}#{k}"})
        sampling = Sampling(n=c.n, max_tokens=c.max_tokens, temperature=c.temperature, seed=derive_seed("step", c.seed, key),
                            reward=c.reward, behaviour=f"step-{self.step}")
        return sample_groups(self.engine, self.tokenizer, tasks, sampling, prompt_ids=[self._encode(t) for t in tasks],
                             stats=self.reward_stats)

    def train_step(self) -> dict[str, Any]:
        """Sample, update, sync; append the step record to the log and return it."""
        c = self.config
        if self.sampler is None:
            raise BadConfigError("no prompt pool: pass TrainConfig(train=...) or call set_pool(rows)")
        t0 = time.perf_counter()
        rows = self.sampler.next(c.prompts_per_step)
        traj, gen_s = self.sample(rows, self.step)
        t_sample = time.perf_counter() - t0
        zero_groups = sum(1 for t in traj if t.sample == 0 and t.zero_std)
        t1 = time.perf_counter()
        with torch_threads(c.train_threads if self.device.type == "cpu" else None):
            self.policy.train()
            stats = grpo_update(self.policy_logprobs, self.optimizer, traj, UpdateSettings.of(c), self.ref_policy)
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        if stats.updates:  # all groups zero-advantage: the weights did not change
            sync_weights(self.engine, self.policy)
        t_sync = time.perf_counter() - t2
        self.step += 1
        self.rollouts += len(traj)
        record = {
            "type": "step", "step": self.step, "rollouts": self.rollouts, "prompts": len(rows), "samples": len(traj),
            "reward_mean": sum(t.reward for t in traj) / len(traj),
            "zero_adv_frac": zero_groups / max(len(rows), 1), "zero_adv_groups": zero_groups,
            "response_len_mean": sum(len(t.response_token_ids) for t in traj) / len(traj),
            "truncated_frac": sum(t.finish_reason == "length" for t in traj) / len(traj),
            "unparsed_frac": sum(not t.reward_parsed for t in traj) / len(traj),
            **stats.to_record(),
            "seconds": time.perf_counter() - t0, "sample_s": t_sample, "generate_s": gen_s,
            "update_s": t_update, "sync_s": t_sync, "time": time.perf_counter() - self._t_start,
            "prompt_ids": [r["id"] for r in rows],
        }
        self.run_dir.append(record)
        return record

    def consume_rollouts(self, n: int, what: str = "selection") -> None:
        """Count ``n`` responses sampled outside the training steps (e.g. behaviour trajectories
        for influence scores) in ``rollouts``, with a ``{"type": "rollouts"}`` log line."""
        self.rollouts += check_int("n", n, 0)
        self.run_dir.append({"type": "rollouts", "what": str(what), "n": n, "step": self.step,
                             "rollouts": self.rollouts, "time": time.perf_counter() - self._t_start})

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy and sampled pass@1 on every eval set with the live engine; logged."""
        t0 = time.perf_counter()
        record = {"type": "eval", "step": self.step, "rollouts": self.rollouts, **self.evaluator.evaluate(self.engine)}
        record.update(seconds=time.perf_counter() - t0, time=time.perf_counter() - self._t_start)
        self.run_dir.append(record)
        self._last_eval_step = self.step
        if self.config.plots:
            plot_log(self.out)
        return record

    def run(self, steps: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """``steps`` more steps (default: up to ``config.steps``), evaluating at step 0 (when
        ``eval_at_start``), every ``eval_every`` steps and at the end. Returns the step records."""
        from tqdm.auto import tqdm

        c = self.config
        steps = max(0, c.steps - self.step) if steps is None else check_int("steps", steps, 0)
        records = []
        if self.eval_sets and c.eval_at_start and self.step == 0 and self._last_eval_step is None:
            self.evaluate()
        with tqdm(total=steps, unit="step", desc="grpo", disable=not progress) as bar:
            for _ in range(steps):
                rec = self.train_step()
                records.append(rec)
                if self.eval_sets and c.eval_every and self.step % c.eval_every == 0:
                    bar.write(eval_line(self.evaluate()))
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint(f"{PERIODIC_PREFIX}{self.step}")
                bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", zero=f"{rec['zero_adv_frac']:.2f}",
                                s=f"{rec['seconds']:.1f}")
                bar.update(1)
        if self.eval_sets and self._last_eval_step != self.step:
            ev = self.evaluate()
            if progress:
                tqdm.write(eval_line(ev))
        return records

    def save_checkpoint(self, name: str) -> Path:
        """``out/checkpoints/<name>``: HF model + tokenizer + trainer state, written atomically
        (an existing checkpoint of that name is replaced). Returns its path."""
        from .tiny_model import save_tokenizer

        def write_model(path: Path) -> None:
            with quiet_hf():
                self.policy.save_pretrained(str(path), safe_serialization=True)
            save_tokenizer(self.tokenizer, path)

        blob = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate(), "sampler": self.sampler.state_dict() if self.sampler else None}
        state = {"step": self.step, "rollouts": self.rollouts, "last_eval_step": self._last_eval_step,
                 "time": time.perf_counter() - self._t_start, "eval_sets": list(self.eval_sets),
                 "saved_at": time.time(), "config": self.config.to_json()}
        path = self.run_dir.save_checkpoint(name, write_model, state, blob, self.sampler.rows if self.sampler else None,
                                            self.config.keep_checkpoints)
        self._log_msg(f"checkpoint {path}")
        return path

    def _load_state(self, ckpt: Path) -> None:
        state, blob, pool = self.run_dir.load_checkpoint(ckpt)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        random.setstate(blob["python_rng"])
        self.step, self.rollouts = int(state["step"]), int(state["rollouts"])
        self._last_eval_step = state.get("last_eval_step")
        self._t_start = time.perf_counter() - float(state.get("time", 0.0))  # "time" in the log continues
        if pool is not None:
            self.sampler = PoolSampler(pool)
            self.sampler.load_state_dict(blob["sampler"])
        self.run_dir.truncate_log(int(state["log_offset"]))
        self._log_msg(f"resumed from {ckpt} at step {self.step} ({self.rollouts} rollouts)")

    def close(self) -> None:
        """Drop the engine (frees its KV cache) unless it was handed in by the caller."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and getattr(self, "_owns_engine", True):
            close_engine(engine)

    def __enter__(self) -> "GRPOTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def eval_line(ev: dict[str, Any]) -> str:
    """One line of an evaluation record."""
    parts = [f"{name} greedy {ev['greedy'][name]:.3f}"
             + (f" sampled {ev['sampled'][name]:.3f}" if name in ev["sampled"] else "") for name in ev["greedy"]]
    return f"eval step {ev['step']} rollouts {ev['rollouts']}: " + ", ".join(parts)


def train_grpo(config: TrainConfig, progress: bool = True, final_checkpoint: str = "final",
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on ``config.train`` up to ``config.steps`` (resuming when ``config.resume``),
    save the checkpoint ``final_checkpoint`` and return a summary (also ``summary["line"]``)."""
    t0 = time.perf_counter()
    with GRPOTrainer(config, log=log) as trainer:
        start_step = trainer.step
        records = trainer.run(progress=progress)
        ckpt = trainer.save_checkpoint(final_checkpoint) if final_checkpoint else None
        evals = [r for r in read_log(trainer.out) if r.get("type") == "eval"]
        last = records[-10:]
        summary = {
            "out": str(trainer.out), "checkpoint": str(ckpt) if ckpt else None, "step": trainer.step,
            "steps_run": trainer.step - start_step, "rollouts": trainer.rollouts,
            "reward_mean_last10": sum(r["reward_mean"] for r in last) / len(last) if last else None,
            "sec_per_step": sum(r["seconds"] for r in records) / len(records) if records else None,
            "engine_start_s": trainer.engine_start_seconds, "seconds": time.perf_counter() - t0,
            "eval": evals[-1] if evals else None,
        }
    parts = [f"grpo: step {summary['step']} ({summary['steps_run']} run), {summary['rollouts']} rollouts"]
    if summary["reward_mean_last10"] is not None:
        parts.append(f"train reward (last {len(last)} steps) {summary['reward_mean_last10']:.3f}")
    if summary["eval"]:
        ev = summary["eval"]
        parts += [f"eval {name} greedy {ev['greedy'][name]:.3f}" + (f" sampled {ev['sampled'][name]:.3f}"
                                                                    if name in ev["sampled"] else "")
                  for name in ev["greedy"]]
    if summary["sec_per_step"] is not None:
        parts.append(f"{summary['sec_per_step']:.2f}s/step")
    summary["line"] = ", ".join(parts) + f", {summary['seconds']:.0f}s -> {summary['checkpoint'] or summary['out']}"
    return summary

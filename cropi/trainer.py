"""Stagewise-capable GRPO trainer: an HF policy trained with AdamW, sampled by a live vLLM engine.

One step (:meth:`GRPOTrainer.train_step`)::

    prompts   <- the prompt sampler (replaceable per stage: ``trainer.set_pool(rows)``)
    K samples <- the live engine (cropi.rollout.sample_groups: behaviour log-probs, rewards,
                 GRPO group advantages; per-sample vLLM seeds derived from (seed, step))
    update    <- cropi.grpo.grpo_loss over the non-zero-advantage groups, AdamW step(s)
    sync      <- cropi.engine.sync_weights(engine, policy): the engine samples the next step
                 with the new weights (no reload from disk, one engine start per trainer)

Curriculum use::

    trainer = GRPOTrainer(TrainConfig(model=..., out=..., eval_sets={...}))
    for s, rows in enumerate(stages):
        trainer.set_pool(rows)
        trainer.run(n_steps)
        trainer.save_checkpoint(f"stage{s}")
    trainer.close()

Choices
-------
* Old log-probs (``old_logprobs``): ``"behaviour"`` (default) uses the log-probs vLLM returned
  with the samples (post-temperature, ``processed_logprobs``). With float32 on both sides the
  engine and the HF policy agree to ~1e-6 per token, so with one optimiser update per batch
  (``mini_batches=1``) the ratio is 1 and this *is* on-policy GRPO, minus one forward pass of
  the whole batch (a no-grad forward, about a third of the update). The log's ``ratio_mean`` /
  ``ratio_max`` show the engine/trainer agreement: 1 +- 5e-5 on CPU float32 (bfloat16 engine on
  CPU: ratio_max ~1.003). ``"recompute"`` evaluates
  the HF policy (no grad) before the update instead -- use it when the engine and trainer
  numerics differ (bfloat16, GPU kernels): the ratio then measures only the policy change
  since the batch was sampled, not the engine/trainer mismatch. With ``mini_batches > 1`` the
  later mini-batches see a changed policy and the clip (``clip_low``/``clip_high``) acts.
* Loss aggregation: ``token-mean`` by default (see :mod:`cropi.grpo`). Denominators are the
  token / sequence counts of the whole (mini-)batch as sampled, zero-advantage groups
  included; those groups are skipped in the forward/backward (their loss terms are exactly 0
  when ``kl_coef == 0``) but counted (``zero_adv_frac`` in the log). With ``kl_coef > 0`` they
  are kept (the KL term has a gradient) and a frozen copy of the initial policy is the reference.
* Gradient accumulation: ``grad_accum`` micro-batches per optimiser update (memory only --
  the result equals one big batch up to float summation order).
* Evaluation (``eval_every`` steps, at step 0 and at the end of every :meth:`run`): pass@1 with
  greedy decoding and with ``eval_samples`` samples at the training temperature, through the
  live engine. Sampled-eval seeds are fixed per (set, prompt, sample), so successive
  evaluations share their random numbers (less noise in the differences).

Files under ``out``::

    config.json           the TrainConfig (train rows replaced by their count)
    eval/<name>.jsonl     the evaluation sets as used (first ``eval_n`` rows)
    log.jsonl             {"type": "step", ...} per step, {"type": "eval", ...} per evaluation
    accuracy_vs_step.png, accuracy_vs_rollouts.png
    checkpoints/<name>/   HF model + tokenizer + trainer_state.pt/.json (written to a temp dir,
                          renamed on success); checkpoints/LATEST names the newest

Resume (``TrainConfig(resume=True)`` or :meth:`GRPOTrainer.resume`) loads the newest
checkpoint: weights (also into the engine), AdamW state, step, rollouts consumed, the prompt
pool and sampler position, RNG states, and truncates log.jsonl to what it held at the
checkpoint (the tail is kept in ``log.discarded.jsonl``). Nothing in a step draws from a global
RNG (prompt order comes from the sampler's own seeded permutations, samples from per-request
vLLM seeds), so on CPU in float32 the resumed run repeats the uninterrupted run's steps
(tests/test_trainer.py checks rewards and losses after resume). On GPUs, batch-dependent
kernels can flip rare tokens, after which the runs diverge.

Update cost: with ``share_prompt`` (default) each distinct prompt is run once and its KV cache
gathered for its K responses (exactly the padded forward's values, tests check it): ~3x faster
than padding K copies of prompt+response on the small model (prompts ~26 tokens, answers ~16).

Measured (2 shared CPU cores, 1 thread, warm "small" model 3.5M params, difficulty-1
arithmetic, 16 prompts x 8 samples x max 48 tokens, answers ~16 tokens): ~1.1-1.3 s per step
median (generate ~0.6 s incl. rewards, update ~0.5 s, weight sync ~0.03 s); the first step
~3-7 s (vLLM's first seeded sampling); engine start 11-19 s; an evaluation of 128 prompts
(greedy + 4 samples) ~2.5-6 s. Two torch threads for the update (``train_threads=2``) were
2-4x *slower* on the shared cores. Not measured on a GPU (none available); ``device="cuda"``
puts the policy on the GPU and starts the engine with ``gpu_memory_utilization``.

Threads (CPU): the in-process engine fixes torch's thread count for the process when it
starts (``threads``; default ``OMP_NUM_THREADS`` else 1, steadiest on shared cores);
``train_threads`` lets the policy update use another count (set through
``torch._C._set_num_threads`` around the update, restored for the engine afterwards).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from sketchstore.atomic import atomic_dir, atomic_file, write_text_atomic
from sketchstore.seeds import stable_seed

from .engine import DEVICES, close_engine, make_engine, sync_weights
from .errors import BadConfigError
from .grpo import DEFAULT_LOSS_AGG, LOSS_AGGS, grpo_loss, token_logprobs_from_logits
from .rewards import RewardStats, get_reward, list_rewards
from .rollout import RolloutConfig, _int, encode_prompt, sample_groups
from .tasks import read_tasks, write_tasks

__all__ = [
    "TrainConfig",
    "GRPOTrainer",
    "PoolSampler",
    "read_log",
    "plot_log",
    "latest_checkpoint",
    "train_grpo",
    "OLD_LOGPROBS",
    "DTYPES",
]

OLD_LOGPROBS = ("behaviour", "recompute")
DTYPES = ("float32", "bfloat16")
LOG_NAME = "log.jsonl"
DISCARDED_LOG_NAME = "log.discarded.jsonl"
CONFIG_NAME = "config.json"
CKPT_DIR = "checkpoints"
LATEST_NAME = "LATEST"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
POOL_NAME = "pool.jsonl"
# Measured on the embedded small policy: 2e-4 halves its greedy accuracy in 10 steps (Adam
# moves every weight ~lr per step along a noisy RL gradient); 3e-5..6e-5 improve it slowly.
DEFAULT_LR = 5e-5
PERIODIC_PREFIX = "step-"


def _derive_seed(*parts: Any) -> int:
    return stable_seed("cropi-grpo", *parts, bits=62)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _float(name: str, value: Any, minimum: float | None = None, strict: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise BadConfigError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (out < minimum or (strict and out == minimum)):
        raise BadConfigError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return out


@dataclass
class TrainConfig:
    """GRPO training settings. Invalid values raise :class:`BadConfigError` naming the field.

    model: HF checkpoint directory (initial policy, and the KL reference). out: run directory.
    train: task rows or a task file (any layout :func:`cropi.tasks.read_tasks` reads); may be
    None when the caller sets the pool with :meth:`GRPOTrainer.set_pool`. eval_sets:
    ``{name: rows or file}`` (a bare file / row list is named "eval"). steps: the total a
    plain :meth:`GRPOTrainer.run` goes to. n: samples per prompt (K).
    """

    model: Path
    out: Path
    train: Any = None
    eval_sets: Any = None
    steps: int = 100
    prompts_per_step: int = 16
    n: int = 8
    max_tokens: int = 48
    temperature: float = 1.0
    lr: float = DEFAULT_LR
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_accum: int = 1
    mini_batches: int = 1
    clip_low: float = 0.2
    clip_high: float | None = None  # None: = clip_low
    kl_coef: float = 0.0
    loss_agg: str = DEFAULT_LOSS_AGG
    old_logprobs: str = "behaviour"
    share_prompt: bool = True  # one prompt forward per group in the update (see _forward_logprobs)
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"
    eval_every: int = 10  # 0: only at step 0 and at the end of each run()
    eval_n: int | None = 128  # rows per eval set (first N); None: all
    eval_samples: int = 4  # samples per eval prompt for sampled pass@1; 0: greedy only
    eval_max_tokens: int | None = None  # default: max_tokens
    eval_at_start: bool = True
    save_every: int = 0  # periodic checkpoints "step-<N>" (0: none); stage checkpoints by name
    keep_checkpoints: int = 2  # periodic checkpoints kept (named ones are never deleted)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # engine (and default training) torch threads on CPU
    train_threads: int | None = None  # torch threads during the policy update (CPU)
    reward: str = "math_verify"
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.3
    resume: bool = False
    plots: bool = True

    def __post_init__(self) -> None:
        self.model, self.out = Path(self.model), Path(self.out)
        for name, minimum in (("steps", 0), ("prompts_per_step", 1), ("n", 1), ("max_tokens", 1), ("grad_accum", 1),
                              ("mini_batches", 1), ("eval_every", 0), ("eval_samples", 0), ("save_every", 0),
                              ("keep_checkpoints", 1), ("seed", 0)):
            _int(name, getattr(self, name), minimum)
        for name in ("eval_n", "eval_max_tokens", "threads", "train_threads", "max_model_len"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 1)
        if self.n < 2:
            raise BadConfigError(f"n (samples per prompt) must be >= 2 for group advantages, got {self.n}")
        self.temperature = _float("temperature", self.temperature, 0.0, strict=True)
        self.lr = _float("lr", self.lr, 0.0, strict=True)
        self.weight_decay = _float("weight_decay", self.weight_decay, 0.0)
        self.clip_low = _float("clip_low", self.clip_low, 0.0)
        if self.clip_low >= 1:
            raise BadConfigError(f"clip_low must be < 1, got {self.clip_low}")
        if self.clip_high is not None:
            self.clip_high = _float("clip_high", self.clip_high, 0.0)
        self.kl_coef = _float("kl_coef", self.kl_coef, 0.0)
        self.kv_cache_gib = _float("kv_cache_gib", self.kv_cache_gib, 0.0, strict=True)
        self.gpu_memory_utilization = _float("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, strict=True)
        if self.max_grad_norm is not None:
            self.max_grad_norm = _float("max_grad_norm", self.max_grad_norm, 0.0, strict=True)
        try:
            b1, b2 = (float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise BadConfigError(f"betas must be two numbers, got {self.betas!r}") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise BadConfigError(f"betas must be in [0, 1), got {self.betas!r}")
        self.betas = (b1, b2)
        for name, allowed in (("loss_agg", LOSS_AGGS), ("old_logprobs", OLD_LOGPROBS), ("dtype", DTYPES),
                              ("device", DEVICES), ("reward", tuple(list_rewards()))):
            if getattr(self, name) not in allowed:
                raise BadConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.out.exists() and not self.out.is_dir():
            raise BadConfigError(f"{self.out}: exists and is not a directory")
        if not self.resume and not (self.model / "config.json").is_file():
            raise BadConfigError(f"{self.model}: not a model directory (no config.json)")
        if isinstance(self.train, (str, os.PathLike)):
            self.train = Path(self.train)
            if not self.train.exists():
                raise BadConfigError(f"{self.train}: train task file does not exist")
        if self.eval_sets is None:
            self.eval_sets = {}
        elif isinstance(self.eval_sets, (str, os.PathLike)) or (isinstance(self.eval_sets, (list, tuple))):
            self.eval_sets = {"eval": self.eval_sets}
        elif not isinstance(self.eval_sets, dict):
            raise BadConfigError(f"eval_sets must be a dict name -> rows/file, got {type(self.eval_sets).__name__}")
        for name, src in self.eval_sets.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise BadConfigError(f"eval set name must be a plain non-empty string, got {name!r}")
            if isinstance(src, (str, os.PathLike)) and not Path(src).exists():
                raise BadConfigError(f"eval set {name!r}: {src} does not exist")

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (rows replaced by a count, paths by strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "train" and v is not None and not isinstance(v, Path):
                v = {"rows": len(v)}
            elif f.name == "eval_sets":
                v = {k: (str(s) if isinstance(s, (str, os.PathLike)) else {"rows": len(s)}) for k, s in v.items()}
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _load_rows(src: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(src, (str, os.PathLike)):
        rows = read_tasks(Path(src))
    else:
        rows = [dict(r) for r in src]
    for i, r in enumerate(rows):
        for key in ("id", "prompt", "answer"):
            if key not in r:
                raise BadConfigError(f"{what}: row {i} lacks {key!r}")
        r["id"] = str(r["id"])
    return rows


# --------------------------------------------------------------------------------------
# Prompt sampler
# --------------------------------------------------------------------------------------


class PoolSampler:
    """Draws prompts from a pool without replacement: a seeded permutation per epoch.

    ``next(n)`` returns the next n rows (crossing into a new epoch when the pool runs out, so
    a pool smaller than n repeats prompts within a step). Any object with ``next(n)`` can
    replace it (:meth:`GRPOTrainer.set_sampler`); ``state_dict``/``load_state_dict`` and a
    ``rows`` attribute make it resumable.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], seed: int = 0):
        if not rows:
            raise BadConfigError("the prompt pool is empty")
        self.rows = list(rows)
        self.seed = int(seed)
        self.epoch = 0
        self.pos = 0
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            perm = list(range(len(self.rows)))
            random.Random(_derive_seed("pool", self.seed, self.epoch)).shuffle(perm)
            self._perm = perm
        return self._perm

    def next(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if self.pos >= len(self.rows):
                self.epoch += 1
                self.pos = 0
                self._perm = None
            take = min(n - len(out), len(self.rows) - self.pos)
            perm = self._permutation()
            out.extend(self.rows[i] for i in perm[self.pos: self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.pos = int(state["seed"]), int(state["epoch"]), int(state["pos"])
        self._perm = None


def start_engine(config: TrainConfig, model_dir: str | os.PathLike | None = None):
    """A live vLLM engine with ``config``'s device, dtype, memory and thread settings, loaded
    from ``model_dir`` (default: ``config.model``)."""
    return make_engine(model_dir or config.model, seed=config.seed, device=config.device, dtype=config.dtype,
                       max_model_len=config.max_model_len, kv_cache_gib=config.kv_cache_gib,
                       gpu_memory_utilization=config.gpu_memory_utilization, cpu_threads=config.threads)


# --------------------------------------------------------------------------------------
# Log / plots
# --------------------------------------------------------------------------------------


def read_log(out: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``out/log.jsonl`` (a run directory or the file itself)."""
    p = Path(out)
    p = p / LOG_NAME if p.is_dir() else p
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_log(out: str | os.PathLike, records: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write accuracy_vs_step.png and accuracy_vs_rollouts.png from the eval records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    records = read_log(out) if records is None else records
    evals = [r for r in records if r.get("type") == "eval"]
    if not evals:
        return []
    series: dict[str, list[tuple[int, int, float]]] = {}
    for r in evals:
        for mode in ("greedy", "sampled"):
            for name, acc in (r.get(mode) or {}).items():
                if acc is not None:
                    series.setdefault(f"{name} {mode}", []).append((r["step"], r["rollouts"], acc))
    written = []
    for x_index, xlabel, fname in ((0, "step", "accuracy_vs_step.png"), (1, "rollouts consumed", "accuracy_vs_rollouts.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in sorted(series.items()):
            ax.plot([p[x_index] for p in pts], [p[2] for p in pts], marker="o", ms=3,
                    ls="-" if label.endswith("greedy") else "--", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("pass@1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_file(out / fname) as handle:
            fig.savefig(handle, format="png", dpi=90)
        plt.close(fig)
        written.append(out / fname)
    return written


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory of a run (``checkpoints/LATEST``), or None."""
    ck = Path(out) / CKPT_DIR
    try:
        name = (ck / LATEST_NAME).read_text().strip()
    except OSError:
        return None
    path = ck / name
    return path if (path / STATE_JSON).is_file() else None


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads = n inside (bypasses vLLM's CPU-worker lock on set_num_threads)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch._C._set_num_threads(int(n))
    try:
        yield
    finally:
        torch._C._set_num_threads(old)


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") inside."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@dataclass
class _Seq:
    """One sampled response prepared for the update."""

    ids: list[int]  # prompt + response
    start: int  # index in ids of the first response token
    n_resp: int
    advantage: float
    old_logp: list[float]
    mb: int = 0  # mini-batch index


class GRPOTrainer:
    """GRPO with a live vLLM engine; see the module docstring.

    Attributes the caller may read: ``step`` (updates done), ``rollouts`` (responses sampled
    for training, cumulative), ``policy`` (HF model), ``tokenizer``, ``engine`` (vllm.LLM).
    ``log``: a callable for one-line messages (default: silent).
    """

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None, engine: Any = None):
        self.config = config
        self._log_msg = log or (lambda msg: None)
        c = config
        self.out = c.out
        self.step = 0
        self.rollouts = 0
        self.device = torch.device(c.device)
        self._t_start = time.perf_counter()
        self._last_eval_step: int | None = None
        self.sampler: Any = None
        self._prompt_ids: dict[str, list[int]] = {}
        self.reward_stats = RewardStats()
        self._reward_fn = get_reward(c.reward)

        ckpt = latest_checkpoint(c.out) if c.resume else None
        if c.resume and ckpt is None:
            raise BadConfigError(f"{c.out}: no checkpoint to resume from")
        if not c.resume and (c.out / LOG_NAME).is_file() and (c.out / LOG_NAME).stat().st_size > 0:
            raise BadConfigError(f"{c.out}: already holds a run (log.jsonl); resume it or use another out dir")
        c.out.mkdir(parents=True, exist_ok=True)
        weights_dir = ckpt if ckpt is not None else c.model

        from transformers import AutoModelForCausalLM

        from .tiny_model import load_tokenizer

        self.tokenizer = load_tokenizer(weights_dir)
        # Master weights stay float32; dtype=bfloat16 means autocast forward + a bf16 engine.
        with _quiet_hf():
            self.policy = AutoModelForCausalLM.from_pretrained(str(weights_dir), dtype=torch.float32).to(self.device)
            self.ref_policy = None
            if c.kl_coef > 0:
                self.ref_policy = AutoModelForCausalLM.from_pretrained(str(c.model), dtype=torch.float32).to(self.device)
                self.ref_policy.eval().requires_grad_(False)
        self.policy.train()
        decay = [p for _, p in self.policy.named_parameters() if p.ndim >= 2]
        no_decay = [p for _, p in self.policy.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr, betas=c.betas)

        # Eval sets: fixed on first start (written under out/eval), re-read on resume.
        self.eval_sets: dict[str, list[dict[str, Any]]] = {}
        eval_dir = c.out / "eval"
        if ckpt is not None:
            saved = json.loads((ckpt / STATE_JSON).read_text()).get("eval_sets", [])
            for name in saved:
                self.eval_sets[name] = read_tasks(eval_dir / f"{name}.jsonl")
        else:
            for name, src in c.eval_sets.items():
                rows = _load_rows(src, f"eval set {name!r}")
                if c.eval_n is not None:
                    rows = rows[: c.eval_n]
                if not rows:
                    raise BadConfigError(f"eval set {name!r} is empty")
                self.eval_sets[name] = rows
                eval_dir.mkdir(exist_ok=True)
                write_tasks(rows, eval_dir / f"{name}.jsonl")
            write_text_atomic(c.out / CONFIG_NAME, json.dumps(c.to_json(), indent=1) + "\n")
            if c.train is not None:
                self.set_pool(_load_rows(c.train, "train"))

        self._rollout_cfg = RolloutConfig(model=c.model, data=c.out, out=c.out / ".unused", n=c.n,
                                          max_tokens=c.max_tokens, temperature=c.temperature, seed=0,
                                          behaviour="grpo", reward=c.reward, device=c.device)

        t0 = time.perf_counter()
        self._owns_engine = engine is None
        if engine is None:
            self.engine = start_engine(c, weights_dir)
            self._log_msg(f"engine started in {time.perf_counter() - t0:.1f}s")
        else:  # a live engine of the same architecture (e.g. shared by the arms of a comparison)
            self.engine = engine
            sync_weights(self.engine, self.policy)
        self.engine_start_seconds = time.perf_counter() - t0

        if ckpt is not None:
            self._load_state(ckpt)
            if self.sampler is None and c.train is not None:  # checkpoint without a saved pool
                self.set_pool(_load_rows(c.train, "train"))

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def resume(cls, out: str | os.PathLike, log: Callable[[str], None] | None = None, engine: Any = None,
               **overrides: Any) -> "GRPOTrainer":
        """A trainer continuing the run in ``out`` from its newest checkpoint (config from
        ``out/config.json``; ``overrides`` replace fields, e.g. ``steps``). ``engine``: reuse
        a live engine (the checkpoint's weights are synced into it) instead of starting one."""
        out = Path(out)
        try:
            saved = json.loads((out / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            raise BadConfigError(f"{out}: no readable {CONFIG_NAME} (not a trainer run directory)") from None
        names = {f.name for f in fields(TrainConfig)}
        kwargs = {k: v for k, v in saved.items() if k in names}
        kwargs["train"] = None  # the pool comes from the checkpoint
        kwargs["eval_sets"] = None
        kwargs.update(overrides)
        kwargs["out"] = out
        kwargs["resume"] = True
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(TrainConfig(**kwargs), log=log, engine=engine)

    def set_pool(self, rows: Sequence[dict[str, Any]] | str | os.PathLike, seed: int | None = None) -> None:
        """Train on ``rows`` from now on (a :class:`PoolSampler`; its permutation seed is derived
        from the config seed and the current step unless given, so a resumed curriculum that
        sets the same pool at the same step draws the same prompts)."""
        rows = _load_rows(rows, "pool")
        seed = _derive_seed("set_pool", self.config.seed, self.step) if seed is None else seed
        self.sampler = PoolSampler(rows, seed=seed)

    def set_sampler(self, sampler: Any) -> None:
        """Any object with ``next(n) -> rows``; checkpoints persist it only if it has ``rows``,
        ``state_dict`` and ``load_state_dict`` (restored as a :class:`PoolSampler`)."""
        if not callable(getattr(sampler, "next", None)):
            raise BadConfigError("a prompt sampler needs a next(n) method")
        self.sampler = sampler

    # ---------------------------------------------------------------- one step

    def _encode(self, row: dict[str, Any]) -> list[int]:
        ids = self._prompt_ids.get(row["prompt"])
        if ids is None:
            ids = encode_prompt(self.tokenizer, row["prompt"])
            if len(self._prompt_ids) < 200_000:
                self._prompt_ids[row["prompt"]] = ids
        return ids

    def sample(self, rows: Sequence[dict[str, Any]], key: Any) -> tuple[list[dict[str, Any]], float]:
        """K responses per row with the live engine (current weights): trajectory rows in the
        cropi.rollout schema (behaviour log-probs, rewards, group advantages) and the seconds
        spent in generate. Per-sample seeds derive from (config seed, ``key``, prompt id,
        sample); training steps use ``key = step index`` -- use another key (e.g.
        ``"select-3"``) for rollouts outside training, and count them with
        :meth:`consume_rollouts`. A prompt drawn twice gets distinct ids ``id#2``, ..."""
        seen: dict[str, int] = {}
        tasks = []
        for r in rows:
            k = seen.get(r["id"], 0) + 1
            seen[r["id"]] = k
            tasks.append(r if k == 1 else {**r, "id": f"{r['id']}#{k}"})
        self._rollout_cfg.seed = _derive_seed("step", self.config.seed, key)
        self._rollout_cfg.behaviour = f"step-{self.step}"
        return sample_groups(self.engine, self.tokenizer, tasks, self._rollout_cfg,
                             prompt_ids=[self._encode(t) for t in tasks], stats=self.reward_stats)

    def _autocast(self):
        if self.config.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_logprobs(self, model, seqs: Sequence[_Seq]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-probs (at the sampling temperature) of the response tokens, and the mask;
        T = the longest response. With ``share_prompt`` each distinct prompt goes through the
        model once and its KV cache is gathered for its K responses (same values, ~2x fewer
        tokens when prompts are as long as responses); otherwise one right-padded forward."""
        if self.config.share_prompt:
            shared = self._forward_shared_prompt(model, seqs)
            if shared is not None:
                return shared
        width = max(len(s.ids) for s in seqs)
        t_max = max(s.n_resp for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        pos = torch.zeros((len(seqs), t_max), dtype=torch.long)
        tgt = torch.full((len(seqs), t_max), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), t_max), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s.ids)] = torch.tensor(s.ids)
            attn[i, : len(s.ids)] = 1
            pos[i, : s.n_resp] = torch.arange(s.start - 1, s.start - 1 + s.n_resp)
            tgt[i, : s.n_resp] = torch.tensor(s.ids[s.start:])
            mask[i, : s.n_resp] = True
        ids, attn, pos, tgt, mask = (t.to(self.device) for t in (ids, attn, pos, tgt, mask))
        with self._autocast():
            logits = model(input_ids=ids, attention_mask=attn).logits
        step_logits = logits.gather(1, pos[:, :, None].expand(-1, -1, logits.shape[-1]))
        return token_logprobs_from_logits(step_logits, tgt, self.config.temperature), mask

    def _forward_shared_prompt(self, model, seqs: Sequence[_Seq]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompts once (right-padded, KV cached), responses on the gathered cache with explicit
        position ids (the padding gap between a short prompt and its response is masked out).
        None when no prompt repeats (nothing to share)."""
        index: dict[tuple[int, ...], int] = {}
        rows = [index.setdefault(tuple(s.ids[: s.start]), len(index)) for s in seqs]
        if len(index) == len(seqs):
            return None
        prompts = list(index)
        pad = self.tokenizer.pad_token_id or 0
        lp = max(len(p) for p in prompts)
        p_ids = torch.full((len(prompts), lp), pad, dtype=torch.long)
        p_mask = torch.zeros((len(prompts), lp), dtype=torch.long)
        for i, p in enumerate(prompts):
            p_ids[i, : len(p)] = torch.tensor(p)
            p_mask[i, : len(p)] = 1
        p_len = p_mask.sum(1)
        t_max = max(s.n_resp for s in seqs)
        r_ids = torch.full((len(seqs), t_max), pad, dtype=torch.long)
        r_mask = torch.zeros((len(seqs), t_max), dtype=torch.long)
        for i, s in enumerate(seqs):
            r_ids[i, : s.n_resp] = torch.tensor(s.ids[s.start:])
            r_mask[i, : s.n_resp] = 1
        idx = torch.tensor(rows, dtype=torch.long)
        full_mask = torch.cat([p_mask[idx], r_mask], dim=1)
        positions = p_len[idx][:, None] + torch.arange(t_max)[None, :]
        dev = self.device
        with self._autocast():
            first = model(input_ids=p_ids.to(dev), attention_mask=p_mask.to(dev), use_cache=True)
            cache = first.past_key_values
            cache.batch_select_indices(idx.to(dev))
            last = first.logits[torch.arange(len(prompts), device=dev), (p_len - 1).to(dev)]  # predicts token 0
            second = model(input_ids=r_ids.to(dev), attention_mask=full_mask.to(dev), position_ids=positions.to(dev),
                           past_key_values=cache, use_cache=True)
        step_logits = torch.cat([last[idx.to(dev)][:, None, :], second.logits[:, :-1]], dim=1)
        r_ids, r_mask = r_ids.to(dev), r_mask.to(dev).bool()
        return token_logprobs_from_logits(step_logits, r_ids, self.config.temperature), r_mask

    def _update(self, traj: list[dict[str, Any]]) -> dict[str, Any]:
        """Policy update(s) on one sampled batch; returns loss statistics."""
        c = self.config
        seqs: list[_Seq] = []
        for r in traj:
            p, y = r["prompt_token_ids"], r["response_token_ids"]
            seqs.append(_Seq(ids=list(p) + list(y), start=len(p), n_resp=len(y), advantage=float(r["advantage"]),
                             old_logp=list(r["behaviour_logprobs"])))
        # Mini-batches: contiguous groups of prompts (whole groups stay together).
        n_groups = len(traj) // c.n
        per_mb = math.ceil(n_groups / c.mini_batches)
        for i, s in enumerate(seqs):
            s.mb = (i // c.n) // per_mb
        n_mb = max(s.mb for s in seqs) + 1 if seqs else 0
        keep = [s for s in seqs if s.n_resp > 0 and (s.advantage != 0.0 or c.kl_coef > 0)]
        stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_mean": math.nan, "ratio_max": math.nan,
                 "grad_norm": math.nan, "updates": 0, "seqs_trained": len(keep)}
        if not keep:
            return stats
        if c.old_logprobs == "recompute":
            with torch.no_grad():
                for chunk in _chunks(keep, math.ceil(len(keep) / c.grad_accum)):
                    logp, mask = self._forward_logprobs(self.policy, chunk)
                    for s, row, m in zip(chunk, logp.float().cpu(), mask.cpu()):
                        s.old_logp = row[m].tolist()
        tokens_seen, ratio_sum, ratio_max, clip_sum, kl_sum, grad_norms = 0, 0.0, 0.0, 0.0, 0.0, []
        loss_total, pg_total = 0.0, 0.0
        for mb in range(n_mb):
            mb_all = [s for s in seqs if s.mb == mb]
            mb_keep = [s for s in keep if s.mb == mb]
            if not mb_keep:
                continue
            n_tokens = sum(s.n_resp for s in mb_all)
            n_seqs = len(mb_all)
            self.optimizer.zero_grad(set_to_none=True)
            for chunk in _chunks(mb_keep, math.ceil(len(mb_keep) / c.grad_accum)):
                logp, mask = self._forward_logprobs(self.policy, chunk)
                old = torch.zeros_like(logp)
                for i, s in enumerate(chunk):
                    old[i, : s.n_resp] = torch.tensor(s.old_logp, dtype=old.dtype)
                adv = torch.tensor([s.advantage for s in chunk], dtype=logp.dtype, device=logp.device)
                ref = None
                if self.ref_policy is not None:
                    with torch.no_grad():
                        ref, _ = self._forward_logprobs(self.ref_policy, chunk)
                out = grpo_loss(logp, old, adv, mask, clip_low=c.clip_low, clip_high=c.clip_high, kl_coef=c.kl_coef,
                                ref_logp=ref, loss_agg=c.loss_agg, n_tokens=n_tokens, n_seqs=n_seqs)
                out.loss.backward()
                loss_total += float(out.loss.detach())
                pg_total += out.pg_loss
                tokens_seen += out.tokens
                ratio_sum += out.ratio_mean * out.tokens
                ratio_max = max(ratio_max, out.ratio_max)
                clip_sum += out.clip_fraction * out.tokens
                kl_sum += out.kl * out.tokens
            if c.max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
            else:
                gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.policy.parameters() if p.grad is not None))
            grad_norms.append(float(gn))
            self.optimizer.step()
            stats["updates"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        stats.update(loss=loss_total / max(stats["updates"], 1), pg_loss=pg_total / max(stats["updates"], 1),
                     kl=kl_sum / max(tokens_seen, 1), clip_frac=clip_sum / max(tokens_seen, 1),
                     ratio_mean=ratio_sum / max(tokens_seen, 1), ratio_max=ratio_max,
                     grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else math.nan)
        return stats

    def train_step(self) -> dict[str, Any]:
        """Sample, score, update, sync; append the step record to the log and return it."""
        c = self.config
        if self.sampler is None:
            raise BadConfigError("no prompt pool: pass TrainConfig(train=...) or call set_pool(rows)")
        t0 = time.perf_counter()
        rows = self.sampler.next(c.prompts_per_step)
        traj, gen_s = self.sample(rows, self.step)
        t_sample = time.perf_counter() - t0
        rewards = [r["reward"] for r in traj]
        zero_groups = sum(1 for r in traj if r["sample"] == 0 and r["zero_std"])
        t1 = time.perf_counter()
        with _threads(c.train_threads if self.device.type == "cpu" else None):
            self.policy.train()
            stats = self._update(traj)
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        if stats["updates"]:  # all groups zero-advantage: the weights did not change
            sync_weights(self.engine, self.policy)
        t_sync = time.perf_counter() - t2
        self.step += 1
        self.rollouts += len(traj)
        resp_lens = [len(r["response_token_ids"]) for r in traj]
        record = {
            "type": "step", "step": self.step, "rollouts": self.rollouts,
            "prompts": len(rows), "samples": len(traj),
            "reward_mean": sum(rewards) / len(rewards),
            "zero_adv_frac": zero_groups / max(len(rows), 1), "zero_adv_groups": zero_groups,
            "response_len_mean": sum(resp_lens) / len(resp_lens),
            "truncated_frac": sum(r["finish_reason"] == "length" for r in traj) / len(traj),
            "unparsed_frac": sum(not r.get("reward_parsed", True) for r in traj) / len(traj),
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in stats.items()},
            "seconds": time.perf_counter() - t0, "sample_s": t_sample, "generate_s": gen_s,
            "update_s": t_update, "sync_s": t_sync, "time": time.perf_counter() - self._t_start,
            "prompt_ids": [r["id"] for r in rows],
        }
        self._append_log(record)
        self.last_trajectories = traj
        return record

    def consume_rollouts(self, n: int, what: str = "selection") -> None:
        """Count ``n`` responses sampled outside the training steps (e.g. the curriculum's
        rollouts for influence scores) in ``rollouts``, with a ``{"type": "rollouts"}`` log line."""
        n = _int("n", n, 0)
        self.rollouts += n
        self._append_log({"type": "rollouts", "what": str(what), "n": n, "step": self.step,
                          "rollouts": self.rollouts, "time": time.perf_counter() - self._t_start})

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy and sampled pass@1 on every eval set with the live engine; logged."""
        from vllm import SamplingParams

        c = self.config
        t0 = time.perf_counter()
        max_tokens = c.eval_max_tokens or c.max_tokens
        record: dict[str, Any] = {"type": "eval", "step": self.step, "rollouts": self.rollouts,
                                  "greedy": {}, "sampled": {}, "n": {}}
        for name, rows in self.eval_sets.items():
            prompts = [{"prompt_token_ids": self._encode(r)} for r in rows]
            greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
            outs = self.engine.generate(prompts, greedy, use_tqdm=False)
            scores = [self._score(o.outputs[0].token_ids, r) for o, r in zip(outs, rows)]
            record["greedy"][name] = sum(scores) / len(scores)
            record["n"][name] = len(rows)
            if c.eval_samples > 0:
                params = [SamplingParams(n=c.eval_samples, temperature=c.temperature, max_tokens=max_tokens,
                                         seed=_derive_seed("eval", c.seed, name, r["id"]), detokenize=False)
                          for r in rows]
                outs = self.engine.generate(prompts, params, use_tqdm=False)
                per_prompt = [sum(self._score(s.token_ids, r) for s in o.outputs) / len(o.outputs)
                              for o, r in zip(outs, rows)]
                record["sampled"][name] = sum(per_prompt) / len(per_prompt)
        record["seconds"] = time.perf_counter() - t0
        record["time"] = time.perf_counter() - self._t_start
        self._append_log(record)
        self._last_eval_step = self.step
        if c.plots:
            plot_log(self.out)
        return record

    def _score(self, token_ids, row) -> float:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return float(self._reward_fn(text, row["answer"], stats=self.reward_stats))

    # ---------------------------------------------------------------- loop

    def run(self, steps: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
        """``steps`` more steps (default: up to ``config.steps``), evaluating at step 0 (when
        ``eval_at_start``), every ``eval_every`` steps and at the end. Returns the step records."""
        c = self.config
        steps = max(0, c.steps - self.step) if steps is None else _int("steps", steps, 0)
        records = []
        if self.eval_sets and c.eval_at_start and self.step == 0 and self._last_eval_step is None:
            self.evaluate()
        from tqdm.auto import tqdm

        with tqdm(total=steps, unit="step", desc="grpo", disable=not progress) as bar:
            for _ in range(steps):
                rec = self.train_step()
                records.append(rec)
                if self.eval_sets and c.eval_every and self.step % c.eval_every == 0:
                    ev = self.evaluate()
                    bar.write(self._eval_line(ev))
                if c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint(f"{PERIODIC_PREFIX}{self.step}")
                bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", zero=f"{rec['zero_adv_frac']:.2f}",
                                s=f"{rec['seconds']:.1f}")
                bar.update(1)
        if self.eval_sets and self._last_eval_step != self.step:
            ev = self.evaluate()
            if progress:
                tqdm.write(self._eval_line(ev))
        return records

    @staticmethod
    def _eval_line(ev: dict[str, Any]) -> str:
        parts = [f"{name} greedy {ev['greedy'][name]:.3f}"
                 + (f" sampled {ev['sampled'][name]:.3f}" if name in ev["sampled"] else "") for name in ev["greedy"]]
        return f"eval step {ev['step']} rollouts {ev['rollouts']}: " + ", ".join(parts)

    # ---------------------------------------------------------------- log

    def _append_log(self, record: dict[str, Any]) -> None:
        with open(self.out / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, name: str) -> Path:
        """Write ``out/checkpoints/<name>`` (HF model + tokenizer + trainer state) via a temp
        dir renamed on success; an existing checkpoint of that name is replaced. Returns its path."""
        if not name or "/" in name or name.startswith(".") or name == LATEST_NAME:
            raise BadConfigError(f"bad checkpoint name {name!r}")
        from .tiny_model import save_tokenizer

        ck_root = self.out / CKPT_DIR
        final = ck_root / name
        with atomic_dir(final, on_exists="replace") as tmp:
            with _quiet_hf():
                self.policy.save_pretrained(str(tmp), safe_serialization=True)
            save_tokenizer(self.tokenizer, tmp)
            log_path = self.out / LOG_NAME
            log_offset = log_path.stat().st_size if log_path.is_file() else 0
            sampler_state = None
            pool_saved = False
            if self.sampler is not None and hasattr(self.sampler, "state_dict") and hasattr(self.sampler, "rows"):
                sampler_state = self.sampler.state_dict()
                write_tasks(list(self.sampler.rows), tmp / POOL_NAME)
                pool_saved = True
            torch.save({
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate(),
                "sampler": sampler_state,
            }, tmp / STATE_PT)
            state = {
                "name": name, "step": self.step, "rollouts": self.rollouts, "log_offset": log_offset,
                "last_eval_step": self._last_eval_step, "pool_saved": pool_saved,
                "time": time.perf_counter() - self._t_start,
                "eval_sets": list(self.eval_sets), "saved_at": time.time(), "config": self.config.to_json(),
            }
            (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
        write_text_atomic(ck_root / LATEST_NAME, name + "\n")
        self._prune_periodic(ck_root)
        self._log_msg(f"checkpoint {final}")
        return final

    def _prune_periodic(self, ck_root: Path) -> None:
        periodic = []
        for p in ck_root.iterdir():
            if p.name.startswith(PERIODIC_PREFIX) and p.name[len(PERIODIC_PREFIX):].isdigit() and p.is_dir():
                periodic.append((int(p.name[len(PERIODIC_PREFIX):]), p))
        periodic.sort()
        for _, p in periodic[: max(0, len(periodic) - self.config.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)

    def _load_state(self, ckpt: Path) -> None:
        state = json.loads((ckpt / STATE_JSON).read_text())
        blob = torch.load(ckpt / STATE_PT, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        random.setstate(blob["python_rng"])
        self.step = int(state["step"])
        self.rollouts = int(state["rollouts"])
        self._last_eval_step = state.get("last_eval_step")
        self._t_start = time.perf_counter() - float(state.get("time", 0.0))  # "time" in the log continues
        if state.get("pool_saved"):
            sampler = PoolSampler(read_tasks(ckpt / POOL_NAME))
            sampler.load_state_dict(blob["sampler"])
            self.sampler = sampler
        # The log continues from what it held at the checkpoint.
        log_path = self.out / LOG_NAME
        offset = int(state["log_offset"])
        if log_path.is_file() and log_path.stat().st_size > offset:
            with open(log_path, "rb+") as fh:
                fh.seek(offset)
                tail = fh.read()
                with open(self.out / DISCARDED_LOG_NAME, "ab") as d:
                    d.write(tail)
                fh.truncate(offset)
        self._log_msg(f"resumed from {ckpt} at step {self.step} ({self.rollouts} rollouts)")

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Drop the engine (frees its KV cache) unless it was handed in by the caller."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and getattr(self, "_owns_engine", True):
            close_engine(engine)

    def __enter__(self) -> "GRPOTrainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
        steps_done = trainer.step - start_step
        last = records[-10:]
        summary = {
            "out": str(trainer.out), "checkpoint": str(ckpt) if ckpt else None, "step": trainer.step,
            "steps_run": steps_done, "rollouts": trainer.rollouts,
            "reward_mean_last10": sum(r["reward_mean"] for r in last) / len(last) if last else None,
            "sec_per_step": sum(r["seconds"] for r in records) / len(records) if records else None,
            "engine_start_s": trainer.engine_start_seconds, "seconds": time.perf_counter() - t0,
            "eval": evals[-1] if evals else None,
        }
    parts = [f"grpo: step {summary['step']} ({steps_done} run), {summary['rollouts']} rollouts"]
    if summary["reward_mean_last10"] is not None:
        parts.append(f"train reward (last {len(last)} steps) {summary['reward_mean_last10']:.3f}")
    if summary["eval"]:
        ev = summary["eval"]
        for name in ev["greedy"]:
            acc = f"eval {name} greedy {ev['greedy'][name]:.3f}"
            if name in ev["sampled"]:
                acc += f" sampled {ev['sampled'][name]:.3f}"
            parts.append(acc)
    if summary["sec_per_step"] is not None:
        parts.append(f"{summary['sec_per_step']:.2f}s/step")
    summary["line"] = ", ".join(parts) + f", {summary['seconds']:.0f}s -> {summary['checkpoint'] or summary['out']}"
    return summary


def _chunks(items: list, size: int) -> Iterable[list]:
    size = max(1, size)
    for i in range(0, len(items), size):
        yield items[i: i + size]

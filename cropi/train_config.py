"""GRPO training settings: one dataclass, the defaults and help text of the library and of the
``cropi grpo/train/compare`` flags alike."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sketchstore.options import option

from .checks import check_choice, check_device, check_float, check_int
from .errors import BadConfigError
from .grpo import DEFAULT_LOSS_AGG, LOSS_AGGS
from .rewards import list_rewards

OLD_LOGPROBS = ("behaviour", "recompute")
DTYPES = ("float32", "bfloat16")
# Measured on the embedded small policy: 2e-4 halves its greedy accuracy in 10 steps (Adam
# moves every weight ~lr per step along a noisy RL gradient); 3e-5..6e-5 improve it slowly.
DEFAULT_LR = 5e-5
DEFAULT_EVAL_EVERY = 10
DEFAULT_EVAL_N = 128


@dataclass
class TrainConfig:
    """GRPO training settings. Invalid values raise :class:`BadConfigError` naming the field.

    ``train``: task rows or a task file (any layout :func:`cropi.tasks.read_tasks` reads); None
    when the caller sets the pool (``GRPOTrainer.set_pool``, the curriculum). ``eval_sets``:
    ``{name: rows or file}`` (a bare file / row list is named "eval").
    """

    model: Path = option(help="Initial policy: local HF checkpoint directory (also the KL reference).")
    out: Path = option(help="Run directory (log.jsonl, plots, checkpoints/).")
    train: Any = option(None, "Training tasks (the whole file is the pool).", flag="data")
    eval_sets: Any = option(None, "Held-out tasks: FILE or NAME=FILE (repeatable).", flag="eval")
    steps: int = option(100, "Total GRPO steps.")
    prompts_per_step: int = option(16, "Prompts per GRPO step.")
    n: int = option(8, "Samples per prompt (K >= 2).")
    max_tokens: int = option(48, "Response token limit.")
    temperature: float = option(1.0, "Sampling temperature of training rollouts and sampled evaluations.")
    lr: float = option(DEFAULT_LR, "AdamW learning rate (pretrained LLMs: ~1e-6).")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only).")
    betas: tuple[float, float] = option((0.9, 0.99), "AdamW betas.")
    grad_accum: int = option(1, "Micro-batches per optimiser update (memory only).")
    mini_batches: int = option(1, "Optimiser updates per sampled batch (> 1: later ones are off-policy and clipped).")
    clip_low: float = option(0.2, "PPO clip epsilon, low side.")
    clip_high: float | None = option(None, "PPO clip epsilon, high side (DAPO clip-higher) [default: --clip-low].")
    kl_coef: float = option(0.0, "k3 KL coefficient to the initial policy (0: none, as DAPO / Dr. GRPO).")
    loss_agg: str = option(DEFAULT_LOSS_AGG, "Loss aggregation.", choices=LOSS_AGGS)
    old_logprobs: str = option("behaviour", "Old log-probs: the engine's (behaviour) or recomputed by the trainer.",
                               choices=OLD_LOGPROBS)
    share_prompt: bool = option(True, "One prompt forward per group in the update (same values, faster).")
    max_grad_norm: float | None = option(1.0, "Gradient clipping norm (library: None for no clipping).")
    dtype: str = option("float32", "float32, or bfloat16 autocast and a bf16 engine.", choices=DTYPES)
    eval_every: int = option(DEFAULT_EVAL_EVERY, "Steps between evaluations (0: start and end only).")
    eval_n: int | None = option(DEFAULT_EVAL_N, "Rows used per eval set (first N; none: all).")
    eval_samples: int = option(4, "Samples per eval prompt for sampled pass@1 (0: greedy only).")
    eval_max_tokens: int | None = option(None, "Response token limit of evaluations [default: --max-tokens].")
    eval_at_start: bool = option(True, "Evaluate before the first step.")
    save_every: int = option(0, "Periodic checkpoints step-N every N steps (0: none; stage and final ones always).")
    keep_checkpoints: int = option(2, "Periodic checkpoints kept (named ones are never deleted).")
    seed: int = option(0, "Run seed (prompt order, sampling, evaluation).")
    device: str = option("cpu", "Torch device of the policy: cpu, cuda or cuda:N.")
    threads: int | None = option(None, "CPU engine (and default training) torch threads [default: OMP_NUM_THREADS, "
                                       "else 1].")
    train_threads: int | None = option(None, "Torch threads during the policy update on CPU [default: --threads].")
    reward: str = option("math_verify", "Reward function (cropi.rewards.list_rewards()).")
    max_model_len: int | None = option(None, "Engine context limit [default: the model's].")
    kv_cache_gib: float = option(1.0, "CPU engine KV cache, GiB.")
    gpu_memory_utilization: float = option(0.3, "Share of GPU memory the engine may take.")
    resume: bool = option(False, "Continue from the newest checkpoint in --out.")
    plots: bool = option(True, "Write accuracy plots after each evaluation.")

    def __post_init__(self) -> None:
        self.model, self.out = Path(self.model), Path(self.out)
        for name, minimum in (("steps", 0), ("prompts_per_step", 1), ("n", 1), ("max_tokens", 1), ("grad_accum", 1),
                              ("mini_batches", 1), ("eval_every", 0), ("eval_samples", 0), ("save_every", 0),
                              ("keep_checkpoints", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        for name in ("eval_n", "eval_max_tokens", "threads", "train_threads", "max_model_len"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.n < 2:
            raise BadConfigError(f"n (samples per prompt) must be >= 2 for group advantages, got {self.n}")
        self.temperature = check_float("temperature", self.temperature, 0.0, strict=True)
        self.lr = check_float("lr", self.lr, 0.0, strict=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        self.clip_low = check_float("clip_low", self.clip_low, 0.0)
        if self.clip_low >= 1:
            raise BadConfigError(f"clip_low must be < 1, got {self.clip_low}")
        if self.clip_high is not None:
            self.clip_high = check_float("clip_high", self.clip_high, 0.0)
        self.kl_coef = check_float("kl_coef", self.kl_coef, 0.0)
        self.kv_cache_gib = check_float("kv_cache_gib", self.kv_cache_gib, 0.0, strict=True)
        self.gpu_memory_utilization = check_float("gpu_memory_utilization", self.gpu_memory_utilization, 0.0, strict=True)
        if self.max_grad_norm is not None:
            self.max_grad_norm = check_float("max_grad_norm", self.max_grad_norm, 0.0, strict=True)
        try:
            b1, b2 = (float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise BadConfigError(f"betas must be two numbers, got {self.betas!r}") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise BadConfigError(f"betas must be in [0, 1), got {self.betas!r}")
        self.betas = (b1, b2)
        for name, allowed in (("loss_agg", LOSS_AGGS), ("old_logprobs", OLD_LOGPROBS), ("dtype", DTYPES),
                              ("reward", tuple(list_rewards()))):
            check_choice(name, getattr(self, name), allowed)
        check_device(self.device)
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

    @classmethod
    def from_json(cls, saved: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """The config a run saved (``to_json``), with ``overrides``; rows and eval sets come from the run."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in saved.items() if k in names}
        kwargs.update(train=None, eval_sets=None)
        kwargs.update(overrides)
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

"""The testbed's warm-started policy: a small Qwen2 trained by SFT on noisy-label references.

:func:`ensure_testbed_model` builds (or finds in the cache) the policy GRPO starts from. Its
references use each family's right procedure only ``label_accuracy`` of the time
(:func:`cropi.testbed.sft_rows`), so the policy samples the right procedure with about that
probability: pass@k well above pass@1, room for RL (measured: benchmarks/README.md, "RL
testbed").

Cache key (:func:`recipe_key`): a hash of every setting of :class:`WarmRecipe` (model size
and its dimensions, steps, batch size, learning rate, weight decay, seed, the family
mixture with label accuracies, weights and levels), the tokenizer's vocabulary size and
position limit, :data:`cropi.families.FAMILIES_VERSION` and :data:`RECIPE_VERSION`. The
torch thread count is not in it: on this machine 1, 2 and 3 threads give bit-identical
weights (measured, benchmarks/testbed.py ``--thread-check``), so any count may train it.
``warm_start.json`` records the weights' fingerprint, so a run on another machine (other
CPU kernels, other torch) can see whether it reproduced this one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sketchstore.atomic import write_text_atomic
from sketchstore.gradients import model_fingerprint
from sketchstore.options import option

from .errors import BadConfigError
from .families import FAMILIES_VERSION
from .testbed import DEFAULT_FAMILIES, FamilySpec, sft_rows
from .threads import torch_threads
from .tiny_model import (
    DEFAULT_VOCAB,
    MAX_POSITIONS,
    MODEL_SIZES,
    build_cached,
    build_tiny_model,
    count_params,
    encode_sft,
    load_policy,
    save_tokenizer,
    sft_train,
)

__all__ = ["RECIPE_VERSION", "WarmRecipe", "recipe_key", "train_testbed_model", "ensure_testbed_model",
           "weights_fingerprint"]

# Bump when the training procedure changes in a way the recipe's fields do not capture.
RECIPE_VERSION = 1
RECORD_NAME = "warm_start.json"
# Seed stream of the warm start's data (distinct from the pool/val/eval streams by its tag).
DATA_SEED_OFFSET = 5_000_011


@dataclass(frozen=True)
class WarmRecipe:
    """Settings of the testbed warm start (all of them are in the cache key)."""

    size: str = option("tiny", "cropi.tiny_model model size")
    steps: int = option(2000, "SFT steps")
    batch_size: int = option(32, "references per step")
    lr: float = option(3e-3, "peak AdamW learning rate (warmup + cosine)")
    weight_decay: float = option(0.01, "AdamW weight decay of matrices")
    seed: int = option(0, "initialisation and data seed")
    families: tuple[FamilySpec, ...] = option(DEFAULT_FAMILIES, "the family mixture (label accuracy, weight and levels of each)")

    def __post_init__(self) -> None:
        if self.size not in MODEL_SIZES:
            raise BadConfigError(f"unknown model size {self.size!r}; known: {sorted(MODEL_SIZES)}")
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not self.lr > 0:
            raise BadConfigError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise BadConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.families:
            raise BadConfigError("the warm start needs at least one family")
        object.__setattr__(self, "families", tuple(self.families))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "families": [asdict(f) for f in self.families]}


def recipe_key(recipe: WarmRecipe) -> str:
    """Cache directory name of the recipe's model: size, seed and a hash of everything else."""
    blob = json.dumps({"v": RECIPE_VERSION, "families_v": FAMILIES_VERSION, "dims": MODEL_SIZES[recipe.size],
                       "vocab": DEFAULT_VOCAB, "max_pos": MAX_POSITIONS, **recipe.to_json()}, sort_keys=True)
    return f"testbed-{recipe.size}-seed{recipe.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def weights_fingerprint(model) -> str:
    """Hash of a model's parameter names and values (equal only for bit-identical weights)."""
    return model_fingerprint(model.named_parameters())


def train_testbed_model(init_dir: str | os.PathLike, out_dir: str | os.PathLike, recipe: WarmRecipe,
                        threads: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """SFT of the model in ``init_dir`` on ``recipe.steps * recipe.batch_size`` references of
    :func:`cropi.testbed.sft_rows`; saves model, tokenizer and ``warm_start.json`` (the
    record returned: losses, seconds, threads, weights fingerprint) to ``out_dir``.
    ``threads``: torch threads while training (default: all cores)."""
    threads = threads or os.cpu_count() or 1
    with torch_threads(threads):
        torch.manual_seed(recipe.seed)
        model, tok = load_policy(init_dir)
        model.train()
        rows = sft_rows(recipe.families, recipe.steps * recipe.batch_size, seed=DATA_SEED_OFFSET + recipe.seed)
        data = encode_sft(tok, rows)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = sft_train(model, data, tok.pad_token_id, recipe.steps, recipe.batch_size, recipe.lr,
                           recipe.weight_decay, log, log_every=250)
        record = {
            "recipe": recipe.to_json(), "key": recipe_key(recipe), "params": count_params(model),
            "threads": threads, "torch": torch.__version__,
            "train_seconds": time.perf_counter() - t0, "train_cpu_seconds": time.process_time() - c0,
            "train_tokens": sum(len(ids) for ids, _ in data),
            "initial_loss": losses[0], "final_loss": sum(losses[-50:]) / len(losses[-50:]), "losses": losses,
            "fingerprint": weights_fingerprint(model),
        }
        model.eval()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        save_tokenizer(tok, out)
        write_text_atomic(out / RECORD_NAME, json.dumps(record, indent=1) + "\n")
    return record


def ensure_testbed_model(cache_dir: str | os.PathLike, recipe: WarmRecipe = WarmRecipe(), threads: int | None = None,
                         log: Callable[[str], None] | None = None) -> Path:
    """Directory of the recipe's warm-started policy under ``cache_dir`` (named by
    :func:`recipe_key`), trained only when not cached; built in a temporary directory renamed
    into place on success (see :func:`cropi.tiny_model.build_cached`)."""
    final = Path(cache_dir) / recipe_key(recipe)

    def build(model_dir: Path, scratch: Path) -> None:
        build_tiny_model(scratch, size=recipe.size, seed=recipe.seed)
        if log:
            log(f"training the testbed warm start ({recipe.size}, {recipe.steps} steps) into {final}")
        train_testbed_model(scratch, model_dir, recipe, threads=threads, log=log)

    return build_cached(final, build, marker=RECORD_NAME)

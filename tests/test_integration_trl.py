"""CROPI inside TRL's GRPOTrainer, for real on CPU: the tiny local policy generates with
transformers (use_vllm=False), a reward function scores it, and at the stage boundary the
prompts TRL trains on change to the CROPI selection made at the stage checkpoint."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from cropi.errors import BadConfigError
from cropi.integrations.stages import StageSelector
from cropi.integrations.trl import CROPICallback, run_trl_stages
from cropi.rollout import group_advantages
from cropi.threads import torch_threads
from cropi.tasks import generate_tasks
from cropi.trajectory import PartWriter, Trajectory
from sketchstore import ProjectionSpec
from sketchstore.prompts import encode_prompt

K = 4  # behaviour samples per prompt
TOKENS = 8  # completion length, behaviour and GRPO
TEMPERATURE = 1.0
NUM_GENERATIONS = 2
PROMPTS_PER_STEP = 2


def digit_reward(text: str) -> float:
    """The share of the completion's characters that are digits: a graded reward the untrained
    tiny policy earns in part, so most prompt groups have advantages and POPI gradients."""
    chars = [ch for ch in text if not ch.isspace()]
    return sum(ch.isdigit() for ch in chars) / len(chars) if chars else 0.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny policy is latency-bound: one torch thread (a busy 2-core machine runs it 10x faster)."""
    with torch_threads(1):
        yield


def sample_behaviour(model_dir, rows, out, seed):
    """Behaviour trajectories in the `cropi rollout` schema, sampled from the HF model at
    TEMPERATURE with the log-probs of the distribution sampled from."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    trajectories = []
    for row in rows:
        prompt = encode_prompt(tok, row["prompt"])
        ids = torch.tensor([prompt] * K)
        logps = []
        with torch.no_grad():
            for _ in range(TOKENS):
                logits = torch.log_softmax(model(input_ids=ids).logits[:, -1] / TEMPERATURE, -1)
                token = torch.multinomial(logits.exp(), 1, generator=gen)
                logps.append(logits.gather(1, token))
                ids = torch.cat([ids, token], 1)
        responses = ids[:, len(prompt):].tolist()
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        rewards = [digit_reward(t) for t in texts]
        advantages, mean, std, zero = group_advantages(rewards)
        logps = torch.cat(logps, 1).tolist()
        trajectories += [Trajectory(prompt_id=row["id"], behaviour="beta", sample=k, prompt=row["prompt"],
                                    prompt_token_ids=prompt, response_token_ids=responses[k],
                                    behaviour_logprobs=logps[k], response=texts[k], temperature=TEMPERATURE,
                                    top_p=1.0, reward=rewards[k], advantage=advantages[k], group_mean=mean,
                                    group_std=std, pass_rate=mean, zero_std=zero) for k in range(K)]
    PartWriter(out).write(trajectories)
    return out


@pytest.fixture(scope="module")
def setting(tiny_model, tmp_path_factory):
    """(pool rows, pool trajectories, validation trajectories): 8 pool prompts, 3 validation."""
    root = tmp_path_factory.mktemp("trl")
    pool = generate_tasks(8, seed=11)
    val = generate_tasks(3, seed=12)
    return pool, sample_behaviour(tiny_model, pool, root / "pool.parquet", 0), \
        sample_behaviour(tiny_model, val, root / "val.parquet", 1)


def user_dataset(pool):
    """The user's TRL dataset: conversational prompts (TRL applies the chat template, as
    `cropi rollout` does), an id column and the answer column the reward function reads."""
    return Dataset.from_list([{"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}],
                               "answer": r["answer"]} for r in pool])


class Recorder:
    """A TRL reward function that records the ids of each generation batch, in order."""

    def __init__(self, answers):
        self.answers = answers
        self.batches = []
        self.__name__ = "digit"

    def __call__(self, prompts, completions, id, answer, **kwargs):
        assert all(self.answers[i] == a for i, a in zip(id, answer))  # the user's row, whole
        self.batches.append(list(id))
        return [digit_reward(c[0]["content"]) for c in completions]


def grpo_args(out, **extra):
    return GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
                      num_generations=NUM_GENERATIONS, max_completion_length=TOKENS, temperature=TEMPERATURE,
                      learning_rate=0.05, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True, **extra)


def selector(out, pool_traj, val_traj):
    return StageSelector(out=out, pool=pool_traj, val={"v": val_traj}, fraction=PROMPTS_PER_STEP / 8,
                         spec=ProjectionSpec(dim=256, seed=0), log=lambda line: None)


def stages_of(batches, steps_per_stage):
    """Per stage: the ids of its generation batches, each checked to hold every prompt
    NUM_GENERATIONS times in a row (TRL's grouping)."""
    out = []
    for b in batches:
        assert all(b[i] == b[i + 1] for i in range(0, len(b), NUM_GENERATIONS)), b
        out.append(b[::NUM_GENERATIONS])
    return [sorted(sum(out[s:s + steps_per_stage], [])) for s in range(0, len(out), steps_per_stage)]


def test_callback_swaps_prompts_to_each_stage_selection(tiny_model, setting, tmp_path):
    pool, pool_traj, val_traj = setting
    sel = selector(tmp_path / "cropi", pool_traj, val_traj)
    cropi = CROPICallback(sel, user_dataset(pool), log=lambda line: None)
    reward = Recorder({r["id"]: r["answer"] for r in pool})
    trainer = GRPOTrainer(model=str(tiny_model), reward_funcs=reward, train_dataset=cropi.train_dataset,
                          args=grpo_args(tmp_path / "trl", num_train_epochs=2), callbacks=[cropi])
    trainer.train()
    chosen = [sel.saved(s) for s in range(2)]
    assert chosen[0] != chosen[1]  # the stage boundary really changes the prompts
    assert stages_of(reward.batches, 1) == [sorted(c) for c in chosen]
    assert (tmp_path / "cropi" / "checkpoints" / "stage1" / "config.json").is_file()
    assert sel.saved(2) is None  # no selection after the last epoch


def test_stage_loop_restarts_grpo_trainer_on_each_selection(tiny_model, setting, tmp_path):
    pool, pool_traj, val_traj = setting
    sel = selector(tmp_path / "cropi", pool_traj, val_traj)
    reward = Recorder({r["id"]: r["answer"] for r in pool})
    args = grpo_args(tmp_path / "trl")
    selections = run_trl_stages(tiny_model, user_dataset(pool), reward, args, sel, stages=2, steps_per_stage=1)
    assert selections[0] != selections[1]
    assert stages_of(reward.batches, 1) == [sorted(s) for s in selections]
    # stage 1 resumed stage 0's trainer checkpoint (optimizer and step), and was selected at it
    assert (tmp_path / "trl" / "checkpoint-1" / "optimizer.pt").is_file()
    assert (tmp_path / "trl" / "checkpoint-2" / "trainer_state.json").is_file()
    again = run_trl_stages(tiny_model, user_dataset(pool), reward, args, sel, stages=2, steps_per_stage=1)
    assert again == selections and len(reward.batches) == 2  # a finished run is read back, not retrained


def test_bad_inputs(setting, tmp_path):
    pool, pool_traj, val_traj = setting
    with pytest.raises(BadConfigError, match="id column 'key'"):
        CROPICallback(selector(tmp_path, pool_traj, val_traj), user_dataset(pool), id_column="key")
    with pytest.raises(BadConfigError, match="fill 'fewer'"):
        CROPICallback(StageSelector(out=tmp_path, pool=pool_traj, val={"v": val_traj}, fill="fewer"),
                      user_dataset(pool))
    with pytest.raises(BadConfigError, match="not found"):
        StageSelector(out=tmp_path, pool=tmp_path / "missing", val={"v": val_traj})

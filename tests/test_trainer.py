"""GRPO loss/advantages against hand computations, and the trainer on a real vLLM engine.

The engine part runs this file as a script in a subprocess (``python tests/test_trainer.py
engine-check ...``): an in-process CPU engine replaces ``torch.set_num_threads`` for the
whole process, which must not leak into the pytest process. One engine start in total: the
resumed trainer reuses the first trainer's live engine (``GRPOTrainer.resume(engine=...)``),
which also exercises syncing checkpoint weights into a running engine.

Reward of the engine check: ``parity`` (1 when the decoded response has an even number of
characters) -- the random tiny model never answers arithmetic, and this gives mixed groups
(and some zero-std ones) so every step really updates the policy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cropi.errors import BadConfigError
from cropi.grpo import ADVANTAGE_EPS, aggregate, batch_advantages, clipped_surrogate, grpo_loss, kl_k3
from cropi.policy import Policy, ResponseSeq, load_causal_lm
from cropi.popi import response_logprobs
from cropi.sampler import PoolSampler
from cropi.tasks import generate_tasks
from cropi.train_config import TrainConfig
from cropi.trajectory import Trajectory
from cropi.update import UpdateSettings, grpo_update, make_optimizer
from sketchstore.prompts import encode_prompt
from sketchstore.sequences import token_logprobs

P, K, MAX_TOKENS, STEPS_A, STEPS_B = 4, 4, 10, 2, 2
CROPI = str(Path(sys.executable).with_name("cropi"))


# --------------------------------------------------------------------------------------
# cropi.grpo: pure functions
# --------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    advs, zero = batch_advantages([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + ADVANTAGE_EPS)
    assert advs[0] == pytest.approx([a, -a, -a, a], rel=1e-12)
    assert advs[1] == [0.0] * 4 and zero == [False, True, False]  # zero-std group: all advantages 0
    std3 = math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3)
    assert advs[2][3] == pytest.approx(0.75 / (std3 + ADVANTAGE_EPS), rel=1e-12)
    assert advs[2][0] == pytest.approx(-0.25 / (std3 + ADVANTAGE_EPS), rel=1e-12)


def test_token_logprobs_use_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    targets = torch.tensor([0, 2])
    for T in (1.0, 0.7):
        z = logits / T
        want = [z[0, 0] - torch.logsumexp(z[0], 0), z[1, 2] - torch.logsumexp(z[1], 0)]
        got = token_logprobs(logits, targets, T)
        assert torch.allclose(got, torch.stack(want), atol=1e-6)
    assert not torch.allclose(token_logprobs(logits, targets, 0.7),
                              token_logprobs(logits, targets, 1.0), atol=1e-2)


def test_clipped_surrogate_active_and_inactive():
    # ratios 1.5, 1.5, 0.5, 0.5, 1.1 with advantages +1, -1, +1, -1, +2; eps 0.2
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.zeros(5)
    logp = torch.log(ratio).requires_grad_(True)
    loss, r, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # -min(r A, clip(r) A): -min(1.5, 1.2) = -1.2 | -min(-1.5, -1.2) = 1.5 | -min(.5, .8) = -.5
    #                       | -min(-.5, -.8) = .8 | -min(2.2, 2.2) = -2.2
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2]), atol=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d/dlogp of -r A = -r A where unclipped, 0 where the clipped branch is taken
    assert torch.allclose(logp.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2]), atol=1e-6)
    # asymmetric clip (clip-higher): 1.5 with eps_high 0.6 is inside the trust region
    loss2, _, clipped2 = clipped_surrogate(torch.log(ratio), old, adv, 0.2, 0.6)
    assert loss2[0].item() == pytest.approx(-1.5) and not clipped2[0]


def test_aggregation_token_vs_sequence_and_microbatches():
    per_tok = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert aggregate(per_tok, mask, "token-mean").item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert aggregate(per_tok, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 12 / 3) / 2)
    # split into micro-batches with the batch totals: sums to the whole-batch value
    for mode in ("token-mean", "seq-mean-token-mean"):
        parts = sum(aggregate(per_tok[i:i + 1], mask[i:i + 1], mode, n_tokens=4, n_seqs=2) for i in range(2))
        assert parts.item() == pytest.approx(aggregate(per_tok, mask, mode).item())
    with pytest.raises(ValueError):
        aggregate(per_tok, mask, "sum")


def test_grpo_loss_with_kl_and_padding():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.4, 0.1]]))
    old = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.4), -math.inf]])  # -inf: padding
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.4, 0.3]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0])
    out = grpo_loss(logp, old, adv, mask, clip_low=0.2, kl_coef=0.1, ref_logp=ref, loss_agg="token-mean")
    # tokens: (r=1, A=1) -> -1 ; (r=.5, A=1) -> -min(.5, .8) = -.5 ; (r=1, A=-2) -> 2
    pg = (-1 - 0.5 + 2) / 3
    # k3: e^d - d - 1, d = ref - logp: d = log .5, 0, 0
    kl = (0.5 - math.log(0.5) - 1) / 3
    assert out.pg_loss == pytest.approx(pg, abs=1e-6)
    assert out.loss.item() == pytest.approx(pg + 0.1 * kl, abs=1e-6)
    assert out.kl == pytest.approx(kl, abs=1e-6)
    assert out.clip_fraction == pytest.approx(0.0) and out.tokens == 3 and math.isfinite(out.loss.item())
    assert kl_k3(torch.tensor(-1.0), torch.tensor(-1.0)).item() == 0.0
    seq = grpo_loss(logp, old, adv, mask, loss_agg="seq-mean-token-mean")
    assert seq.pg_loss == pytest.approx(((-1 - 0.5) / 2 + 2) / 2, abs=1e-6)
    with pytest.raises(ValueError):
        grpo_loss(logp, old, adv, mask, kl_coef=0.1)


# --------------------------------------------------------------------------------------
# Trainer without an engine: config, sampler, the update itself
# --------------------------------------------------------------------------------------


def test_config_validation(tiny_model, tmp_path):
    ok = dict(model=tiny_model, out=tmp_path / "run")
    TrainConfig(**ok)
    TrainConfig(**ok, device="cuda:3")  # torchrun's cuda:$LOCAL_RANK
    for bad in (dict(n=1), dict(prompts_per_step=0), dict(lr=0), dict(loss_agg="sum"), dict(dtype="fp8"),
                dict(device="tpu"), dict(device="cuda:x"), dict(old_logprobs="x"), dict(clip_low=1.5),
                dict(temperature=0), dict(reward="nope"), dict(eval_sets={"a/b": []}), dict(steps=-1),
                dict(model=tmp_path / "nomodel"), dict(train=tmp_path / "missing.jsonl")):
        with pytest.raises(BadConfigError):
            TrainConfig(**{**ok, **bad})


def test_pool_sampler_epochs_and_state():
    rows = [{"id": str(i), "prompt": f"p{i}", "answer": "1"} for i in range(5)]
    s = PoolSampler(rows, seed=3)
    first = [r["id"] for r in s.next(3)] + [r["id"] for r in s.next(2)]
    assert sorted(first) == [str(i) for i in range(5)]  # one epoch = a permutation
    state = s.state_dict()
    nxt = [r["id"] for r in s.next(7)]
    s2 = PoolSampler(rows, seed=0)
    s2.load_state_dict(state)
    assert [r["id"] for r in s2.next(7)] == nxt
    assert [r["id"] for r in PoolSampler(rows, seed=3).next(5)] == first


@pytest.fixture()
def policy(tiny_model):
    """The tiny model as a trainable policy at temperature 0.8."""
    from cropi.tiny_model import load_tokenizer

    model = load_causal_lm(tiny_model, torch.device("cpu"))
    return Policy(model, load_tokenizer(tiny_model), temperature=0.8)


def _fake_trajectories(policy, advantages, lengths, seed=0):
    """Trajectory records whose behaviour log-probs are the policy's own."""
    gen = torch.Generator().manual_seed(seed)
    tasks = generate_tasks(len(advantages), seed=5, difficulty=1, families="arith")
    traj = []
    for task, advs, lens in zip(tasks, advantages, lengths):
        prompt = encode_prompt(policy.tokenizer, task["prompt"])
        responses = [torch.randint(10, 300, (n,), generator=gen).tolist() for n in lens]
        with torch.no_grad():
            behaviour = response_logprobs(policy.model, prompt, responses, policy.temperature)
        for j, (y, a, b) in enumerate(zip(responses, advs, behaviour)):
            traj.append(Trajectory(prompt_id=task["id"], behaviour="b", sample=j, prompt=task["prompt"], answer="1",
                                   prompt_token_ids=prompt, response_token_ids=y, behaviour_logprobs=b.tolist(),
                                   response="", finish_reason="length", temperature=policy.temperature, top_p=1.0,
                                   reward=float(a > 0), reward_parsed=True, advantage=a,
                                   zero_std=all(x == 0 for x in advs)))
    return traj


def _manual_grads(policy, traj, agg):
    """Gradient of the GRPO loss (ratio = 1 at the behaviour policy) computed independently."""
    import copy

    model = copy.deepcopy(policy.model)
    model.zero_grad()
    total_tokens = sum(len(t.response_token_ids) for t in traj)
    loss = 0.0
    for t in traj:
        logp = response_logprobs(model, t.prompt_token_ids, [t.response_token_ids], policy.temperature)[0]
        ratio = torch.exp(logp - torch.tensor(t.behaviour_logprobs))
        if agg == "token-mean":
            loss = loss - (ratio * t.advantage).sum() / total_tokens
        else:
            loss = loss - (ratio * t.advantage).mean() / len(traj)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("agg,grad_accum", [("token-mean", 1), ("token-mean", 3), ("seq-mean-token-mean", 2)])
def test_update_matches_manual_loss(policy, agg, grad_accum):
    """Zero-advantage group skipped but counted in the denominators; micro-batching exact."""
    traj = _fake_trajectories(policy, [[1.0, -0.5, -0.5], [0.0, 0.0, 0.0], [0.7, 0.7, -1.4]],
                              [[3, 5, 2], [4, 4, 6], [1, 7, 3]])
    want_loss, want_grads = _manual_grads(policy, traj, agg)
    optimizer = make_optimizer(policy.model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    seen = {}

    def capture():
        seen.update({n: p.grad.clone() for n, p in policy.model.named_parameters()})

    optimizer.step = capture
    stats = grpo_update(policy, optimizer, traj, UpdateSettings(n=3, loss_agg=agg, grad_accum=grad_accum,
                                                                max_grad_norm=None))
    assert stats.seqs_trained == 6 and stats.updates == 1
    assert stats.loss == pytest.approx(want_loss, abs=1e-5)
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-5) and stats.clip_frac == 0.0
    for name, g in want_grads.items():
        assert torch.allclose(seen[name], g, atol=1e-6, rtol=1e-4), name


def test_shared_prompt_forward_equals_plain(policy):
    """The shared-prompt forward (prompt once, KV gathered per response, padding gap masked)
    gives the plain padded forward's log-probs and gradients."""
    from dataclasses import replace

    traj = _fake_trajectories(policy, [[1.0, 0.0, -1.0], [0.5, 0.5, -1.0]], [[3, 6, 1], [5, 2, 4]])
    traj.append(replace(traj[0], prompt_token_ids=traj[0].prompt_token_ids[:-4]))  # a shorter, unique prompt
    seqs = [ResponseSeq.from_trajectory(t) for t in traj]
    assert len({tuple(t.prompt_token_ids) for t in traj}) == 3
    results = {}
    for share in (True, False):
        policy.share_prompt = share
        policy.model.zero_grad()
        logp, mask = policy.logprobs(seqs)
        (logp * mask).sum().backward()
        results[share] = (logp.detach(), mask, {n: p.grad.clone() for n, p in policy.model.named_parameters()})
    (a, ma, ga), (b, mb, gb) = results[True], results[False]
    assert torch.equal(ma, mb)
    assert torch.allclose(a[ma], b[mb], atol=1e-5)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


def test_update_mini_batches_and_recompute(policy):
    """Two optimiser updates per batch: the second mini-batch sees a changed policy (ratio != 1,
    clip can act); with recompute the old log-probs come from the HF policy."""
    from dataclasses import replace

    traj = _fake_trajectories(policy, [[1.0, -1.0], [1.0, -1.0]], [[4, 4], [4, 4]])
    traj = [replace(t, behaviour_logprobs=[0.0] * len(t.response_token_ids)) for t in traj]  # wrong: must not be used
    optimizer = make_optimizer(policy.model, lr=0.05, betas=(0.9, 0.99), weight_decay=0.0)
    stats = grpo_update(policy, optimizer, traj, UpdateSettings(n=2, mini_batches=2, old_logprobs="recompute"))
    assert stats.updates == 2
    assert stats.ratio_max > 1.0 + 1e-3  # second mini-batch: policy moved after the first update
    assert stats.ratio_mean < 5  # not exp(0 - logp) (~ vocabulary size): recomputed old log-probs


# --------------------------------------------------------------------------------------
# Trainer on a real engine (subprocess)
# --------------------------------------------------------------------------------------


def _engine_check(model: str, out: str) -> dict:
    """Run in the subprocess: train, check sync, checkpoint, continue, resume; return facts."""

    from transformers import AutoModelForCausalLM

    from cropi.rewards import register_reward
    from cropi.run_dir import read_log
    from cropi.trainer import GRPOTrainer
    from cropi.tiny_model import load_tokenizer

    register_reward("parity", lambda response, answer, stats=None: float(len(response) % 2 == 0), overwrite=True)
    out = Path(out)
    facts: dict = {}
    cfg = TrainConfig(model=Path(model), out=out, train=generate_tasks(40, seed=1, difficulty=1, families="arith"),
                      eval_sets={"d1": generate_tasks(6, seed=2, difficulty=1, families="arith")},
                      prompts_per_step=P, n=K, max_tokens=MAX_TOKENS, temperature=0.9, lr=2e-2, eval_every=2,
                      eval_samples=2, reward="parity", seed=7)
    trainer = GRPOTrainer(cfg)
    facts["engine_start_s"] = trainer.engine_start_seconds
    trainer.run(STEPS_A)

    # weight sync: the engine now samples from the updated HF policy, not the initial one
    initial = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    traj, _ = trainer.sample(cfg.train[:2], "sync-check")
    seqs = [ResponseSeq.from_trajectory(t) for t in traj]
    with torch.no_grad():
        now, mask = trainer.policy_logprobs.logprobs(seqs)
        before, _ = trainer.policy_logprobs.logprobs(seqs, model=initial)
    engine_lp = torch.zeros_like(now)
    for i, t in enumerate(traj):
        engine_lp[i, : len(t.behaviour_logprobs)] = torch.tensor(t.behaviour_logprobs)
    facts["sync_vs_policy"] = float(((engine_lp - now).abs() * mask).max())
    facts["sync_vs_initial"] = float(((engine_lp - before).abs() * mask).max())

    ckpt = trainer.save_checkpoint("stage0")
    reloaded = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    facts["ckpt_max_param_diff"] = max(float((a - b).abs().max()) for a, b in
                                       zip(reloaded.state_dict().values(), trainer.policy.state_dict().values()))
    facts["ckpt_tokenizer_ok"] = load_tokenizer(ckpt).convert_tokens_to_ids("<|im_end|>") == \
        trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    facts["uninterrupted"] = trainer.run(STEPS_B)
    facts["log_uninterrupted"] = read_log(out)

    resumed = GRPOTrainer.resume(out, engine=trainer.engine)
    facts["resumed_step"], facts["resumed_rollouts"] = resumed.step, resumed.rollouts
    facts["log_at_resume"] = read_log(out)
    facts["resumed"] = resumed.run(STEPS_B)
    facts["log"] = read_log(out)
    trainer.close()
    return facts


@pytest.fixture(scope="module")
def engine_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    proc = subprocess.run([sys.executable, __file__, "engine-check", str(tiny_model), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_engine_run_log_and_rollouts(engine_run):
    out, facts = engine_run
    log = facts["log_uninterrupted"]
    steps = [r for r in log if r["type"] == "step"]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, STEPS_A + STEPS_B + 1))
    for r in steps:
        for key in ("loss", "reward_mean", "zero_adv_frac", "rollouts", "seconds", "prompt_ids"):
            assert key in r, key
        assert r["rollouts"] == r["step"] * P * K
        assert 0 <= r["zero_adv_frac"] <= 1 and 0 <= r["reward_mean"] <= 1
    assert sum(r["updates"] for r in steps) >= STEPS_A + STEPS_B - 1  # mixed groups: real updates happened
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert set(e["greedy"]) == {"d1"} and set(e["sampled"]) == {"d1"} and e["n"] == {"d1": 6}
    assert (out / "accuracy_vs_step.png").stat().st_size > 0 and (out / "accuracy_vs_rollouts.png").stat().st_size > 0
    assert facts["engine_start_s"] > 0


def test_engine_weight_sync(engine_run):
    _, facts = engine_run
    # vLLM (float32) vs HF recompute differ by summation order only
    assert facts["sync_vs_policy"] < 1e-4, facts
    assert facts["sync_vs_initial"] > 1e-3, facts  # the policy did move, so the check has teeth


def test_checkpoint_written_and_loads(engine_run):
    out, facts = engine_run
    ckpt = out / "checkpoints" / "stage0"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == STEPS_A and state["rollouts"] == STEPS_A * P * K
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "stage0"
    assert facts["ckpt_max_param_diff"] == 0.0 and facts["ckpt_tokenizer_ok"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    from cropi.tiny_model import load_policy

    model, tok = load_policy(ckpt)
    assert model.config.vocab_size == len(tok)


def test_resume_continues_from_checkpoint(engine_run):
    out, facts = engine_run
    assert facts["resumed_step"] == STEPS_A and facts["resumed_rollouts"] == STEPS_A * P * K
    at_resume = [r for r in facts["log_at_resume"] if r["type"] == "step"]
    assert [r["step"] for r in at_resume] == list(range(1, STEPS_A + 1))  # log truncated to the checkpoint
    assert (out / "log.discarded.jsonl").is_file()
    a, b = facts["uninterrupted"], facts["resumed"]
    assert [r["step"] for r in b] == [STEPS_A + i for i in range(1, STEPS_B + 1)]
    assert [r["rollouts"] for r in b] == [r["rollouts"] for r in a]
    assert [r["prompt_ids"] for r in b] == [r["prompt_ids"] for r in a]  # sampler state restored
    # CPU float32, per-request seeds: the same samples and the same updates
    assert [r["reward_mean"] for r in b] == [r["reward_mean"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
    steps = [r for r in facts["log"] if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS_A + STEPS_B + 1))


def test_cli_grpo_bad_input_one_line(tiny_model, tmp_path):
    proc = subprocess.run([CROPI, "grpo", "--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl"),
                           "--out", str(tmp_path / "run"), "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "missing.jsonl" in proc.stderr


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "engine-check":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(_engine_check(sys.argv[2], sys.argv[3])))
    else:
        sys.exit("usage: test_trainer.py engine-check MODEL OUT")

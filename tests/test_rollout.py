"""``cropi rollout`` end to end on a real vLLM engine (CPU) and a briefly warm-started tiny Qwen2.

Two engine starts: tests/_engine_sync_check.py (in-process API: an "interrupted" run on half
the prompts, an uninterrupted reference run, weight sync) and the installed ``cropi rollout``
script resuming the interrupted store. Bad-input runs fail before any engine starts.

Logprob tolerance: vLLM runs the float32 checkpoint in float32 and the HF recompute is
float32; the two differ only by kernel summation order (measured ~1e-6), so 1e-4 per token.
Sampling at temperature 0.7 makes a temperature mismatch fail: log_softmax(logits) differs
from log_softmax(logits / 0.7) by ~0.1 or more on these tokens (checked below).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from cropi.rewards import get_reward
from cropi.rollout import ADVANTAGE_EPS, GROUP_STD_DDOF, group_advantages
from cropi.trajectory import TRAJECTORY_SCHEMA, groups_by_prompt, read_trajectories, trajectory_glob
from sketchstore.prompts import encode_prompt
from cropi.tasks import generate_tasks, write_tasks
from click.testing import CliRunner

from cli.cropi import main as cropi_main
from cropi.tiny_model import EOS_TOKEN, build_tiny_model, greedy_generate, load_policy, warm_start

CROPI = str(Path(sys.executable).with_name("cropi"))
HELPER = Path(__file__).with_name("_engine_sync_check.py")
K, TEMPERATURE, MAX_TOKENS, SEED = 12, 0.7, 16, 3
LOGPROB_ATOL = 1e-4


def cli(*args, ok=True, timeout=300):
    proc = subprocess.run([CROPI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny Qwen2 given 80 SFT steps: it answers in the task format ("... The answer is N.")
    and stops with <|im_end|>, but is right only sometimes -- so groups have mixed rewards."""
    root = tmp_path_factory.mktemp("rollout-model")
    build_tiny_model(root / "init", size="tiny", seed=0)
    warm_start(root / "init", root / "warm", steps=80, batch_size=32, lr=3e-3, eval_n=0, train_difficulty=[1],
               families=["arith"], threads=1)
    return root / "warm"


@pytest.fixture(scope="module")
def tasks(policy, tmp_path_factory):
    """6 tasks: 4 the policy solves greedily (mixed groups likely) and 2 it does not."""
    model, tok = load_policy(policy)
    pool = generate_tasks(60, seed=11, difficulty=1, families="arith")
    outs = greedy_generate(model, tok, [t["prompt"] for t in pool], max_new_tokens=24)
    reward = get_reward("math_verify")
    solved = [t for t, o in zip(pool, outs) if reward(o, t["answer"]) > 0]
    unsolved = [t for t, o in zip(pool, outs) if reward(o, t["answer"]) == 0]
    rows = solved[:4] + unsolved[: 6 - len(solved[:4])]
    root = tmp_path_factory.mktemp("rollout-data")
    return {"all": write_tasks(rows, root / "tasks.jsonl"), "half": write_tasks(rows[:3], root / "half.jsonl"),
            "rows": rows}


@pytest.fixture(scope="module")
def runs(policy, tasks, tmp_path_factory):
    """Two engine processes: the helper samples half the prompts into ``out`` (in-process
    API), all prompts uninterrupted into ``ref``, and checks weight sync; then a crashed
    writer's temp file is planted in ``out`` and the CLI resumes ``out`` with all prompts;
    a last CLI run finds nothing to do (and starts no engine)."""
    root = tmp_path_factory.mktemp("rollout-runs")
    out, ref = root / "traj.parquet", root / "reference.parquet"
    proc = subprocess.run(
        [sys.executable, str(HELPER), "--model", str(policy), "--data", str(tasks["all"]), "--out", str(ref),
         "--partial-data", str(tasks["half"]), "--partial-out", str(out),
         "--behaviour", policy.name, "--n", str(K), "--max-tokens", str(MAX_TOKENS),
         "--temperature", str(TEMPERATURE), "--seed", str(SEED)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sync = json.loads(proc.stdout.strip().splitlines()[-1])

    stale = out / ".part-00000000000000000001-999999-00000.parquet.tmp"
    stale.write_bytes(b"PAR1 half-written garbage")
    common = ["--model", policy, "--data", tasks["all"], "--out", out, "--n", K, "--max-tokens", MAX_TOKENS,
              "--temperature", TEMPERATURE, "--seed", SEED, "--prompts-per-call", 2, "--quiet"]
    resumed = cli("rollout", *common).stdout
    stale_left = stale.exists()
    again = CliRunner().invoke(cropi_main, ["rollout", *map(str, common)])
    assert again.exit_code == 0, again.output
    return {"out": out, "ref": ref, "partial": sync["partial"], "resumed": resumed, "again": again.output,
            "stale_left": stale_left, "sync": sync}


def test_schema_and_values(runs, tasks, policy):
    con = duckdb.connect()
    rel = con.sql(f"SELECT * FROM read_parquet('{trajectory_glob(runs['out'])}')")
    assert rel.columns == TRAJECTORY_SCHEMA.names
    types = dict(zip(rel.columns, map(str, rel.types)))
    assert types["prompt_token_ids"] == "INTEGER[]" and types["response_token_ids"] == "INTEGER[]"
    assert types["behaviour_logprobs"] == "FLOAT[]" and types["zero_std"] == "BOOLEAN"

    table = read_trajectories(runs["out"])
    assert table.schema.equals(TRAJECTORY_SCHEMA)
    rows = table.to_pylist()
    by_id = {t["id"]: t for t in tasks["rows"]}
    groups = groups_by_prompt(rows)
    assert set(groups) == {(pid, policy.name) for pid in by_id}
    _, tok = load_policy(policy)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    reward = get_reward("math_verify")
    mixed = 0
    for (pid, _), group in groups.items():
        task = by_id[pid]
        assert [r["sample"] for r in group] == list(range(K))
        rewards = np.array([r["reward"] for r in group])
        for r in group:
            assert r["prompt"] == task["prompt"] and r["answer"] == task["answer"]
            assert r["prompt_token_ids"] == encode_prompt(tok, task["prompt"])
            assert len(r["behaviour_logprobs"]) == len(r["response_token_ids"]) >= 1
            assert all(lp <= 0 for lp in r["behaviour_logprobs"])
            assert r["response"] == tok.decode(r["response_token_ids"], skip_special_tokens=True)
            assert r["reward"] == reward(r["response"], task["answer"])
            assert r["temperature"] == TEMPERATURE and r["top_p"] == 1.0 and r["seed"] == SEED
            if r["finish_reason"] == "stop":
                assert r["response_token_ids"][-1] == eos and eos not in r["response_token_ids"][:-1]
            else:
                assert r["finish_reason"] == "length" and len(r["response_token_ids"]) == MAX_TOKENS
        # GRPO advantages from the stored rewards, independently of the implementation.
        mean = rewards.mean()
        std = rewards.std(ddof=GROUP_STD_DDOF)
        zero = bool(rewards.max() == rewards.min())
        assert all(r["zero_std"] == zero for r in group)
        assert all(r["pass_rate"] == pytest.approx((rewards > 0).mean()) for r in group)
        assert all(r["group_mean"] == pytest.approx(mean) for r in group)
        adv = np.array([r["advantage"] for r in group])
        assert abs(adv.sum()) < 1e-9
        if zero:
            assert np.all(adv == 0) and all(r["group_std"] == 0 for r in group)
        else:
            mixed += 1
            assert group[0]["group_std"] == pytest.approx(std)
            np.testing.assert_allclose(adv, (rewards - mean) / (std + ADVANTAGE_EPS), rtol=1e-12)
    print(f"{mixed} of {len(groups)} groups have mixed rewards")
    assert mixed >= 1, "fixture should produce at least one group with mixed rewards"
    assert any(r["finish_reason"] == "stop" for r in rows)
    # DuckDB sees exactly the same rows.
    assert con.execute(f"SELECT count(*), sum(reward) FROM read_parquet('{trajectory_glob(runs['out'])}')").fetchone() == (
        len(rows), pytest.approx(sum(r["reward"] for r in rows)))


def test_logprob_fidelity(runs, policy):
    """behaviour_logprobs == log_softmax(HF logits / T) of the stored tokens."""
    model, _ = load_policy(policy)
    model.eval()
    rows = read_trajectories(runs["out"]).to_pylist()
    seqs = [r["prompt_token_ids"] + r["response_token_ids"] for r in rows]
    ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)  # right padding: causal, harmless
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        all_logits = model(input_ids=ids).logits.float()
    worst, worst_t1 = 0.0, 0.0
    for r, logits in zip(rows, all_logits):
        p, y = r["prompt_token_ids"], r["response_token_ids"]
        logits = logits[len(p) - 1: len(p) + len(y) - 1]
        idx = torch.tensor(y)[:, None]
        ref = torch.log_softmax(logits / TEMPERATURE, -1).gather(1, idx)[:, 0]
        ref_t1 = torch.log_softmax(logits, -1).gather(1, idx)[:, 0]
        got = torch.tensor(r["behaviour_logprobs"])
        worst = max(worst, float((got - ref).abs().max()))
        worst_t1 = max(worst_t1, float((got - ref_t1).abs().max()))
    print(f"logprob max abs diff vs HF at T={TEMPERATURE}: {worst:.2e} ({len(rows)} trajectories); "
          f"vs T=1: {worst_t1:.3f}")
    assert worst < LOGPROB_ATOL
    assert worst_t1 > 100 * LOGPROB_ATOL  # the check would catch pre-temperature logprobs


def test_resume_every_sample_once_and_deterministic(runs, tasks):
    assert f"3 prompts sampled, 0 skipped (of 3), {3 * K} trajectories" in runs["partial"]
    assert f"3 prompts sampled, 3 skipped (of 6), {3 * K} trajectories" in runs["resumed"]
    assert "0 prompts sampled, 6 skipped (of 6), 0 trajectories" in runs["again"]
    assert not runs["stale_left"], "a crashed writer's temp part should be removed under the lock"
    counts = duckdb.connect().execute(f"SELECT prompt_id, sample, count(*) FROM read_parquet('{trajectory_glob(runs['out'])}') "
                        "GROUP BY ALL").fetchall()
    assert len(counts) == 6 * K and all(c == 1 for *_, c in counts)
    parts = sorted(p.name for p in runs["out"].iterdir())
    assert sum(p.startswith("part-") for p in parts) == 4  # <= 2 prompts per part: 2 parts per run
    assert not [p for p in parts if p.endswith(".tmp")]
    # The resumed run sampled exactly what one uninterrupted run (other batches) sampled.
    resumed, reference = read_trajectories(runs["out"]).to_pylist(), read_trajectories(runs["ref"]).to_pylist()
    assert [(r["prompt_id"], r["sample"]) for r in resumed] == [(r["prompt_id"], r["sample"]) for r in reference]
    for a, b in zip(resumed, reference):
        assert a["response_token_ids"] == b["response_token_ids"]
        np.testing.assert_allclose(a["behaviour_logprobs"], b["behaviour_logprobs"], atol=1e-5)
        assert a["advantage"] == b["advantage"]
    # Different seeds really sample differently (the identity above is not vacuous).
    assert len({tuple(r["response_token_ids"]) for r in resumed}) > len(resumed) // 2


def test_weight_sync(runs):
    s = runs["sync"]
    print("engine/sync measurements:", json.dumps(s))
    assert s["gen_before_vs_original"] < LOGPROB_ATOL and s["prompt_before_vs_original"] < LOGPROB_ATOL
    assert s["gen_after_vs_perturbed"] < LOGPROB_ATOL and s["prompt_after_vs_perturbed"] < LOGPROB_ATOL
    assert s["gen_after_vs_original"] > 0.05 and s["prompt_after_vs_before"] > 0.05
    assert s["rollout"]["trajectories"] == 6 * K


def test_big_batch_per_request_seeds(runs):
    s = runs["sync"]
    assert s["big_batch_prompt_tokens"] > 4096  # more than one engine step's token budget
    assert s["big_batch_same_as_alone"]


def test_bad_input_one_line_exit_2(policy, tasks, runs, tmp_path):
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"id": "a", "prompt": "What is 1 + 1?"}) + "\n")
    base = ["rollout", "--model", policy, "--out", tmp_path / "t.parquet", "--quiet"]
    cases = {
        "missing data": (base + ["--data", tmp_path / "nope.jsonl", "--n", 2], "nope.jsonl"),
        "no answer": (base + ["--data", no_answer, "--n", 2], "answer"),
        "n=0": (base + ["--data", tasks["all"], "--n", 0], "n (samples per prompt) must be >= 1"),
        "bad temperature": (base + ["--data", tasks["all"], "--n", 2, "--temperature", 0], "temperature"),
        "missing model": (["rollout", "--model", tmp_path / "no-model", "--out", tmp_path / "t.parquet",
                           "--data", tasks["all"], "--n", 2], "no-model"),
        # resuming a store with another K / temperature for the same behaviour
        "resume other n": (["rollout", "--model", policy, "--out", runs["out"], "--data", tasks["all"], "--n", K + 1,
                            "--temperature", TEMPERATURE, "--seed", SEED], "this run asks n="),
        "resume other T": (["rollout", "--model", policy, "--out", runs["out"], "--data", tasks["all"], "--n", K,
                            "--temperature", 0.9, "--seed", SEED], "temperature"),
    }
    for name, (args, needle) in cases.items():
        if name == "n=0":  # the installed script, as a user runs it
            proc = cli(*args, ok=False)
            code, stderr = proc.returncode, proc.stderr
        else:  # in-process (no vLLM is started on these paths; saves an interpreter start each)
            res = CliRunner().invoke(cropi_main, list(map(str, args)))
            code, stderr = res.exit_code, res.stderr
        assert code == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, stderr)
    assert not (tmp_path / "t.parquet").exists()


def test_group_advantages_unit():
    adv, mean, std, zero = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert (mean, zero) == (0.5, False)
    assert std == pytest.approx(math.sqrt(1 / 3)) if GROUP_STD_DDOF == 1 else std == pytest.approx(0.5)
    a = 0.5 / (std + ADVANTAGE_EPS)
    assert adv == pytest.approx([a, -a, -a, a])
    assert group_advantages([0.0, 0.0, 0.0]) == ([0.0, 0.0, 0.0], 0.0, 0.0, True)
    assert group_advantages([1.0]) == ([0.0], 1.0, 0.0, True)

"""POPI gradients: exact against autograd GRPO when theta == beta, importance ratios when not,
zero-advantage prompts recorded, batching invariance, and input checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from sketchstore import BuildConfig, ProjectionSpec, SketchStore, build_sketches, catalog
from sketchstore.errors import BadInputError
from sketchstore.gradients import per_example_gradients, select_parameters
from cropi.errors import BadConfigError
from cropi.popi import POPIObjective, POPIOptions, read_prompt_groups

SKETCH = str(Path(sys.executable).with_name("sketch"))

TEMPERATURE = 0.7
K = 4


def sample_trajectories(model_dir, path, n_prompts=5, seed=0, zero_std_prompt=0):
    """Trajectories in the rollout schema, sampled from the HF model itself at TEMPERATURE,
    behaviour log-probs computed by the same model (so theta == beta gives rho == 1 exactly)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in range(n_prompts):
        prompt = torch.randint(4, model.config.vocab_size, (6,), generator=gen).tolist()
        rewards = [1.0] * K if p == zero_std_prompt else [float(x) for x in torch.randint(0, 2, (K,), generator=gen)]
        if len(set(rewards)) == 1 and p != zero_std_prompt:
            rewards[0] = 1.0 - rewards[0]
        mean = sum(rewards) / K
        std = (sum((r - mean) ** 2 for r in rewards) / K) ** 0.5
        for k in range(K):
            ids = list(prompt)
            logps = []
            with torch.no_grad():
                for _ in range(3 + k):
                    logits = model(input_ids=torch.tensor([ids])).logits[0, -1] / TEMPERATURE
                    probs = torch.softmax(logits, -1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                    logps.append(float(torch.log_softmax(logits, -1)[token]))
                    ids.append(token)
            rows.append({"prompt_id": f"q{p}", "behaviour": "beta", "sample": k, "prompt_token_ids": prompt,
                         "response_token_ids": ids[len(prompt):], "behaviour_logprobs": logps,
                         "temperature": TEMPERATURE, "top_p": 1.0, "reward": rewards[k],
                         "advantage": (rewards[k] - mean) / (std + 1e-4), "pass_rate": mean, "zero_std": std == 0})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def grpo_gradient(model, group):
    """-(1/K) sum_i (1/|y_i|) sum_t A_i grad log pi(y_t), one unpadded forward per trajectory."""
    model.zero_grad()
    total = 0.0
    for response, advantage in zip(group.responses, group.advantages):
        ids = torch.tensor([group.prompt_token_ids + response])
        logits = model(input_ids=ids).logits[0, len(group.prompt_token_ids) - 1:-1] / group.temperature
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        total = total + advantage * logp.mean()
    (-total / len(group.responses)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trajectories(tiny_model, tmp_path_factory):
    return sample_trajectories(tiny_model, tmp_path_factory.mktemp("traj") / "traj.parquet")


def test_on_policy_popi_equals_grpo_gradient(tiny_model, trajectories):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    params = select_parameters(model)
    groups = read_prompt_groups(trajectories)
    popi = list(per_example_gradients(model, POPIObjective(), groups, params))
    for row, got in zip(groups, popi):
        if row["group"].zero_advantage:
            continue
        expected = grpo_gradient(model, row["group"])
        for name, _ in params:
            assert torch.allclose(got.grads[name][0], expected[name], atol=1e-6, rtol=1e-4), name
        assert got.grad_norm > 0


def test_off_policy_uses_importance_ratios(tiny_model, trajectories):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    params = select_parameters(model)
    row = next(r for r in read_prompt_groups(trajectories) if not r["group"].zero_advantage)
    group = row["group"]
    got = next(per_example_gradients(model, POPIObjective(), [row], params))
    model.zero_grad()
    total = 0.0
    for response, advantage, behaviour in zip(group.responses, group.advantages, group.behaviour_logprobs):
        ids = torch.tensor([group.prompt_token_ids + response])
        logits = model(input_ids=ids).logits[0, len(group.prompt_token_ids) - 1:-1] / TEMPERATURE
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)
        rho = torch.exp(logp - torch.tensor(behaviour))
        assert not torch.allclose(rho, torch.ones_like(rho), atol=1e-3)  # the policy really moved
        total = total + (rho * advantage).mean()
    (-total / K).backward()
    for name, p in params:
        assert torch.allclose(got.grads[name][0], p.grad, atol=1e-6, rtol=1e-4), name
    on_policy = grpo_gradient(model, group)
    assert not all(torch.allclose(got.grads[n][0], on_policy[n], atol=1e-6, rtol=1e-4) for n, _ in params)
    clipped = next(per_example_gradients(model, POPIObjective(clip=0.01), [row], params))
    assert clipped.grad_norm != pytest.approx(got.grad_norm)


def test_build_popi_records_zero_gradient_prompts_and_is_batch_invariant(tiny_model, trajectories, tmp_path):
    def cfg(store, batch_size):
        return BuildConfig(model=tiny_model, data=None, store=store, checkpoint="theta0", split="pool",
                           spec=ProjectionSpec(dim=1024), objective=POPIOptions(trajectories=trajectories),
                           batch_size=batch_size, flush_rows=3)

    assert build_sketches(cfg(tmp_path / "a", 1), progress=False).added == 5
    build_sketches(cfg(tmp_path / "b", 5), progress=False)
    a, b = SketchStore.open(tmp_path / "a"), SketchStore.open(tmp_path / "b")
    ids, x = a.read("theta0", "pool")
    _, y = b.read("theta0", "pool", ids=ids)
    assert torch.equal(x, y)
    _, rows = catalog.query(a, "SELECT id, grad_norm, pass_rate, zero_std, k, objective FROM sketches ORDER BY id")
    assert rows[0] == ("q0", 0.0, 1.0, True, K, "popi")
    assert all(r[1] > 0 and not r[3] for r in rows[1:])
    assert x[ids.index("q0")].abs().sum() == 0

    # The rollouts join the catalog: trajectories next to their prompts' sketches.
    sql = ("SELECT s.id, s.pass_rate, avg(t.reward), count(*) FROM sketches s JOIN trajectories t "
           "ON t.prompt_id = s.id GROUP BY ALL ORDER BY s.id")
    _, joined = catalog.query(a, sql, {"trajectories": trajectories})
    assert [r[0] for r in joined] == ids and all(r[1] == pytest.approx(r[2]) and r[3] == K for r in joined)
    proc = subprocess.run([SKETCH, "query", "--store", str(tmp_path / "a"), "--table", f"t={trajectories}",
                           "SELECT count(DISTINCT prompt_id) FROM t"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1].strip().endswith("5"), proc.stdout + proc.stderr
    for bad, message in (({"scores": trajectories}, "bad view name"), ({"t": tmp_path / "no.parquet"}, "no such Parquet"),
                         ({"t": tmp_path}, "no Parquet files")):
        with pytest.raises(BadInputError, match=message):
            catalog.query(a, "SELECT 1", bad)


def test_influence_needs_a_validation_gradient(tiny_model, trajectories, tmp_path):
    from cropi.errors import NoValidationSignalError
    from cropi.influence import sketch_and_score

    flat = sample_trajectories(tiny_model, tmp_path / "flat.parquet", n_prompts=2, zero_std_prompt=0)
    table = pq.read_table(flat).to_pylist()
    flat = tmp_path / "flat0.parquet"  # only the prompt whose samples all agree: a zero sketch
    pq.write_table(pa.Table.from_pylist([r for r in table if r["prompt_id"] == "q0"]), flat)
    spec, lines = ProjectionSpec(dim=256), []
    live = sketch_and_score(tmp_path / "s", "c0", tiny_model, {"pool": trajectories, "val-a": trajectories,
                                                               "val-flat": flat}, spec, log=lines.append)
    assert live == ["val-a"] and any("left out: val-flat" in line for line in lines)
    with pytest.raises(NoValidationSignalError, match="every validation sketch at c1 is zero"):
        sketch_and_score(tmp_path / "s", "c1", tiny_model, {"pool": trajectories, "val-flat": flat}, spec,
                         log=lines.append)


def test_bad_trajectories(tiny_model, trajectories, tmp_path):
    with pytest.raises(BadConfigError, match="trajectories not found"):
        read_prompt_groups(tmp_path / "nope.parquet")
    table = pq.read_table(trajectories)
    pq.write_table(table.drop(["advantage"]), tmp_path / "noadv.parquet")
    with pytest.raises(BadConfigError, match="lack column.*advantage"):
        read_prompt_groups(tmp_path / "noadv.parquet")
    rows = table.to_pylist()
    rows[0]["top_p"] = 0.9
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "topp.parquet")
    with pytest.raises(BadConfigError, match="top_p < 1"):
        read_prompt_groups(tmp_path / "topp.parquet")
    with pytest.raises(BadInputError, match="needs --trajectories"):
        BuildConfig(model=tiny_model, data=None, store=tmp_path / "s", checkpoint="c", split="s", objective="popi")


def test_scoring_refuses_mixed_objectives(tiny_model, trajectories, sft_data, tmp_path):
    from sketchstore import SplitRef, score

    common = dict(model=tiny_model, store=tmp_path / "s", checkpoint="theta0", spec=ProjectionSpec(dim=512))
    build_sketches(BuildConfig(data=None, split="pool", objective=POPIOptions(trajectories=trajectories), **common), progress=False)
    build_sketches(BuildConfig(data=sft_data[1], split="val", **common), progress=False)
    with pytest.raises(BadInputError, match="objective sft but theta0:pool with popi"):
        score(SketchStore.open(tmp_path / "s", writable=True), SplitRef("theta0", "pool"), [SplitRef("theta0", "val")],
              progress=False)

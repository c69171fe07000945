"""The stage loop and the comparison end to end, on a real vLLM engine and a real store.

Runs this file as a script in a subprocess (an in-process CPU engine changes torch's thread
settings for the whole process, see tests/test_trainer.py). Reward: ``parity`` (1 when the
response has an even number of characters), so the random tiny model gets mixed groups, some
zero-std ones, and nonzero POPI gradients for influence selection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cropi.tasks import generate_tasks
from sketchstore import ProjectionSpec
from sketchstore.data import read_rows, write_rows
from sketchstore.selection import ranked

STRATEGIES = ["cropi", "random", "learnability", "pass-rate", "influence-once"]
POOL, VAL, FRACTION, STAGES, STEPS = 30, 8, 0.2, 2, 2


def _selection(out: Path, strategy: str, stage: int) -> list[str]:
    return [r["id"] for r in read_rows(out / strategy / "selections" / f"stage{stage}.jsonl", required=("id",))]


def _check(model: str, out: str) -> dict:
    """Run in the subprocess: compare all strategies, then extend the cropi run by a stage."""
    from dataclasses import replace

    from cropi.compare import run_comparison
    from cropi.curriculum import Curriculum, CurriculumConfig
    from cropi.rewards import register_reward
    from cropi.trajectory import read_trajectories
    from cropi.run_dir import read_log
    from cropi.train_config import TrainConfig
    from sketchstore import SketchStore, SplitRef, load_scores

    register_reward("parity", lambda response, answer, stats=None: float(len(response) % 2 == 0), overwrite=True)
    out = Path(out)
    pool = write_rows(generate_tasks(POOL, seed=3, difficulty=[1, 2]), out / "pool.jsonl")
    val = write_rows(generate_tasks(VAL, seed=4, difficulty=[1, 2]), out / "val.jsonl")
    train = TrainConfig(model=Path(model), out=out / "full" / "train", eval_sets={"v": val}, prompts_per_step=4,
                        n=4, max_tokens=8, temperature=1.0, lr=1e-2, eval_every=STEPS, eval_samples=2,
                        reward="parity", seed=5)
    base = CurriculumConfig(train=train, pool=pool, val_sets={"v": val}, fraction=FRACTION, stages=STAGES,
                            steps_per_stage=STEPS, popi_n=4, spec=ProjectionSpec(dim=256, seed=5))
    logs: list[str] = []
    result = run_comparison(base, STRATEGIES, out, log=logs.append, metric="sampled")
    facts = {"results": result["results"], "plots": result["plots"], "logs": logs}

    store = SketchStore.open(out / "cropi" / "store")
    facts["scores"] = {}
    facts["manifest"] = {}
    for stage in range(STAGES):
        train_ref, val_ref = SplitRef(f"stage{stage}", "pool"), SplitRef(f"stage{stage}", "val-v")
        facts["scores"][stage] = load_scores(store, train_ref, [val_ref])[val_ref]
        m = store.manifest(f"stage{stage}", "pool")
        facts["manifest"][stage] = {"rows": m.num_rows, "ids": sorted(m.column("id").to_pylist()),
                                    "zero": sum(n == 0 for n in m.column("grad_norm").to_pylist())}
    traj = next((out / "learnability" / "trajectories").glob("*-pool"))
    table = read_trajectories(traj, columns=["prompt_id", "pass_rate"])
    facts["pass_rates"] = dict(zip(table.column("prompt_id").to_pylist(), table.column("pass_rate").to_pylist()))

    # Resume: one more stage of the finished cropi run continues its trainer and store.
    extended = replace(base, train=replace(train, out=out / "cropi" / "train"), strategy="cropi", stages=STAGES + 1)
    curriculum = Curriculum(extended, log=logs.append)
    facts["resumed_from_step"] = curriculum.trainer.step
    facts["extended"] = curriculum.run()
    facts["extended_log"] = [r for r in read_log(out / "cropi" / "train") if r["type"] == "step"]
    engine = curriculum.trainer.engine
    curriculum.trainer._owns_engine = False  # the runs below reuse it
    curriculum.close()

    # A stage whose refreshed behaviour samples all agree (a reward that no longer varies): no
    # validation gradient, so the stage keeps the previous stage's selection.
    register_reward("parity", lambda response, answer, stats=None: 1.0, overwrite=True)
    flat = Curriculum(replace(extended, stages=STAGES + 2, refresh_every=1), log=logs.append, engine=engine)
    facts["flat"] = flat.run()
    flat.close()
    register_reward("parity", lambda response, answer, stats=None: float(len(response) % 2 == 0), overwrite=True)

    # A small study: two seeds of one setting, each its own pool; then run again (resumes, trains nothing).
    from cropi.study import run_study

    def base_for(setting: str, seed: int, run_out: Path) -> CurriculumConfig:
        seed_pool = write_rows(generate_tasks(POOL, seed=30 + seed, difficulty=[1, 2]), run_out / "pool.jsonl")
        return replace(base, pool=seed_pool, stages=1, steps_per_stage=1,
                       train=replace(train, out=run_out / "full" / "train", seed=seed, eval_every=1))

    study = run_study(out / "study", ["mini"], [0, 1], ["random"], base_for, engine=engine, log=logs.append)
    again = run_study(out / "study", ["mini"], [0, 1], ["random"], base_for, engine=engine, log=logs.append)
    facts["study"] = {"summary": study.summary, "table": study.table, "plots": study.plots,
                      "again_equal": again.summary == study.summary}
    from cropi.engine import close_engine

    close_engine(engine)
    return facts


@pytest.fixture(scope="module")
def comparison(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = subprocess.run([sys.executable, __file__, "check", str(tiny_model), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_arm_trains_the_same_budget(comparison):
    out, facts = comparison
    results = facts["results"]
    assert sorted(results) == sorted(["full", *STRATEGIES])
    for name, r in results.items():
        assert r["steps"] == STAGES * STEPS, name
        assert [c[0] for c in r["curve"]] == [0, STEPS, 2 * STEPS], name
        assert all(0.0 <= c[2] <= 1.0 for c in r["curve"])
        assert (out / name / "train" / "checkpoints" / f"stage{STAGES}").is_dir()
    assert results["full"]["acceleration"]["full"] is not None
    assert all(Path(p).is_file() for p in facts["plots"])
    assert (out / "results.md").read_text().count("|") > 10


def test_selection_sizes_and_fixed_subsets(comparison):
    out, _ = comparison
    want = round(FRACTION * POOL)
    assert len(_selection(out, "full", 0)) == POOL
    for name in STRATEGIES:
        first = _selection(out, name, 0)
        assert len(first) <= want and len(set(first)) == len(first), name
        if name != "cropi":
            assert _selection(out, name, 1) == first, name  # baselines keep their stage-0 subset
    assert len(_selection(out, "cropi", 0)) == want


def test_cropi_selects_top_influence_at_each_checkpoint(comparison):
    out, facts = comparison
    want = round(FRACTION * POOL)
    for stage in range(STAGES):
        manifest = facts["manifest"][str(stage)]
        assert manifest["rows"] == POOL  # every pool prompt sketched at this checkpoint ...
        assert manifest["zero"] > 0  # ... zero-advantage prompts recorded as zero-gradient rows
        scores = facts["scores"][str(stage)]
        top = ranked(scores)[:want]
        assert sorted(_selection(out, "cropi", stage)) == sorted(top)
        positive, aligned = sum(v > 0 for v in scores.values()), sum(scores[i] > 0 for i in top)
        summary = f"stage {stage}: influence > 0 for {positive} of {POOL} pool prompts ({manifest['zero']} with zero"
        line = next(line for line in facts["logs"] if line.startswith(summary))  # the stage's summary is logged
        assert f"; {aligned} of {want} selected align" in line and ("warning" in line) == (aligned < want)
    assert facts["scores"]["0"] != facts["scores"]["1"]  # re-scored at the new checkpoint


def test_learnability_uses_behaviour_pass_rates(comparison):
    out, facts = comparison
    rates = facts["pass_rates"]
    assert len(rates) == POOL
    chosen = set(_selection(out, "learnability", 0))
    value = {i: p * (1 - p) for i, p in rates.items()}
    assert min(value[i] for i in chosen) >= max(value[i] for i in rates if i not in chosen)
    passing = _selection(out, "pass-rate", 0)
    assert all(0 < rates[i] < 1 for i in passing)


def test_resume_adds_a_stage_without_redoing(comparison):
    out, facts = comparison
    assert facts["resumed_from_step"] == STAGES * STEPS
    assert facts["extended"]["steps"] == (STAGES + 1) * STEPS
    assert [r["step"] for r in facts["extended_log"]] == list(range(1, (STAGES + 1) * STEPS + 1))
    assert len(_selection(out, "cropi", STAGES)) == round(FRACTION * POOL)
    assert (out / "cropi" / "train" / "checkpoints" / f"stage{STAGES + 1}").is_dir()
    assert any(f"stage {STAGES}: pool sketches {POOL} new" in line for line in facts["logs"])


def test_a_stage_without_validation_gradient_keeps_the_previous_selection(comparison):
    out, facts = comparison
    stage = STAGES + 1
    assert facts["flat"]["steps"] == (STAGES + 2) * STEPS
    assert _selection(out, "cropi", stage) == _selection(out, "cropi", stage - 1)
    assert any(f"stage {stage}: every validation sketch at stage{stage} is zero" in line
               and f"keeping stage {stage - 1}'s selection" in line for line in facts["logs"])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        print(json.dumps(_check(sys.argv[2], sys.argv[3]), default=str))
    else:
        sys.exit("usage: test_curriculum.py check MODEL OUT")


def test_study_summarises_seeds_and_resumes(comparison):
    out, facts = comparison
    study = facts["study"]
    summary = study["summary"]["mini"]
    assert sorted(summary) == ["full", "random"]
    for arm in ("full", "random"):
        assert summary[arm]["seeds"] == [0, 1]
        for axis in ("steps", "rollouts"):
            stat = summary[arm][axis]
            assert len(stat["per_seed"]) == 2 and stat["n"] <= 2
        assert len(summary[arm]["area"]["per_seed"]) == 2
    diff = summary["random"]["area_vs"]["full"]
    assert diff["per_seed"] == pytest.approx([a - b for a, b in zip(summary["random"]["area"]["per_seed"],
                                                                  summary["full"]["area"]["per_seed"])])
    assert summary["full"]["area_vs"] == {} and "minus full pool" in study["table"]
    assert "| mini | random |" in study["table"] and all(Path(p).is_file() for p in study["plots"])
    assert json.loads((out / "study" / "study.json").read_text())["settings"] == ["mini"]
    assert (out / "study" / "mini" / "seed1" / "random" / "train" / "checkpoints" / "stage1").is_dir()
    assert study["again_equal"]  # re-running the study read every arm back: same statistics

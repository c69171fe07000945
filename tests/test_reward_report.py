"""GSM8K/MATH answers as released score right, and `cropi rewards` shows how a reward reads responses."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cli.cropi import main as cropi_main
from cropi.reward_report import check_rewards
from cropi.rewards import RewardStats, get_reward, get_scorer, math_verify_score
from cropi.trajectory import PartWriter, Trajectory
from gsm8k_math_rows import GSM8K_FINALS, GSM8K_ROWS, MATH_FINALS, MATH_ROWS


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args):
    return CliRunner().invoke(cropi_main, list(map(str, args)))


def _counts(output: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^  (parsed|unparsed|correct|wrong)\s+(\d+)", output, re.M)}


@pytest.mark.parametrize("name", ["math_verify", "exact"])
def test_gsm8k_reference_solutions_score_their_own_answer(name):
    stats = RewardStats()
    reward = get_reward(name)
    for row, final in zip(GSM8K_ROWS, GSM8K_FINALS):
        assert reward(row["answer"], final, stats=stats) == 1.0, row["answer"]
    assert reward(GSM8K_ROWS[3]["answer"], "1,600", stats=stats) == 1.0  # a gold answer with its comma
    assert stats.as_dict() == {"calls": 6, "correct": 6, "unparseable": 0, "errors": 0}


def test_gsm8k_wrong_number_scores_0_and_the_last_anchor_decides():
    for row, final in zip(GSM8K_ROWS, GSM8K_FINALS):
        wrong = row["answer"].rpartition("####")[0] + f"#### {int(final) + 1}"
        result = math_verify_score(wrong, final)
        assert (result.reward, result.parsed, result.extracted) == (0.0, True, str(int(final) + 1))
    assert math_verify_score("#### -3", "3").reward == 0.0  # the sign counts
    assert math_verify_score("So $18.\n#### $18", "18").reward == 1.0
    assert math_verify_score("#### 18\nThe answer is 17.", "18").extracted == "17"  # a later statement wins
    assert math_verify_score("The answer is 17.\n#### 18", "18").reward == 1.0
    assert not math_verify_score("####", "18").parsed
    assert not math_verify_score("9 * 2 = <<9*2=18>>18", "18").parsed  # calculator notes are no final answer


def test_math_boxed_and_the_answer_is():
    for row, final in zip(MATH_ROWS, MATH_FINALS):
        assert math_verify_score(row["solution"], final).reward == 1.0
    assert math_verify_score(MATH_ROWS[2]["solution"], "0.5").reward == 1.0
    assert math_verify_score(MATH_ROWS[1]["solution"], "6").reward == 0.0
    assert math_verify_score("so x is -6. The answer is -6.", "-6").reward == 1.0
    assert math_verify_score("The answer is 1,234.", "1234").reward == 1.0


def test_check_rewards_counts_and_examples():
    rows = [{"id": "a", "response": "#### 18", "answer": "18"},
            {"id": "b", "response": "The answer is 5.", "answer": "6"},
            {"id": "c", "response": "I am not sure", "answer": "6"},
            {"id": "d", "response": "\\boxed{-6}", "answer": "-6"}]
    report = check_rewards(rows, "math_verify", examples=1)
    assert (report.total, report.parsed, report.counts) == (4, 3, {"correct": 2, "wrong": 1, "unparsed": 1})
    assert [e.id for e in report.examples["correct"]] == ["a"]
    assert report.examples["wrong"][0].extracted == "5"
    custom = get_scorer("exact")("#### 1,234", "1234")
    assert (custom.reward, custom.extracted) == (1.0, "1234")


def test_cli_on_gsm8k_as_released(tmp_path):
    data = _jsonl(tmp_path / "gsm8k_test.jsonl", GSM8K_ROWS)
    released = _cli("rewards", "--data", data, "--response-column", "answer", "--examples", 2)
    assert released.exit_code == 0, released.output
    assert _counts(released.output) == {"parsed": 5, "unparsed": 0, "correct": 5, "wrong": 0}
    assert "#### 18" in released.output and "extracted '18'" in released.output
    converted = _cli("rewards", "--data", data)  # as cropi reads the tasks: "... The answer is 18."
    assert converted.exit_code == 0 and _counts(converted.output)["correct"] == 5
    assert "The answer is 18." in converted.output


def test_cli_on_trajectories(tmp_path):
    out = tmp_path / "traj.parquet"
    out.mkdir()
    cases = [("#### 18", "18", 0.0), ("The answer is 5.", "6", 0.0), ("no idea", "6", 0.0), ("#### 1,234", "1234", 1.0)]
    PartWriter(out).write([Trajectory(prompt_id=f"p{i}", behaviour="b", sample=0, answer=answer, response=response,
                                      prompt_token_ids=[1], response_token_ids=[2], behaviour_logprobs=[-0.5],
                                      temperature=1.0, top_p=1.0, reward=stored)
                           for i, (response, answer, stored) in enumerate(cases)])
    result = _cli("rewards", "--trajectories", out)
    assert result.exit_code == 0, result.output
    assert _counts(result.output) == {"parsed": 3, "unparsed": 1, "correct": 2, "wrong": 1}
    assert "1 responses score differently from the reward stored with them" in result.output  # p0: 0 stored
    assert "[p2/0]" in result.output.split("unparsed examples:")[1]


@pytest.mark.parametrize("args,needle", [
    ([], "give exactly one of --trajectories T or --data FILE"),
    (["--trajectories", "{tmp}/nope.parquet"], "trajectories not found"),
    (["--data", "{tmp}/noresp.jsonl"], "no response column to score (its columns: prompt, answer)"),
    (["--data", "{tmp}/noresp.jsonl", "--response-column", "reply"], "no column 'reply' (--response-column)"),
    (["--data", "{tmp}/noresp.jsonl", "--reward", "nope"], "unknown reward 'nope'"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    _jsonl(tmp_path / "noresp.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    result = _cli("rewards", *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.count("\n") == 1

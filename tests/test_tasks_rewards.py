"""Generated tasks, task readers/writers and verifiable rewards."""

from __future__ import annotations

import json
import re
import threading

import pytest

from cropi import rewards as R
from cropi.rewards import RewardStats, get_reward, math_verify_reward
from cropi.tasks import (arith_level, extract_boxed, generate_tasks, read_tasks, stable_id, word_level,
                         write_tasks)
from cropi.errors import BadConfigError
from sketchstore.errors import BadInputError

_EXPR = re.compile(r"^What is ([0-9+\-*() ]+)\?$")


def _eval_expr(expr: str) -> int:
    # independent check: Python's own arithmetic on the (digits/operators only) expression
    assert re.fullmatch(r"[0-9+\-*() ]+", expr), expr
    return eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - validated above


# ------------------------------------------------------------------------------- generator


def test_generate_deterministic_and_prefix_stable():
    a = generate_tasks(60, seed=7, difficulty=range(1, 6))
    b = generate_tasks(60, seed=7, difficulty=range(1, 6))
    c = generate_tasks(60, seed=8, difficulty=range(1, 6))
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    assert generate_tasks(20, seed=7, difficulty=range(1, 6)) == a[:20]


def test_rows_have_schema_and_unique_ids():
    rows = generate_tasks(300, seed=1, difficulty=[1, 2, 3, 4], families=["arith", "word"])
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert {r["family"] for r in rows} == {"arith", "word"}
    for r in rows:
        assert set(r) >= {"id", "prompt", "answer", "response", "difficulty", "family"}
        assert re.fullmatch(r"-?\d+", r["answer"])
        assert r["response"].endswith(f"The answer is {r['answer']}.")
        assert r["id"].startswith(r["family"] + "-1-")


def test_arith_answers_match_independent_eval():
    rows = generate_tasks(2000, seed=3, difficulty=range(1, 8), families="arith")
    for r in rows:
        m = _EXPR.match(r["prompt"])
        assert m, r["prompt"]
        assert _eval_expr(m.group(1)) == int(r["answer"]), r
        # every step of the worked solution is a correct equality
        body = r["response"].rsplit(". The answer is", 1)[0]
        values = {_eval_expr(part.strip()) for part in body.split("=")}
        assert values == {int(r["answer"])}, r["response"]


def test_word_answers_follow_their_steps():
    rows = generate_tasks(500, seed=4, difficulty=range(1, 7), families="word")
    for r in rows:
        start = int(re.search(r"has (\d+) ", r["prompt"]).group(1))
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (-?\d+)\.", r["response"])
        assert steps, r
        steps = [(int(a), op, int(b), int(c)) for a, op, b, c in steps]
        for a, op, b, c in steps:
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c
            if op == "/":
                assert a % b == 0
        cur, i = start, 0
        while i < len(steps):
            a, op, b, c = steps[i]
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            if op == "*" and nxt is not None and nxt[:3] == (cur, "+", c):  # "k bags with b each"
                cur, i = nxt[3], i + 2
            else:
                assert a == cur, r
                cur, i = c, i + 1
        assert cur == int(r["answer"]) >= 0, r


def test_difficulty_controls_size():
    def size(rows):
        ops = [len(re.findall(r" [-+*] ", _EXPR.match(r["prompt"]).group(1))) for r in rows]
        digits = [max(len(n) for n in re.findall(r"\d+", r["prompt"])) for r in rows]
        return max(ops) + 1, max(digits)

    prev = (0, 0)
    for d in range(1, 7):
        rows = generate_tasks(200, seed=d, difficulty=d, families="arith")
        lv = arith_level(d)
        operands, digits = size(rows)
        assert operands == lv["operands"] and digits == lv["digits"], (d, operands, digits)
        assert (operands, digits) >= prev
        prev = (operands, digits)
    assert arith_level(1)["operands"] < arith_level(6)["operands"]
    # word problems: more steps (sentences) at higher difficulty
    n_sent = {d: {r["prompt"].count(".") for r in generate_tasks(50, 0, d, "word")} for d in (1, 4)}
    assert n_sent[1] == {word_level(1)["steps"] + 1}
    assert min(n_sent[4]) > max(n_sent[1])


def test_bad_generate_args():
    with pytest.raises(ValueError):
        generate_tasks(5, 0, difficulty=0)
    with pytest.raises(ValueError):
        generate_tasks(5, 0, difficulty=[1], families=["nope"])


# ------------------------------------------------------------------------------- readers


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_roundtrip_native(tmp_path, ext):
    rows = generate_tasks(40, seed=2, difficulty=[1, 3], families=["arith", "word"])
    path = write_tasks(rows, tmp_path / f"sub/tasks.{ext}")
    back = read_tasks(path)
    assert back == rows


def test_gsm8k_layout(tmp_path):
    rows = [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
         "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "A big number?", "answer": "It is large.\n#### 1,234"},
    ]
    got = read_tasks(_write_jsonl(tmp_path / "gsm.jsonl", rows))
    assert [g["answer"] for g in got] == ["72", "1234"]
    assert got[0]["prompt"] == rows[0]["question"]
    assert got[0]["id"] == stable_id(rows[0]["question"])
    assert "<<" not in got[0]["response"] and got[0]["response"].endswith("The answer is 72.")
    assert got[0]["family"] == "gsm8k"
    assert math_verify_reward(got[0]["response"], got[0]["answer"], stats=RewardStats()) == 1.0


def test_math_layout_nested_boxed(tmp_path):
    rows = [
        {"problem": "Compute 1/2 + 1/4.", "solution": "We get $\\boxed{\\frac{3}{4}}$.", "level": "Level 2",
         "type": "Algebra"},
        {"problem": "Set?", "solution": "First \\boxed{1}, finally \\boxed{\\left\\{1, \\frac{2}{3}\\right\\}}.",
         "level": "Level ?", "type": "Counting"},
    ]
    path = tmp_path / "math.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    got = read_tasks(path)
    assert got[0]["answer"] == "\\frac{3}{4}"
    assert got[1]["answer"] == "\\left\\{1, \\frac{2}{3}\\right\\}"
    assert got[0]["difficulty"] == 2 and got[1]["difficulty"] == 0
    assert got[0]["family"] == "math/Algebra"
    assert math_verify_reward("The answer is 0.75.", got[0]["answer"], stats=RewardStats()) == 1.0


def test_math500_layout_answer_column_and_unique_id(tmp_path):
    rows = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "It is \\boxed{1}.", "answer": "1",
             "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
            {"problem": "AIME-style, no solution", "answer": "204", "unique_id": "aime/1"}]
    got = read_tasks(_write_jsonl(tmp_path / "m500.jsonl", rows))
    assert [g["id"] for g in got] == ["test/algebra/1.json", "aime/1"]
    assert [g["answer"] for g in got] == ["1", "204"]
    assert got[0]["difficulty"] == 1 and got[0]["family"] == "math/Algebra"
    assert got[1]["response"] == "" and "solution" not in got[0]


def test_extract_boxed():
    assert extract_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed 5") == "5"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{unbalanced") is None


def test_missing_ids_are_stable_and_repeated_prompts_disambiguated(tmp_path):
    rows = [{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?", "answer": "4"}, {"prompt": "1+1?", "answer": 2}]
    got = read_tasks(_write_jsonl(tmp_path / "t.jsonl", rows))
    assert got[0]["id"] == stable_id("1+1?") and got[2]["id"] == stable_id("1+1?") + "-1"
    assert got[0]["answer"] == "2"
    assert read_tasks(tmp_path / "t.jsonl") == got


def test_duplicate_ids_raise(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl",
                        [{"id": "a", "prompt": "x", "answer": "1"}, {"id": "a", "prompt": "y", "answer": "2"}])
    with pytest.raises(BadConfigError) as e:
        read_tasks(path)
    msg = str(e.value)
    assert "dup.jsonl" in msg and "duplicate id" in msg and "\n" not in msg


@pytest.mark.parametrize("rows,needle", [
    ([{"text": "hello"}], "missing required columns"),
    ([{"prompt": "x", "answer": "1"}, {"prompt": "y"}], "missing required column 'answer'"),
    ([{"question": "q", "answer": "no final marker"}], "####"),
    ([{"problem": "p", "solution": "no box"}], "boxed"),
])
def test_bad_input_rows(tmp_path, rows, needle):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadConfigError) as e:
        read_tasks(path)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(BadConfigError, match="does not exist"):
        read_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(BadConfigError, match="extension"):
        read_tasks(tmp_path / "t.csv")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(BadInputError, match=r"broken.jsonl:2: malformed JSON"):
        read_tasks(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadConfigError, match="no rows"):
        read_tasks(tmp_path / "empty.jsonl")
    with pytest.raises(BadConfigError, match="duplicate"):
        write_tasks([{"id": "a", "prompt": "x", "answer": "1"}] * 2, tmp_path / "o.jsonl")


# ------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("response,answer", [
    ("The answer is 0.5.", "1/2"),
    ("The answer is 1/2.", "0.5"),
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("3 * 4 = 12. The answer is 12.0.", "12"),
    ("The answer is 12.", "\\boxed{12}"),
    ("The answer is -1269.", "-1269"),
    ("The answer is 1,234.", "1234"),
    ("The answer is 3.", "\\frac{6}{2}"),
])
def test_math_verify_equivalent(response, answer):
    stats = RewardStats()
    assert math_verify_reward(response, answer, stats=stats) == 1.0
    assert stats.as_dict() == {"calls": 1, "correct": 1, "unparseable": 0, "errors": 0}


@pytest.mark.parametrize("response,answer", [
    ("The answer is 13.", "12"),
    ("\\boxed{0.49}", "1/2"),
    ("5 + 7 = 12. The answer is -12.", "12"),
])
def test_math_verify_wrong(response, answer):
    stats = RewardStats()
    assert math_verify_reward(response, answer, stats=stats) == 0.0
    assert stats.unparseable == 0 and stats.correct == 0


@pytest.mark.parametrize("response", ["", None, "blah blah", "5 + 7 = 12", "The answer is", "answer is (((",
                                      "\x00\xff<|im_end|>", "The answer is\n12"[:14]])
def test_garbage_scores_zero_and_is_counted(response):
    stats = RewardStats()
    for name in ("math_verify", "exact"):
        assert get_reward(name)(response, "12", stats=stats) == 0.0
    assert stats.unparseable == 2 and stats.calls == 2


def test_expensive_expressions_are_not_parsed():
    # a power tower would keep sympy busy for minutes (no signal timeout off the main thread)
    stats = RewardStats()
    for resp in ("The answer is 9^9^9^9.", "\\boxed{9^{9^{9^{9}}}}", "The answer is 99999!."):
        assert math_verify_reward(resp, "12", stats=stats) == 0.0
    assert stats.unparseable == 3
    assert math_verify_reward("The answer is $2^{10}$.", "1024", stats=stats) == 1.0


def test_default_stats_counts_when_none_given():
    before = R.DEFAULT_STATS.as_dict()["unparseable"]
    assert math_verify_reward("no answer here", "3") == 0.0
    assert R.DEFAULT_STATS.as_dict()["unparseable"] == before + 1


def test_exact_reward():
    ex = get_reward("exact")
    s = RewardStats()
    assert ex("2 + 3 = 5. The answer is 5.", "5", stats=s) == 1.0
    assert ex("\\boxed{ 1,234 }", "1234", stats=s) == 1.0
    assert ex("The answer is 5.0.", "5", stats=s) == 0.0  # string match, unlike math_verify
    assert ex("The answer is 6.", "5", stats=s) == 0.0
    assert s.unparseable == 0 and s.correct == 2


def test_registry():
    assert get_reward("math_verify") is math_verify_reward
    assert {"math_verify", "exact"} <= set(R.list_rewards())
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    R.register_reward("always_one", lambda resp, ans, stats=None: 1.0)
    try:
        assert get_reward("always_one")("x", "y") == 1.0
        with pytest.raises(ValueError):
            R.register_reward("always_one", lambda *a, **k: 0.0)
    finally:
        R._REGISTRY.pop("always_one", None)


def test_rewards_work_in_threads():
    cases = [("The answer is 0.5.", "1/2", 1.0), ("The answer is 7.", "8", 0.0), ("junk", "1", 0.0),
             ("\\boxed{\\frac{3}{4}}", "0.75", 1.0), ("The answer is 9^9^9^9.", "1", 0.0)] * 4
    stats = RewardStats()
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i, resp, ans):
        try:
            results[i] = math_verify_reward(resp, ans, stats=stats)
        except BaseException as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, r, a)) for i, (r, a, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [results[i] for i in range(len(cases))] == [c[2] for c in cases]
    assert stats.calls == len(cases) and stats.unparseable == 8 and stats.errors == 0

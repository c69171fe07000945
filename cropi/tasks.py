"""Offline verifiable math tasks: a seeded generator plus readers/writers.

Every task row is a dict with (at least) these keys::

    id          stable string id, unique within a file / generated set
    prompt      the question text
    answer      canonical answer string (for generated tasks: an exact integer)
    response    reference solution (the SFT target). Generated tasks always end with
                ``"The answer is <answer>."`` (see :data:`ANSWER_TEMPLATE`); rows read from
                GSM8K files are converted to that format, MATH rows keep their ``\\boxed{}``
                solution, native rows keep whatever they carry ("" when absent).
    difficulty  int (0 = unknown)
    family      str ("arith", "word", "gsm8k", "math/<type>", ...)

Generated sets are deterministic in ``seed`` and item ``i`` is drawn from its own RNG, so
``generate_tasks(10, s, d)`` is a prefix of ``generate_tasks(20, s, d)``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from sketchstore.data import (ColumnMap, given_id, map_columns, read_source, source_kind, stable_id, stable_ids,
                              write_rows)
from sketchstore.seeds import stable_seed

from .errors import BadConfigError

__all__ = [
    "ANSWER_TEMPLATE",
    "FAMILIES",
    "TASK_COLUMNS",
    "format_final_answer",
    "generate_tasks",
    "generate_arith",
    "generate_word",
    "arith_level",
    "word_level",
    "read_tasks",
    "write_tasks",
    "normalize_rows",
    "extract_boxed",
    "stable_id",
]

ANSWER_TEMPLATE = "The answer is {answer}."
FAMILIES = ("arith", "word")
TASK_COLUMNS = ("id", "prompt", "answer", "response", "difficulty", "family")


def format_final_answer(answer: object) -> str:
    """The fixed final-answer sentence every generated reference solution ends with."""
    return ANSWER_TEMPLATE.format(answer=answer)


def _item_rng(seed: int, i: int, salt: str = "") -> random.Random:
    return random.Random(stable_seed("cropi-task", salt, seed, i, bits=64))


# --------------------------------------------------------------------------------------
# Arithmetic expressions
# --------------------------------------------------------------------------------------

# Expression tree: an int leaf, or a tuple (op, left, right).
_PREC = {"+": 1, "-": 1, "*": 2}


def arith_level(difficulty: int) -> dict[str, Any]:
    """Size parameters of arithmetic tasks at ``difficulty`` (>= 1).

    operands: number of operands; digits: max digits of an operand; mul_digits: max digits
    of an operand that is a direct factor of ``*``; ops: operators allowed.
    """
    if difficulty < 1:
        raise BadConfigError(f"difficulty must be >= 1, got {difficulty}")
    table = {
        1: (2, 1, 1, "+-"),
        2: (2, 2, 1, "+-*"),
        3: (3, 2, 1, "+-*"),
        4: (3, 2, 2, "+-*"),
        5: (4, 3, 2, "+-*"),
    }
    operands, digits, mul_digits, ops = table.get(difficulty, (difficulty - 1, 3, 2, "+-*"))
    return {"operands": operands, "digits": digits, "mul_digits": mul_digits, "ops": ops}


def _rand_num(rng: random.Random, digits: int) -> int:
    # 1 digit: 1..9 ; d digits: 1..10**d-1 (biased towards using all digits)
    if digits <= 1 or rng.random() < 0.25:
        return rng.randint(1, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _random_tree(rng: random.Random, n: int, ops: str):
    if n == 1:
        return None  # placeholder leaf
    k = rng.randint(1, n - 1)
    return (rng.choice(ops), _random_tree(rng, k, ops), _random_tree(rng, n - k, ops))


def _fill_leaves(rng: random.Random, node, digits: int, mul_digits: int, parent_op: str | None = None):
    if node is None:
        return _rand_num(rng, mul_digits if parent_op == "*" else digits)
    op, left, right = node
    return (op, _fill_leaves(rng, left, digits, mul_digits, op), _fill_leaves(rng, right, digits, mul_digits, op))


def _eval_tree(node) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _eval_tree(left), _eval_tree(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _render(node, parent_op: str | None = None, right_side: bool = False) -> str:
    if isinstance(node, int):
        return str(node) if node >= 0 else f"({node})"
    op, left, right = node
    text = f"{_render(left, op, False)} {op} {_render(right, op, True)}"
    if parent_op is not None:
        p, pp = _PREC[op], _PREC[parent_op]
        if p < pp or (p == pp and right_side and parent_op == "-"):
            text = f"({text})"
    return text


def _parse_expr(text: str):
    """Parse a rendered expression back into a left-associative tree (conventional order)."""
    toks = re.findall(r"\d+|[-+*()]", text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take():
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def atom():
        t = take()
        if t == "(":
            if peek() == "-":  # parenthesised negative number
                take()
                v = -int(take())
                take()
                return v
            node = expr()
            take()
            return node
        return int(t)

    def term():
        node = atom()
        while peek() == "*":
            take()
            node = ("*", node, atom())
        return node

    def expr():
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = (op, node, term())
        return node

    return expr()


def _reduce_once(node):
    """Evaluate the leftmost operation whose operands are both numbers."""
    op, left, right = node
    if isinstance(left, int) and isinstance(right, int):
        return _eval_tree(node)
    if not isinstance(left, int):
        return (op, _reduce_once(left), right)
    return (op, left, _reduce_once(right))


def _arith_solution(tree) -> tuple[str, int]:
    steps = [_render(tree)]
    node = tree
    while not isinstance(node, int):
        node = _reduce_once(node)
        steps.append(_render(node).strip("()") if isinstance(node, int) else _render(node))
    answer = node
    return f"{' = '.join(steps)}. {format_final_answer(answer)}", answer


def generate_arith(rng: random.Random, difficulty: int) -> dict[str, Any]:
    """One arithmetic task (without id) at ``difficulty``."""
    lv = arith_level(difficulty)
    shape = _random_tree(rng, lv["operands"], lv["ops"])
    tree = _fill_leaves(rng, shape, lv["digits"], lv["mul_digits"])
    if isinstance(tree, int):  # operands == 1 never happens for difficulty >= 1, be safe
        tree = ("+", tree, _rand_num(rng, lv["digits"]))
    expr = _render(tree)
    # Re-parse so the worked solution follows the conventional (left-to-right) order.
    tree = _parse_expr(expr)
    assert _render(tree) == expr
    response, answer = _arith_solution(tree)
    return {
        "prompt": f"What is {expr}?",
        "answer": str(answer),
        "response": response,
        "difficulty": int(difficulty),
        "family": "arith",
    }


# --------------------------------------------------------------------------------------
# Templated word problems
# --------------------------------------------------------------------------------------

_NAMES = [
    ("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"),
    ("Lily", "She"), ("Max", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"),
    ("Jack", "He"), ("Nora", "She"),
]
_FRIENDS = ["a friend", "{poss} sister", "{poss} brother", "a neighbor", "the teacher", "a classmate"]
_ITEMS = ["apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "stamps",
          "cards", "shells", "eggs", "toy cars"]
_CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]


def word_level(difficulty: int) -> dict[str, Any]:
    """Size parameters of word problems: steps (operations after the start) and max number."""
    if difficulty < 1:
        raise BadConfigError(f"difficulty must be >= 1, got {difficulty}")
    table = {1: (1, 9, False), 2: (2, 20, False), 3: (2, 50, True), 4: (3, 99, True)}
    steps, max_num, rich = table.get(difficulty, (min(difficulty - 1, 6), 999, True))
    return {"steps": steps, "max_num": max_num, "rich_ops": rich}


def generate_word(rng: random.Random, difficulty: int) -> dict[str, Any]:
    """One multi-step word problem (without id) at ``difficulty``."""
    lv = word_level(difficulty)
    name, pron = rng.choice(_NAMES)
    friends = [f.format(poss="his" if pron == "He" else "her") for f in _FRIENDS]
    item = rng.choice(_ITEMS)
    hi = lv["max_num"]
    cur = rng.randint(1, hi)
    sentences = [f"{name} has {cur} {item}."]
    work: list[str] = []
    kinds = ["add", "sub"] + (["bags", "double", "split"] if lv["rich_ops"] else [])
    for _ in range(lv["steps"]):
        kind = rng.choice(kinds)
        if kind == "sub" and cur < 1:
            kind = "add"
        if kind == "split":
            divisors = [k for k in range(2, 6) if cur % k == 0 and cur > 0]
            if not divisors:
                kind = "add"
        if kind == "add":
            b = rng.randint(1, hi)
            verb = rng.choice(["buys {b} more", "finds {b} more", "gets {b} more from " + rng.choice(friends)])
            sentences.append(f"{pron} {verb.format(b=b)}.")
            work.append(f"{cur} + {b} = {cur + b}.")
            cur += b
        elif kind == "sub":
            b = rng.randint(1, cur)
            verb = rng.choice(["gives {b} to " + rng.choice(friends), "loses {b}", "sells {b}"])
            sentences.append(f"{pron} {verb.format(b=b)}.")
            work.append(f"{cur} - {b} = {cur - b}.")
            cur -= b
        elif kind == "bags":
            k = rng.randint(2, 5)
            b = rng.randint(1, min(hi, 20))
            cont = rng.choice(_CONTAINERS)
            sentences.append(f"{pron} buys {k} {cont} with {b} {item} each.")
            work.append(f"{k} * {b} = {k * b}. {cur} + {k * b} = {cur + k * b}.")
            cur += k * b
        elif kind == "double":
            sentences.append(f"Then the number of {item} {pron.lower()} has doubles.")
            work.append(f"{cur} * 2 = {cur * 2}.")
            cur *= 2
        else:  # split
            k = rng.choice(divisors)
            sentences.append(f"{pron} splits them equally into {k} boxes and keeps one box.")
            work.append(f"{cur} / {k} = {cur // k}.")
            cur //= k
    sentences.append(f"How many {item} does {name} have now?")
    return {
        "prompt": " ".join(sentences),
        "answer": str(cur),
        "response": f"{' '.join(work)} {format_final_answer(cur)}",
        "difficulty": int(difficulty),
        "family": "word",
    }


_GENERATORS = {"arith": generate_arith, "word": generate_word}


def _difficulties(difficulty: int | range | Sequence[int]) -> list[int]:
    if isinstance(difficulty, bool):
        raise BadConfigError("difficulty must be an int, range or list of ints")
    if isinstance(difficulty, int):
        levels = [difficulty]
    else:
        levels = [int(d) for d in difficulty]
    if not levels:
        raise BadConfigError("difficulty range/list is empty")
    for d in levels:
        if d < 1:
            raise BadConfigError(f"difficulty must be >= 1, got {d}")
    return levels


def generate_tasks(
    n: int,
    seed: int,
    difficulty: int | range | Sequence[int] = range(1, 4),
    families: Sequence[str] | str = FAMILIES,
) -> list[dict[str, Any]]:
    """``n`` generated tasks, deterministic in ``seed``.

    difficulty: one level or a collection of levels (each item draws one uniformly).
    families: ``"arith"``, ``"word"`` or a list of them (each item draws one uniformly).
    Row ``i`` gets id ``f"{family}-{seed}-{i}"``. Arithmetic prompts are ``"What is <expr>?"``.
    """
    if n < 0:
        raise BadConfigError(f"n must be >= 0, got {n}")
    fams = [families] if isinstance(families, str) else list(families)
    if not fams:
        raise BadConfigError("families is empty")
    for f in fams:
        if f not in _GENERATORS:
            raise BadConfigError(f"unknown task family {f!r}; known: {sorted(_GENERATORS)}")
    levels = _difficulties(difficulty)
    rows = []
    for i in range(n):
        rng = _item_rng(seed, i)
        fam = fams[0] if len(fams) == 1 else rng.choice(fams)
        level = levels[0] if len(levels) == 1 else rng.choice(levels)
        row = _GENERATORS[fam](rng, level)
        rows.append({"id": f"{fam}-{seed}-{i}", **row})
    return rows


# --------------------------------------------------------------------------------------
# Readers / writers
# --------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, nested braces handled.

    Also accepts the brace-less form ``\boxed 5``. Returns None when absent/unbalanced.
    """
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if m.group(1) is None:
            tail = re.match(r"\s*([^\s$]+)", text[m.end():])
            if tail:
                best = tail.group(1)
            continue
        depth, start = 1, m.end()
        j = start
        while j < len(text) and depth:
            c = text[j]
            if c == "\\" and j + 1 < len(text):
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth == 0:
            best = text[start : j - 1].strip()
    return best


_GSM_CALC = re.compile(r"<<[^<>]*>>")
GSM8K_MARKER = "####"


def gsm8k_final(text: str) -> str | None:
    """The final answer after the last ``####`` of a GSM8K solution (commas and ``$`` removed), or None."""
    if GSM8K_MARKER not in text:
        return None
    final = text.rpartition(GSM8K_MARKER)[2].strip().replace(",", "").replace("$", "").strip()
    return final or None


def _gsm8k_answer(text: str) -> tuple[str, str] | None:
    final = gsm8k_final(text)
    if final is None:
        return None
    body = _GSM_CALC.sub("", text.rpartition(GSM8K_MARKER)[0]).strip()
    response = f"{body}\n{format_final_answer(final)}" if body else format_final_answer(final)
    return final, response


def _as_int(v: Any, default: int = 0) -> int:
    if v is None:
        return default
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int,)):
        return v
    if isinstance(v, float):
        return int(v) if v == v else default
    m = re.search(r"-?\d+", str(v))
    return int(m.group()) if m else default


def _answer_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def normalize_rows(raw: Sequence[dict[str, Any]], source: str = "<rows>") -> list[dict[str, Any]]:
    """Turn rows in native / GSM8K / MATH layout into task rows (see module docstring).

    The layout is decided from the columns of the first row: ``prompt`` + ``answer``
    (native), ``question`` + ``answer`` (GSM8K, ``#### 42``; the response is the solution without
    its ``<<...>>`` calculator notes, ending "The answer is 42.", unless a ``response`` column is
    given), ``problem`` + ``solution``
    (MATH: answer = last ``\\boxed{}``; an ``answer`` column, as in MATH-500, wins) or
    ``problem`` + ``answer``. A native answer holding a GSM8K solution (``... #### 42``, e.g.
    mapped there by ``--answer-column``) is cut to its final answer. Ids: ``id``, else
    ``unique_id``, else :func:`stable_id` of the prompt (``-1``, ``-2``... appended for repeated
    prompts; :func:`sketchstore.data.stable_ids`, so ``sketch build`` derives the same ids).
    Raises BadConfigError naming ``source`` on problems (duplicate ids, missing columns, no
    final answer).
    """
    if not raw:
        raise BadConfigError(f"{source}: no rows")
    cols = set(raw[0].keys())
    if {"prompt", "answer"} <= cols:
        layout = "native"
    elif {"question", "answer"} <= cols:
        layout = "gsm8k"
    elif "problem" in cols and ("solution" in cols or "answer" in cols):
        layout = "math"
    else:
        raise BadConfigError(
            f"{source}: missing required columns: need prompt+answer, question+answer (GSM8K) "
            f"or problem+solution/answer (MATH); found {sorted(cols)}"
        )
    need = {"native": ("prompt", "answer"), "gsm8k": ("question", "answer"), "math": ("problem",)}[layout]
    out: list[dict[str, Any]] = []
    for k, r in enumerate(raw):
        for c in need:
            if c not in r or r[c] is None:
                raise BadConfigError(f"{source}: row {k} is missing required column {c!r} ({layout} layout)")
        extra = {c: v for c, v in r.items() if c not in TASK_COLUMNS and c not in need}
        if layout == "native":
            prompt = str(r["prompt"])
            answer = _answer_str(r["answer"])
            answer = gsm8k_final(answer) or answer
            response = "" if r.get("response") is None else str(r["response"])
            family = str(r.get("family") or "native")
            difficulty = _as_int(r.get("difficulty"))
        elif layout == "gsm8k":
            prompt = str(r["question"])
            parsed = _gsm8k_answer(str(r["answer"]))
            if parsed is None:
                raise BadConfigError(f"{source}: row {k}: GSM8K answer has no final '#### <number>'")
            answer, response = parsed
            response = response if r.get("response") in (None, "") else str(r["response"])  # a mapped response wins
            family = str(r.get("family") or "gsm8k")
            difficulty = _as_int(r.get("difficulty"))
        else:
            prompt = str(r["problem"])
            solution = "" if r.get("solution") is None else str(r["solution"])
            if r.get("answer") not in (None, ""):
                answer = _answer_str(r["answer"])
            else:
                boxed = extract_boxed(solution)
                if boxed is None:
                    raise BadConfigError(f"{source}: row {k}: MATH solution has no \\boxed{{...}} answer "
                                        "(and no answer column)")
                answer = boxed
            response = solution
            typ = r.get("type") or r.get("subject")
            family = str(r.get("family") or (f"math/{typ}" if typ else "math"))
            difficulty = _as_int(r.get("difficulty", r.get("level")))
            extra = {c: v for c, v in extra.items() if c not in ("answer", "solution")}
        if not answer:
            raise BadConfigError(f"{source}: row {k}: empty answer")
        own = given_id(r)
        extra.pop("id", None)
        out.append({"id": None if own is None else str(own), "prompt": prompt, "answer": answer,
                    "response": response, "difficulty": difficulty, "family": family, **extra})
    derived = iter(stable_ids(row["prompt"] for row in out if row["id"] is None))
    seen: dict[str, int] = {}
    for k, row in enumerate(out):
        row["id"] = next(derived) if row["id"] is None else row["id"]
        if row["id"] in seen:
            raise BadConfigError(f"{source}: duplicate id {row['id']!r} (rows {seen[row['id']]} and {k})")
        seen[row["id"]] = k
    return out


def read_tasks(path: str | os.PathLike, columns: ColumnMap | None = None) -> list[dict[str, Any]]:
    """Read tasks from any source :func:`sketchstore.data.read_source` reads (JSONL/JSON, Parquet,
    Parquet shards, a datasets ``save_to_disk`` directory), in any supported layout; ``columns``
    maps other column names to ``prompt``/``response``/``answer``/``id``."""
    p = Path(path)
    kind = source_kind(p)
    if kind != "glob" and not p.exists():
        raise BadConfigError(f"{p}: task file does not exist")
    if kind is None and not p.is_dir():  # a directory of something else: read_source names what it lacks
        raise BadConfigError(f"{p}: unsupported task file extension {p.suffix.lower()!r} (use .jsonl, .json, "
                             ".parquet, a directory or glob of Parquet shards, or a datasets save_to_disk directory)")
    return normalize_rows(map_columns(read_source(p), columns, str(p)), str(p))


def write_tasks(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write task rows to ``.jsonl`` or ``.parquet`` (atomically: temp file + rename)."""
    p = Path(path)
    rows = list(rows)
    if p.suffix.lower() not in (".jsonl", ".ndjson", ".parquet", ".pq"):
        raise BadConfigError(f"{p}: unsupported task file extension {p.suffix.lower()!r} (use .jsonl or .parquet)")
    ids = [r.get("id") for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BadConfigError(f"{p}: refusing to write duplicate id {dup!r}")
    return write_rows(rows, p)


def load_task_rows(source: Any, what: str) -> list[dict[str, Any]]:
    """Task rows from a task file or an iterable of rows, each with ``id`` (as str), ``prompt`` and ``answer``."""
    rows = read_tasks(Path(source)) if isinstance(source, (str, os.PathLike)) else [dict(r) for r in source]
    for i, r in enumerate(rows):
        for key in ("id", "prompt", "answer"):
            if key not in r:
                raise BadConfigError(f"{what}: row {i} lacks {key!r}")
        r["id"] = str(r["id"])
    return rows

"""Task families with a correct and a plausible wrong procedure, for the RL testbed.

Each generator takes ``(rng, level)`` and returns one problem::

    prompt        the question (short; each family has its own wording)
    answer        the correct integer answer, as a string
    response      the correct worked answer: "<procedure> <result>. The answer is <answer>."
    alt_answer    the answer of the family's plausible wrong procedure (None: no such procedure)
    alt_response  the wrong procedure's worked answer, in the same format
    difficulty    ``level`` (1 = easiest)
    family        the family name

The wrong procedure is a systematic error a learner could really make (reading the first
item instead of the largest, counting from 0, the quotient instead of the remainder, a
subtraction in the wrong order, ...), and it never gives the right answer (items where it
would are redrawn). Each family names its procedure with its own first word, so the choice
between the two procedures is the first token of the response and differs per family:
a policy warm-started on a mixture of both procedures samples the right one with some
probability, and RL on one family need not move another family's choice.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from .errors import BadConfigError
from .tasks import format_final_answer

__all__ = ["FAMILIES_VERSION", "FAMILY_GENERATORS", "FAMILY_LEVELS", "generate_family", "family_names"]

# Bump when a generator's output changes (it is part of the testbed warm start's cache key).
FAMILIES_VERSION = 1

# Items in a list per level (list families) and digits per operand (number families).
LIST_LENGTHS = {1: 3, 2: 5, 3: 7}
NUMBER_DIGITS = {1: 1, 2: 2, 3: 3}
# Digits per factor of the product family (beyond what the small policies can compute).
PRODUCT_DIGITS = {1: 2, 2: 3, 3: 4}
# Redraws before an item whose wrong procedure matches the right one is accepted as an error.
MAX_REDRAWS = 100

Problem = dict[str, Any]


def _worked(procedure: str, result: int) -> str:
    return f"{procedure} {result}. {format_final_answer(result)}"


def _digits(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(0, 9) for _ in range(n)]


def _listed(items: list[int]) -> str:
    return " ".join(str(x) for x in items)


def _number(rng: random.Random, digits: int, low: int = 1) -> int:
    return rng.randint(max(low, 10 ** (digits - 1) if digits > 1 else low), 10**digits - 1)


def _problem(prompt: str, answer: int, procedure: str, alt: tuple[str, int] | None) -> Problem:
    return {
        "prompt": prompt,
        "answer": str(answer),
        "response": _worked(procedure, answer),
        "alt_answer": None if alt is None else str(alt[1]),
        "alt_response": None if alt is None else _worked(*alt),
    }


def _largest(rng: random.Random, level: int) -> Problem:
    """Largest item of a digit list; wrong: the first item."""
    xs = _digits(rng, LIST_LENGTHS[level])
    return _problem(f"Largest of {_listed(xs)}?", max(xs), "Max", ("First", xs[0]))


def _smallest(rng: random.Random, level: int) -> Problem:
    """Smallest item of a digit list; wrong: the last item."""
    xs = _digits(rng, LIST_LENGTHS[level])
    return _problem(f"Smallest of {_listed(xs)}?", min(xs), "Min", ("Last", xs[-1]))


def _position(rng: random.Random, level: int) -> Problem:
    """1-based position of a digit's first occurrence; wrong: counting from 0."""
    xs = _digits(rng, LIST_LENGTHS[level])
    target = rng.choice(xs)
    pos = xs.index(target)
    return _problem(f"Position of {target} in {_listed(xs)}?", pos + 1, "From one", ("From zero", pos))


def _count(rng: random.Random, level: int) -> Problem:
    """How often a digit occurs in a list; wrong: the length of the list."""
    xs = _digits(rng, LIST_LENGTHS[level])
    target = rng.choice(xs)
    return _problem(f"How many {target}s in {_listed(xs)}?", xs.count(target), "Count", ("Length", len(xs)))


def _remainder(rng: random.Random, level: int) -> Problem:
    """Remainder of a division; wrong: the quotient."""
    d = rng.randint(2, 9)
    a = _number(rng, NUMBER_DIGITS[level] + 1, low=d)
    return _problem(f"Remainder of {a} divided by {d}?", a % d, "Remainder", ("Quotient", a // d))


def _distance(rng: random.Random, level: int) -> Problem:
    """Distance |a - b| with a > b; wrong: b - a (the subtraction in the order read)."""
    digits = NUMBER_DIGITS[level]
    b = _number(rng, digits)
    a = _number(rng, digits)
    hi, lo = max(a, b), min(a, b)
    return _problem(f"Distance from {lo} to {hi}?", hi - lo, f"{hi} - {lo} =", (f"{lo} - {hi} =", lo - hi))


def _repeat(rng: random.Random, level: int) -> Problem:
    """Say a number back (every policy that learnt the format solves it)."""
    a = _number(rng, NUMBER_DIGITS[level])
    return _problem(f"Repeat {a}.", a, "Number", None)


def _product(rng: random.Random, level: int) -> Problem:
    """A long multiplication (no small policy here computes it: never solved)."""
    digits = PRODUCT_DIGITS[level]
    a, b = _number(rng, digits), _number(rng, digits)
    return _problem(f"Product of {a} and {b}?", a * b, f"{a} * {b} =", None)


FAMILY_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "largest": _largest,
    "smallest": _smallest,
    "position": _position,
    "count": _count,
    "remainder": _remainder,
    "distance": _distance,
    "repeat": _repeat,
    "product": _product,
}
FAMILY_LEVELS = (1, 2, 3)


def family_names() -> list[str]:
    return list(FAMILY_GENERATORS)


def generate_family(family: str, rng: random.Random, level: int) -> Problem:
    """One problem of ``family`` at ``level``; items where the wrong procedure would give the
    right answer are redrawn (up to :data:`MAX_REDRAWS` times)."""
    if family not in FAMILY_GENERATORS:
        raise BadConfigError(f"unknown testbed family {family!r}; known: {', '.join(FAMILY_GENERATORS)}")
    if level not in FAMILY_LEVELS:
        raise BadConfigError(f"testbed level must be one of {FAMILY_LEVELS}, got {level!r}")
    make = FAMILY_GENERATORS[family]
    for _ in range(MAX_REDRAWS):
        problem = make(rng, level)
        if problem["alt_answer"] != problem["answer"]:
            break
    return {**problem, "difficulty": level, "family": family}

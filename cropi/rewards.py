"""Verifiable rewards: ``reward(response_text, answer) -> float`` in {0.0, 1.0}.

``math_verify`` (default) extracts the final answer of a response -- the last
``\\boxed{...}``, the value after "The answer is" / "final answer is", or GSM8K's final line
``#### N`` (commas allowed, e.g. ``#### 1,234``; it counts when no box or "answer is" comes
after it) -- with the ``math-verify`` package and compares it with the gold answer by mathematical equivalence
("0.5" == "1/2", "12.0" == "12"). ``exact`` compares the extracted answer as a normalised
string. A response whose answer cannot be extracted scores 0.0 and is counted as
*unparseable* in a :class:`RewardStats` (the module-wide :data:`DEFAULT_STATS` unless one
is passed); reward functions never raise on bad model output.

Thread safety: math-verify's timeouts use ``signal.alarm`` which only works in the main
thread; outside it this module disables them (``parsing_timeout=None``,
``timeout_seconds=None``) so the rewards work from worker threads too.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .errors import BadConfigError

__all__ = [
    "DEFAULT_STATS",
    "RewardResult",
    "RewardStats",
    "exact_reward",
    "exact_score",
    "extract_answer_text",
    "get_reward",
    "get_scorer",
    "gsm8k_final_answer",
    "list_rewards",
    "math_verify_reward",
    "math_verify_score",
    "register_reward",
]

RewardFn = Callable[..., float]

# The tail of a response that is searched for the final answer (bounds parsing cost).
MAX_RESPONSE_CHARS = 4000
# Gold/extracted answers longer than this are not handed to sympy (bounds parsing cost).
MAX_ANSWER_CHARS = 200
# math-verify's timeouts (seconds), used only in the main thread.
TIMEOUT_S = 5
# GSM8K's final answer line, "#### 72" / "#### -1,234" / "#### $3.50": sign, digits with thousands commas, decimals.
_GSM8K_FINAL = re.compile(r"####\s*\$?\s*([-+]?(?:\d[\d,]*)?\.?\d+)")
# Anchors of math-verify's extraction: a "####" line counts only when none of these follows it.
_LATER_ANCHOR = re.compile(r"(?i)\\boxed|\\fbox|answer\s*(?:is|:)")


class RewardResult(NamedTuple):
    reward: float
    parsed: bool  # False: no final answer could be extracted from the response
    extracted: str | None  # the extracted answer text (None when not parsed)


@dataclass
class RewardStats:
    """Thread-safe counters of reward calls."""

    calls: int = 0
    correct: int = 0
    unparseable: int = 0
    errors: int = 0  # exceptions inside math-verify (scored 0.0, also counted as unparseable)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, result: RewardResult, error: bool = False) -> None:
        with self._lock:
            self.calls += 1
            self.correct += int(result.reward > 0)
            self.unparseable += int(not result.parsed)
            self.errors += int(error)

    def reset(self) -> None:
        with self._lock:
            self.calls = self.correct = self.unparseable = self.errors = 0

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "correct": self.correct,
                    "unparseable": self.unparseable, "errors": self.errors}


DEFAULT_STATS = RewardStats()
_log = logging.getLogger(__name__)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _timeout() -> int | None:
    return TIMEOUT_S if _in_main_thread() else None


# Silence math-verify's "Timeout is disabled" warning (we disable it on purpose off-main-thread).
logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
logging.getLogger("math_verify.grader").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=1)
def _pred_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # Anchored only: a response must box its answer or state it ("The answer is X");
    # a bare trailing number (e.g. a truncated generation) does not count.
    return (
        LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0),
        ExprExtractionConfig(try_extract_without_anchor=False),
    )


@functools.lru_cache(maxsize=1)
def _gold_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(), ExprExtractionConfig())


def gsm8k_final_answer(text: str) -> str | None:
    """The number of the last ``#### N`` line (commas removed) when no box or "answer is" follows it, else None."""
    matches = list(_GSM8K_FINAL.finditer(text))
    if not matches or _LATER_ANCHOR.search(text, matches[-1].end()):
        return None
    return matches[-1].group(1).replace(",", "")


@functools.lru_cache(maxsize=65536)
def _parse_gold_cached(answer: str, use_timeout: bool):
    from math_verify import parse

    timeout = TIMEOUT_S if use_timeout else None
    text = answer.strip()
    gold = []
    if not text.startswith("$") and "\\boxed" not in text:
        gold = parse(f"${text}$", extraction_config=_gold_config(), parsing_timeout=timeout)
    if not gold:
        gold = parse(text, extraction_config=_gold_config(), parsing_timeout=timeout)
    return tuple(gold)


def _parse_gold(answer: str):
    return list(_parse_gold_cached(str(answer), _in_main_thread()))


_CHAINED_POW = re.compile(r"(\^|\*\*)\s*[({]?\s*-?[\d.]+\s*[)}]?\s*(\^|\*\*)")
_BIG_POW = re.compile(r"(\^|\*\*)\s*[({]?\s*-?\d{4,}")
_BIG_FACT = re.compile(r"\d{4,}\s*!")
_HUGE_NUM = re.compile(r"\d{200,}")


def _looks_expensive(text: str) -> bool:
    """Inputs that can make sympy run (near) forever: towers like 9^9^9^9, huge exponents or
    factorials. Without signal timeouts (worker threads) these must never reach sympy."""
    return bool(
        _CHAINED_POW.search(text) or _BIG_POW.search(text) or _BIG_FACT.search(text) or _HUGE_NUM.search(text)
    )


def math_verify_score(response: str, answer: str) -> RewardResult:
    """Score one response against a gold answer with math-verify (never raises)."""
    from math_verify import parse, verify

    text = "" if response is None else str(response)[-MAX_RESPONSE_CHARS:]
    if _looks_expensive(text):
        return RewardResult(0.0, False, None)
    timeout = _timeout()
    final = gsm8k_final_answer(text)
    if final is not None:
        pred = _parse_gold(final)
    else:
        pred = parse(text, extraction_config=_pred_config(), parsing_timeout=timeout) if text.strip() else []
    if not pred:
        return RewardResult(0.0, False, None)
    extracted = str(pred[-1])
    if len(extracted) > MAX_ANSWER_CHARS:
        return RewardResult(0.0, True, extracted[:MAX_ANSWER_CHARS])
    gold = _parse_gold(answer)
    if not gold:
        # Gold not parseable as math: fall back to a normalised string match.
        ok = _normalise(extracted) == _normalise(str(answer))
        return RewardResult(float(ok), True, extracted)
    ok = verify(gold, pred, timeout_seconds=timeout)
    return RewardResult(1.0 if ok else 0.0, True, extracted)


def math_verify_reward(response: str, answer: str, stats: RewardStats | None = None) -> float:
    """1.0 if the response's final answer is mathematically equal to ``answer`` else 0.0."""
    stats = DEFAULT_STATS if stats is None else stats
    try:
        result = math_verify_score(response, answer)
        error = False
    except Exception as e:  # math-verify / sympy should not raise, but never propagate
        _log.debug("math_verify_reward failed: %r", e)
        result, error = RewardResult(0.0, False, None), True
    stats.record(result, error)
    return result.reward


# --------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?i)answer\s*(?:is|:)\s*:?\s*(.+?)\s*(?:\.\s*$|\.\s+|\n|$)")


def extract_answer_text(response: str) -> str | None:
    """The final answer as text: a final ``#### N`` line (:func:`gsm8k_final_answer`), else the
    last ``\\boxed{}`` content, else the text after the last "answer is" / "answer:"; None when
    none is present."""
    from .tasks import extract_boxed

    text = "" if response is None else str(response)[-MAX_RESPONSE_CHARS:]
    final = gsm8k_final_answer(text)
    if final is not None:
        return final
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    out = matches[-1].group(1).strip()
    return out if re.search(r"\w", out) else None


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\boxed\s*\{(.*)\}", r"\1", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,234 -> 1234
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def exact_score(response: str, answer: str) -> RewardResult:
    extracted = extract_answer_text(response)
    if extracted is None:
        return RewardResult(0.0, False, None)
    return RewardResult(float(_normalise(extracted) == _normalise(str(answer))), True, extracted)


def exact_reward(response: str, answer: str, stats: RewardStats | None = None) -> float:
    """1.0 if the extracted final answer equals ``answer`` after string normalisation."""
    stats = DEFAULT_STATS if stats is None else stats
    result = exact_score(response, answer)
    stats.record(result)
    return result.reward


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

ScoreFn = Callable[[str, str], RewardResult]
_REGISTRY: dict[str, RewardFn] = {"math_verify": math_verify_reward, "exact": exact_reward}
_SCORERS: dict[str, ScoreFn] = {"math_verify": math_verify_score, "exact": exact_score}


def register_reward(name: str, fn: RewardFn, overwrite: bool = False, score: ScoreFn | None = None) -> None:
    """Add a reward ``fn(response, answer, stats=None) -> float`` under ``name``; ``score``, when
    given, returns the :class:`RewardResult` (with the extracted answer) that ``fn`` rewards."""
    if name in _REGISTRY and not overwrite:
        raise BadConfigError(f"reward {name!r} is already registered")
    _REGISTRY[name] = fn
    _SCORERS.pop(name, None)
    if score is not None:
        _SCORERS[name] = score


def get_scorer(name: str = "math_verify") -> ScoreFn:
    """``score(response, answer) -> RewardResult`` of reward ``name`` (never raises on bad output).
    A reward registered without a scorer reports parsed from its :class:`RewardStats` and no
    extracted text."""
    fn = get_reward(name)
    own = _SCORERS.get(name)

    def score(response: str, answer: str) -> RewardResult:
        if own is not None:
            try:
                return own(response, answer)
            except Exception as e:  # as math_verify_reward: bad output scores 0, never propagates
                _log.debug("%s scoring failed: %r", name, e)
                return RewardResult(0.0, False, None)
        stats = RewardStats()
        reward = fn(response, answer, stats=stats)
        return RewardResult(float(reward), stats.unparseable == 0, None)

    return score


def get_reward(name: str = "math_verify") -> RewardFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadConfigError(f"unknown reward {name!r}; known: {sorted(_REGISTRY)}") from None


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)

r"""
Math answer accuracy: extract the final answer, check it against the reference, with a hard time limit.

Pipeline for one completion:

1. **Extract** the final answer: the last `\boxed{...}` (brace-aware, so `\boxed{\frac{\sqrt{2}}{2}}` works), else the
   last `#### N` (GSM8K style), or with `MathAccuracyReward(pattern=...)` the last match of a regex. No answer → 0.0.
2. **Quick check** in-process: normalized string equality (spaces, `$`, `\left`/`\right`, thousands separators,
   trailing `.0`, `\dfrac`, ...), then exact rational comparison when both sides are plain numbers or simple fractions.
   Integer-vs-integer answers (most of GSM8K) are decided here and never reach the verifier.
3. **Symbolic check** with math-verify (`parse` + `verify`: fractions, LaTeX, radicals, sets, ...) in a persistent
   worker process, under a per-completion time limit.

The symbolic check and its time limit are in `pbsd_trl.rewards.verifier`; extraction and the quick check stay here
because they decide most answers without it (128 integer answers: 10 ms in-process, 159 ms through math-verify).
"""

import importlib.util
import logging
import os
import re
import threading
from fractions import Fraction
from typing import Any, Literal

from .base import RewardFunction
from .verifier import SoftTimeout, call_with_soft_timeout, get_worker, silence_math_verify, symbolic_equal


__all__ = [
    "MathAccuracyReward",
    "extract_boxed",
    "extract_final_answer",
    "math_accuracy_reward",
    "normalize_answer",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------------

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_ANSWER = re.compile(r"####[ \t]*((?:(?!####)[^\n])*)")  # up to the line end or the next ####
# A number followed by words ("#### 72 apples."), to keep only the number.
_NUMBER_THEN_WORDS = re.compile(r"^\\?\$?\s*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?:\s+[A-Za-z].*)?$")


def _balanced_braces(text: str, start: int) -> str | None:
    """Return the content of the brace group whose `{` is at `start`, or `None` if it is never closed."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\":  # `\{`, `\}` and `\\` are literals, not group delimiters
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str, which: Literal["last", "first"] = "last") -> str | None:
    r"""
    Return the content of the last (or first) `\boxed{...}` / `\fbox{...}` in `text`, matching nested braces.

    Returns `None` if there is none or if the chosen one is never closed (a truncated generation): an unfinished final
    answer is not an answer, and falling back to an earlier box would reward intermediate results.
    """
    matches = list(_BOXED_START.finditer(text))
    if not matches:
        return None
    match = matches[-1] if which == "last" else matches[0]
    content = _balanced_braces(text, match.end() - 1)
    return content.strip() if content is not None else None


def _extract_hash_answer(text: str, which: Literal["last", "first"] = "last") -> str | None:
    matches = _HASH_ANSWER.findall(text)
    if not matches:
        return None
    answer = (matches[-1] if which == "last" else matches[0]).strip().rstrip(".").strip()
    number = _NUMBER_THEN_WORDS.match(answer)
    if number:
        answer = number.group(1)
    return answer or None


def extract_final_answer(
    text: str, pattern: str | re.Pattern | None = None, which: Literal["last", "first"] = "last"
) -> str | None:
    r"""
    Extract the final answer from a completion or a reference solution.

    Args:
        text: The text.
        pattern: If given, a regex whose last (or first) match is the answer (group 1 if the regex has a group,
            else the whole match); it replaces the default rules.
        which: Use the `"last"` occurrence (the final answer, default) or the `"first"` one.

    Returns:
        `str | None`: With the default rules, the content of the last `\boxed{...}`, else of the last `#### ...` line
        (a leading number is kept and trailing words dropped: `#### 72 apples.` -> `72`); `None` if nothing matches.
    """
    if not isinstance(text, str) or not text:
        return None
    if pattern is not None:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        matches = list(regex.finditer(text))
        if not matches:
            return None
        match = matches[-1] if which == "last" else matches[0]
        answer = match.group(1) if regex.groups else match.group(0)
        return answer.strip() if answer and answer.strip() else None
    boxed = extract_boxed(text, which)
    if boxed is not None or _BOXED_START.search(text):
        return boxed or None
    return _extract_hash_answer(text, which)


# ---------------------------------------------------------------------------------------------------------------------
# Normalization and the in-process quick check
# ---------------------------------------------------------------------------------------------------------------------

_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\(?:left|right)\b|\\displaystyle\b|~")
_TRAILING_UNIT = re.compile(r"^([-+]?[\d.,]+)\\(?:text|mbox|mathrm)\{[^{}]*\}$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^([-+]?)(\d*)(?:\.(\d*))?$")
_FRACTION = re.compile(r"^([-+]?)(?:\\frac\{(\d{1,40})\}\{(\d{1,40})\}|\\frac(\d)(\d)|(\d{1,40})/(\d{1,40}))$")
_MAX_NUMBER_CHARS = 60  # longer literals go to the verifier (and its time limit) instead of exact arithmetic


def normalize_answer(answer: str) -> str:
    r"""
    Normalize an answer string for exact comparison.

    Removes whitespace, `$`/`\$`, LaTeX spacing and `\left`/`\right`, a trailing period, outer braces, a `\text{...}`
    unit after a number (`5\text{ cm}` -> `5`); rewrites `\dfrac`/`\tfrac` as `\frac`, `{,}` as `,`; drops thousands
    separators from numbers (`1,000` -> `1000`); and writes plain decimals canonically (`+5.00` -> `5`, `.5` -> `0.5`,
    `-0` -> `0`).
    """
    s = str(answer)
    s = s.replace("\\$", "").replace("$", "")
    s = _LATEX_SPACING.sub("", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    while len(s) >= 2 and s[0] == "{" and _balanced_braces(s, 0) == s[1:-1]:
        s = s[1:-1]
    unit = _TRAILING_UNIT.match(s)
    if unit:
        s = unit.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    decimal = _DECIMAL.match(s)
    if decimal and (decimal.group(2) or decimal.group(3)) and len(s) <= _MAX_NUMBER_CHARS:
        sign, whole, frac = decimal.group(1), decimal.group(2).lstrip("0") or "0", (decimal.group(3) or "").rstrip("0")
        s = whole + (f".{frac}" if frac else "")
        if sign == "-" and s != "0":
            s = "-" + s
    return s


def _as_rational(normalized: str) -> Fraction | None:
    """Exact value of a plain number or simple fraction (`-3`, `0.25`, `\frac{1}{2}`, `\frac12`, `3/4`), else None."""
    if len(normalized) > _MAX_NUMBER_CHARS:
        return None
    decimal = _DECIMAL.match(normalized)
    if decimal and (decimal.group(2) or decimal.group(3)):
        return Fraction(normalized)
    fraction = _FRACTION.match(normalized)
    if fraction:
        sign, *groups = fraction.groups()
        numerator, denominator = (int(g) for g in groups if g is not None)
        if denominator == 0:
            return None
        return Fraction(-numerator if sign == "-" else numerator, denominator)
    return None


def _quick_check(pred: str, gold: str) -> bool | None:
    """Decide cheaply when possible: True/False, or None to defer to the symbolic verifier."""
    if pred == gold:
        return True
    pred_value, gold_value = _as_rational(pred), _as_rational(gold)
    if pred_value is not None and gold_value is not None:
        if pred_value == gold_value:
            return True
        # Two different integers are never equivalent. Non-integers go on to math-verify, which also accepts
        # answers that agree after rounding (e.g. 0.333333 for 1/3), so the two paths give the same verdicts.
        if pred_value.denominator == 1 and gold_value.denominator == 1:
            return False
    return None


_MATH_VERIFY_AVAILABLE = importlib.util.find_spec("math_verify") is not None
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------------


class MathAccuracyReward(RewardFunction):
    r"""
    1.0 if a completion's final answer is mathematically equivalent to the reference answer, else 0.0.

    See the module docstring for the pipeline. Malformed completions (no answer, unbalanced braces, unparseable,
    too long, too slow to verify) score 0.0 and never raise. The reference comes from the `answer_column` column (a
    bare answer like `\frac{1}{2}`, or a full solution ending in `\boxed{...}` / `#### N` like GSM8K's `answer`), or
    else from the `solution` column (TRL's `accuracy_reward` convention), whose final answer is extracted the same way
    (without a marker, a solution is searched as free text, as TRL does).
    A missing or empty reference gives `None` (GRPO then ignores this function for that completion).

    Args:
        pattern: Regex for the final answer instead of `\boxed{}`/`####` (group 1 if it has one, else the match).
        timeout_seconds: Time limit for verifying one completion (parse + verify), enforced by killing the verifier
            worker; a completion that hits it scores 0.0.
        answer_column: Dataset column holding the reference answer.
        which: `"last"` (default) or `"first"` occurrence of the answer marker in the completion.
        use_subprocess: Verify in the worker process (default). `False` verifies in-process: the time limit then uses
            SIGALRM and only applies on the main thread, and C-level computations cannot be interrupted.
        max_answer_chars: Extracted answers longer than this score 0.0 without verification.
        soft_timeout_fraction: The worker interrupts itself (cheaply, without being killed) after this fraction of the
            time limit; `None` disables that and relies on the kill alone.
        name: The function name used in GRPO's metrics (default `math_accuracy_reward`).

    Example:
    ```python
    >>> reward = MathAccuracyReward(timeout_seconds=2.0)
    >>> reward(prompts=["q", "q"], completions=[r"so \boxed{\frac{1}{2}}", "#### 0.6"], answer=["0.5", "0.5"])
    [1.0, 0.0]
    ```
    """

    name = "math_accuracy_reward"

    def __init__(
        self,
        pattern: str | None = None,
        timeout_seconds: float = 5.0,
        answer_column: str = "answer",
        which: Literal["last", "first"] = "last",
        use_subprocess: bool = True,
        max_answer_chars: int = 1000,
        soft_timeout_fraction: float | None = 0.8,
        name: str | None = None,
    ):
        super().__init__(name)
        if timeout_seconds is None or timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {timeout_seconds}")
        if which not in ("last", "first"):
            raise ValueError(f"which must be 'last' or 'first', got {which!r}")
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.timeout_seconds = float(timeout_seconds)
        self.answer_column = answer_column
        self.which = which
        self.use_subprocess = use_subprocess and os.name == "posix"
        self.max_answer_chars = max_answer_chars
        self.soft_timeout_fraction = soft_timeout_fraction

    # -- reference -------------------------------------------------------------------------------------------------

    def _reference(self, row: dict[str, Any]) -> tuple[str | None, bool]:
        """The reference answer and whether it is a bare answer (wrap in \\boxed{}) rather than free solution text."""
        if self.answer_column not in row and "solution" not in row:
            raise KeyError(
                f"{self.__name__} needs the reference answer in a dataset column named '{self.answer_column}' or "
                f"'solution'; the batch has columns {sorted(row)}"
            )
        reference, is_solution = row.get(self.answer_column), False
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            reference, is_solution = row.get("solution"), True
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            return None, True
        reference = str(reference)
        extracted = extract_final_answer(reference, which="last")  # references are ours: always the last marker
        if extracted is not None:
            return extracted, True
        # Without a marker, an `answer` is a bare answer; a `solution` is free text for math-verify to search.
        return reference.strip(), not is_solution

    # -- scoring ---------------------------------------------------------------------------------------------------

    def verify_answer(self, pred: str | None, gold: str | None, wrap_gold: bool = True) -> float | None:
        """Score an extracted answer against a reference answer: 1.0, 0.0, or None when there is no reference."""
        if gold is None:
            return None
        if not pred or len(pred) > self.max_answer_chars:
            return 0.0
        pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
        if not pred_norm:
            return 0.0
        quick = _quick_check(pred_norm, gold_norm)
        if quick is not None:
            return float(quick)
        if not _MATH_VERIFY_AVAILABLE:
            _warn_once("no-math-verify", "math-verify is not installed; math answers are compared as strings/numbers.")
            return 0.0
        if len(gold) > 10 * self.max_answer_chars:
            return 0.0
        if self.use_subprocess:
            outcome = get_worker().verify(pred, gold, wrap_gold, self.timeout_seconds, self.soft_timeout_fraction)
            if outcome != "unavailable":
                return 1.0 if outcome == "equal" else 0.0
        return self._verify_in_process(pred, gold, wrap_gold)

    def _verify_in_process(self, pred: str, gold: str, wrap_gold: bool) -> float:
        silence_math_verify()
        on_main_thread = threading.current_thread() is threading.main_thread()
        if not on_main_thread:
            _warn_once(
                "no-timeout",
                "Verifying math answers in-process off the main thread: no time limit can be enforced there.",
            )
        try:
            timeout = self.timeout_seconds if on_main_thread and os.name == "posix" else None
            return float(call_with_soft_timeout(timeout, symbolic_equal, pred, gold, wrap_gold))
        except SoftTimeout:
            return 0.0
        except Exception:
            return 0.0

    def score(self, prompt: Any, completion: str, **row: Any) -> float | None:
        gold, wrap_gold = self._reference(row)
        if gold is None:
            return None
        try:
            pred = extract_final_answer(completion, self.pattern, self.which)
        except Exception:  # defensive: extraction is regex-only, but a reward must never take training down
            return 0.0
        return self.verify_answer(pred, gold, wrap_gold)

    def score_batch(self, prompts, completions, rows, **batch_kwargs):
        worker = get_worker() if self.use_subprocess else None
        before = dict(worker.stats) if worker else None
        rewards = super().score_batch(prompts, completions, rows)
        log_metric = batch_kwargs.get("log_metric")
        if log_metric is not None and worker is not None:
            # How often the time limit fired: a rising value means the policy found expressions that stall sympy.
            log_metric(f"{self.__name__}/verifier_timeouts", worker.stats["timeouts"] - before["timeouts"])
        return rewards


_DEFAULT_REWARD = MathAccuracyReward()


def math_accuracy_reward(
    prompts: list | None = None, completions: list | None = None, **kwargs: Any
) -> list[float | None]:
    r"""
    GRPO reward function: 1.0 if the completion's final answer (last `\boxed{}` or `#### N`) is equivalent to the
    reference answer (column `answer`, else `solution`), else 0.0; `None` where there is no reference.

    This is [`MathAccuracyReward`] with default settings (5 s per completion, verified in a worker process); build a
    `MathAccuracyReward(...)` to change them.

    Example:
    ```python
    >>> math_accuracy_reward(completions=[[{"role": "assistant", "content": r"\boxed{1,000}"}]], answer=["1000"])
    [1.0]
    ```
    """
    if completions is None:
        raise TypeError("math_accuracy_reward() needs `completions`")
    return _DEFAULT_REWARD(prompts, completions, **kwargs)

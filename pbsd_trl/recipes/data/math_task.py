"""Synthetic arithmetic task whose operation is written as a code, with a hint as privileged context.

Problems are `a+b`, `a-b` (`a >= b`; `b` may have one digit) and `a*d` (`d` in 2..9), but the prompt writes the operation
as a code that the prompt does not explain ([`OPERATION_CODES`]: `$` is `+`, `@` is `-`, `&` is `*`), e.g.
`"347$589="`. The answer is a right-to-left digit scratchpad, after the problem restated with its real operation,
ending with the final answer in GSM8K style:

```python
>>> math_completion(347, "+", 589)
'347+589: 7+9+0=16>6;4+8+1=13>36;3+5+1=9>936;#### 936'
>>> math_solution(523, "-", 187)
'13-7-0=6>6;12-8-1=3>36;5-1-1=3>336;#### 336'
>>> math_solution(347, "*", 6)
'7*6+0=42>2;4*6+4=28>82;3*6+2=20>082;2>2082;#### 2082'
```

Each step is `<digit op digit op carry>=<value>><result digits so far>`. A subtraction step that borrows writes the
borrowed ten in front of the top digit (`13-7-0`); a final carry is written as its own step (`2>2082`).

The privileged context is a hint, not the solution ([`math_hint`]): the method (the problem with its real
operation, digit by digit from the right) and the worked first step, e.g. `"347+589 from the right; first step
7+9+0=16>6"`. The teacher (the prompt followed by ` Hint: <hint>`, [`MATH_TEACHER_TEMPLATE`]) still computes every
other digit and the answer. The base model's student has not been told the codes (its warm start answers a coded
problem with an operation drawn at random among those the operands allow, [`valid_operations`]), so it is right
about as often as its guess of the operation; the codes are fixed, so the student can learn them from the teacher's
samples or from the reward.

The datasets follow the column schema of TRL's self-distillation trainers (`prompt`, `privileged_context`) plus an
`answer` column for reward functions.
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Literal

from datasets import Dataset


__all__ = [
    "DIFFICULTIES",
    "EVAL_SEED",
    "MATH_TEACHER_TEMPLATE",
    "OPERATION_CODES",
    "MathProblem",
    "eval_problems",
    "make_math_dataset",
    "math_completion",
    "math_hint",
    "math_solution",
    "parse_final_answer",
    "problem_text",
    "sample_problem",
    "valid_operations",
]

MATH_TEACHER_TEMPLATE = "{prompt} Hint: {privileged_context}"
"""Teacher prompt template: `{prompt}` is the student's question (the last user turn's text for
conversational prompts), `{privileged_context}` the hint ([`math_hint`])."""

OPERATION_CODES: dict[str, str] = {"+": "$", "-": "@", "*": "&"}
"""How a prompt writes each operation (`"347$589="` is `347+589`). Fixed for the task, never explained in the
prompt: the hint restates the problem with its real operation."""

DIFFICULTIES: dict[str, tuple[int, int]] = {"easy": (1, 2), "medium": (2, 3), "hard": (3, 4)}
"""Difficulty name -> inclusive range of the number of digits of the operands (`d` of `a*d` is
always one digit)."""

EVAL_SEED = 1_000_003
"""Seed of the fixed held-out problems; training problems are drawn from other seeds and never
include a held-out problem (of any difficulty)."""

EVAL_SIZE = 200
"""Number of fixed held-out problems per difficulty."""

OPERATIONS = ("+", "-", "*")

MathProblem = tuple[int, str, int]
"""A problem `(a, op, b)`, `op` the real operation (`"+"`, `"-"` or `"*"`)."""

_FINAL_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


def _digits_range(difficulty: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(difficulty, str):
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"Unknown difficulty {difficulty!r}; expected one of {list(DIFFICULTIES)} or (min, max).")
        return DIFFICULTIES[difficulty]
    lo, hi = difficulty
    if not 1 <= lo <= hi:
        raise ValueError(f"Invalid digit range {difficulty!r}.")
    return int(lo), int(hi)


def _random_number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    n_digits = rng.randint(lo_digits, hi_digits)
    low = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return rng.randint(low, 10**n_digits - 1)


def sample_problem(rng: random.Random, difficulty: str | tuple[int, int] = "medium") -> MathProblem:
    """Draws one problem `(a, op, b)`: the operation is uniform; `a`'s number of digits is uniform in the
    difficulty's range and its value uniform among numbers with that many digits. `b` of `a*d` is a digit in 2..9;
    `b` of `+` and `-` has one digit (2..9, as a multiplier) or a number of digits in the difficulty's range, each
    number of digits equally likely, and the operands are ordered so that `a >= b`: so the operands say little about
    the operation (a student who guesses it among [`valid_operations`] is right 11/27 of the time)."""
    lo, hi = _digits_range(difficulty)
    op = rng.choice(OPERATIONS)
    a = _random_number(rng, lo, hi)
    if op == "*":
        return a, op, rng.randint(2, 9)
    n_digits = rng.choice(sorted({1, *range(lo, hi + 1)}))
    b = rng.randint(2, 9) if n_digits == 1 else _random_number(rng, n_digits, n_digits)
    if a < b:
        a, b = b, a
    return a, op, b


def valid_operations(a: int, b: int) -> tuple[str, ...]:
    """The operations whose scratchpad exists for operands `a`, `b`: `-` needs `a >= b`, `*` a one-digit `b`."""
    return tuple(op for op in OPERATIONS if (op != "-" or a >= b) and (op != "*" or 0 <= b <= 9))


def problem_text(a: int, op: str, b: int) -> str:
    """The question shown to the student, with the operation's code, e.g. `"347$589="` for `347+589`."""
    return f"{a}{OPERATION_CODES[op]}{b}="


def _evaluate(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"Unknown operation {op!r}")


def _steps(a: int, op: str, b: int) -> list[str]:
    if a < 0 or b < 0:
        raise ValueError("Operands must be non-negative.")
    da = [int(c) for c in reversed(str(a))]
    steps: list[str] = []
    out = ""
    carry = 0
    if op == "*":
        if b > 9:
            raise ValueError("Multiplication is a*d with a one-digit d.")
        for x in da:
            value = x * b + carry
            out = str(value % 10) + out
            steps.append(f"{x}*{b}+{carry}={value}>{out}")
            carry = value // 10
    else:
        db = [int(c) for c in reversed(str(b))]
        if op == "-" and a < b:
            raise ValueError("Subtraction requires a >= b.")
        if op not in "+-":
            raise ValueError(f"Unknown operation {op!r}")
        for i in range(max(len(da), len(db))):
            x = da[i] if i < len(da) else 0
            y = db[i] if i < len(db) else 0
            if op == "+":
                value = x + y + carry
                out = str(value % 10) + out
                steps.append(f"{x}+{y}+{carry}={value}>{out}")
                carry = value // 10
            else:
                borrow = carry
                if x - y - borrow < 0:
                    value = 10 + x - y - borrow
                    steps.append(f"1{x}-{y}-{borrow}={value}>{value}{out}")
                    carry = 1
                else:
                    value = x - y - borrow
                    steps.append(f"{x}-{y}-{borrow}={value}>{value}{out}")
                    carry = 0
                out = str(value) + out
    if carry and op != "-":
        out = str(carry) + out
        steps.append(f"{carry}>{out}")
    assert int(out) == _evaluate(a, op, b), (a, op, b, out)  # the scratchpad is exact by construction
    return steps


def math_solution(a: int, op: str, b: int) -> str:
    """Right-to-left digit scratchpad for `a op b` ending in `#### <result>` (see module docstring).

    `op` is `"+"`, `"-"` (requires `a >= b >= 0`) or `"*"` (requires `0 <= b <= 9`).
    """
    return ";".join(_steps(a, op, b)) + f";#### {_evaluate(a, op, b)}"


def math_completion(a: int, op: str, b: int) -> str:
    """What the model is trained to answer: the problem with its real operation, then the scratchpad solution
    (without the end-of-turn token), e.g. `"347+589: 7+9+0=16>6;4+8+1=13>36;3+5+1=9>936;#### 936"`."""
    return f"{a}{op}{b}: {math_solution(a, op, b)}"


def math_hint(a: int, op: str, b: int) -> str:
    """The privileged context: the method and the worked first step, not the answer, e.g.
    `"347+589 from the right; first step 7+9+0=16>6"` (the first step holds at most the last digit of the answer)."""
    return f"{a}{op}{b} from the right; first step {_steps(a, op, b)[0]}"


def parse_final_answer(text: str) -> str | None:
    """The number after the first `####` in `text`, or `None` when there is none."""
    match = _FINAL_ANSWER_RE.search(text)
    return match.group(1) if match else None


@cache
def eval_problems(difficulty: str | tuple[int, int] = "medium", n: int = EVAL_SIZE) -> tuple[MathProblem, ...]:
    """The fixed held-out problems of a difficulty: `n` distinct problems drawn with [`EVAL_SEED`]."""
    lo, hi = _digits_range(difficulty)
    rng = random.Random(f"{EVAL_SEED}-{lo}-{hi}")
    seen: set[str] = set()
    problems: list[MathProblem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"Cannot draw {n} distinct problems of difficulty {difficulty!r}.")
        problem = sample_problem(rng, (lo, hi))
        text = problem_text(*problem)
        if text not in seen:
            seen.add(text)
            problems.append(problem)
    return tuple(problems)


@cache
def held_out_texts() -> frozenset[str]:
    """Problem strings of the held-out sets of every named difficulty; never used for training."""
    return frozenset(problem_text(*p) for d in DIFFICULTIES for p in eval_problems(d))


def train_problems(rng: random.Random, n: int, difficulty: str | tuple[int, int] = "medium") -> list[MathProblem]:
    """`n` training problems from `rng`, skipping every held-out problem (duplicates are possible)."""
    excluded = held_out_texts()
    problems: list[MathProblem] = []
    while len(problems) < n:
        problem = sample_problem(rng, difficulty)
        if problem_text(*problem) not in excluded:
            problems.append(problem)
    return problems


def make_math_dataset(
    split: Literal["train", "eval"] = "train",
    n: int | None = None,
    seed: int = 0,
    difficulty: str | tuple[int, int] = "medium",
    conversational: bool = True,
) -> Dataset:
    """Builds the arithmetic dataset.

    Args:
        split: `"train"`: `n` (default 1000) problems drawn with `seed`, never containing a held-out
            problem. `"eval"`: the first `n` (default and at most 200) of the fixed held-out problems;
            `seed` is ignored so every run evaluates on the same set.
        n: Number of rows.
        seed: Seed of the training problems.
        difficulty: `"easy"` (1-2 digit operands), `"medium"` (2-3) or `"hard"` (3-4), or a
            `(min_digits, max_digits)` tuple.
        conversational: If `True`, `prompt` is `[{"role": "user", "content": "347$589="}]`;
            otherwise the plain string `"347$589="`. The base model of [`~pbsd_trl.recipes.tiny.get_base_model`]
            is trained on the conversational (chat template) format.

    Returns:
        A [`~datasets.Dataset`] with columns `prompt`, `privileged_context` (the hint: [`math_hint`]) and
        `answer` (the result as a string).
    """
    if split == "train":
        problems = train_problems(random.Random(f"math-train-{seed}"), 1000 if n is None else n, difficulty)
    elif split == "eval":
        n = EVAL_SIZE if n is None else n
        if n > EVAL_SIZE:
            raise ValueError(f"The eval split has {EVAL_SIZE} problems; got n={n}.")
        problems = list(eval_problems(difficulty))[:n]
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    prompts, contexts, answers = [], [], []
    for a, op, b in problems:
        text = problem_text(a, op, b)
        prompts.append([{"role": "user", "content": text}] if conversational else text)
        contexts.append(math_hint(a, op, b))
        answers.append(str(_evaluate(a, op, b)))
    return Dataset.from_dict({"prompt": prompts, "privileged_context": contexts, "answer": answers})

# Copyright 2026 The PBSD-TRL Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

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

Why a worker process: math-verify's own timeout uses `signal.alarm`, which raises `ValueError` off the main thread
(TRL's `accuracy_reward` then simply disables it) and cannot interrupt a long C-level computation even on the main
thread. A sympy expression like `9^{9^{9}}` keeps `verify` busy for minutes. A process can always be killed, so the
parent waits at most `timeout_seconds` per completion (on a monotonic clock, with `select`) and then kills the worker
and starts a replacement at once, in the background. The worker is started once per training process and reused
(a spawn costs about a second of imports; a round trip costs well under a millisecond), it is shared by all reward
instances and threads (requests are serialized by a lock), and it also arms its own interval timer slightly before the
deadline, so a merely slow Python-level computation is interrupted cooperatively and the worker survives. The worker
is started with `subprocess` (`fork`+`exec`), not `multiprocessing`, so it neither forks a CUDA/threaded trainer nor
re-imports the user's `__main__`, and it loads this module without the package `__init__` (which imports torch/TRL).
"""

import atexit
import importlib.util
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Any, Literal

from .base import RewardFunction


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


# ---------------------------------------------------------------------------------------------------------------------
# Symbolic verification (runs in the worker process, or in-process as a fallback)
# ---------------------------------------------------------------------------------------------------------------------


_WORKER_MEMORY_LIMIT = 8 << 30  # bytes of address space; the worker peaks near 0.2 GiB


class _SoftTimeout(BaseException):
    # A BaseException so that math-verify's and sympy's `except Exception` handlers do not swallow it.
    pass


_EXTRACTION_CONFIG = None
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")  # `$` math delimiters, not the escaped `\$` currency sign


def _symbolic_equal(pred: str, gold: str, wrap_gold: bool = True) -> bool:
    """math-verify's verdict on `pred` against `gold`, without any timeout of its own (the caller provides one)."""
    global _EXTRACTION_CONFIG
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if _EXTRACTION_CONFIG is None:
        from latex2sympy2_extended import NormalizationConfig

        # The answer is already extracted, so wrap it in \boxed{} to make math-verify read exactly that span.
        _EXTRACTION_CONFIG = [
            LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(units=True)),
            ExprExtractionConfig(),
        ]
    # A reference solution without a final-answer marker is parsed as free text, as TRL's accuracy_reward does.
    gold_text = f"\\boxed{{{_MATH_DELIMITER.sub('', gold)}}}" if wrap_gold else gold
    gold_parsed = parse(gold_text, _EXTRACTION_CONFIG, parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{_MATH_DELIMITER.sub('', pred)}}}", _EXTRACTION_CONFIG, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _call_with_soft_timeout(seconds: float | None, func, *args) -> Any:
    """Run `func(*args)` (main thread only) under a SIGALRM interval timer with sub-second precision."""

    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:  # a late signal after the call finished must not escape into the caller
            raise _SoftTimeout()

    if not seconds or seconds <= 0:
        return func(*args)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return func(*args)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _silence_math_verify() -> None:
    # We pass timeouts of None on purpose; math-verify would warn about it, and log every comparison error.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _exit_when_orphaned(cpu_seconds: float = 0.5) -> None:
    """Exit if the parent process dies, even in the middle of a computation.

    The check runs from a SIGVTALRM handler every `cpu_seconds` of CPU time: signal handlers still run while a long
    big-integer operation holds the GIL (CPython checks for signals inside them, which is also what lets the soft
    timeout work), whereas a watchdog thread would never get the GIL back. An idle orphan uses no CPU and exits on
    stdin EOF instead. Not `prctl(PR_SET_PDEATHSIG)`: it fires when the parent *thread* that spawned the worker exits,
    and the trainer may call rewards from short-lived threads.
    """
    parent = os.getppid()

    def check(signum, frame):
        if os.getppid() != parent:
            os._exit(0)

    signal.signal(signal.SIGVTALRM, check)
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_seconds, cpu_seconds)


def _limit_memory(max_bytes: int = _WORKER_MEMORY_LIMIT) -> None:
    """Cap the worker's address space, so an expression that builds a huge number fails with MemoryError (0.0)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft > max_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (max_bytes, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not permitted: the time limit still applies
        pass


def _worker_main() -> None:
    """Entry point of the verification worker: one JSON request per stdin line, one JSON reply per line."""
    _exit_when_orphaned()
    _limit_memory()
    # Reply on a private copy of stdout and point fd 1 at stderr, so a stray print in a library cannot corrupt the
    # protocol.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    _silence_math_verify()
    try:
        _symbolic_equal("1", "1")  # import math-verify and sympy and compile the LaTeX grammar before "ready"
    except BaseException as exc:
        channel.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    channel.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            result = _call_with_soft_timeout(
                request.get("soft"), _symbolic_equal, request["pred"], request["gold"], request.get("wrap_gold", True)
            )
            reply = {"ok": result}
        except _SoftTimeout:
            reply = {"ok": False, "timeout": True}
        except Exception as exc:  # never die on a bad expression; the parent scores it 0.0
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        channel.write(json.dumps(reply) + "\n")


# The worker loads this file without running the package `__init__`s (they import torch/TRL: seconds per spawn): it
# registers the parent packages as bare namespace modules first, then imports this module and `base`/`validation`,
# which use only the standard library.
_BOOTSTRAP = """
import sys, types
module_name, *package_dirs = sys.argv[1:]
parts = module_name.split(".")
for depth, path in enumerate(package_dirs, start=1):
    package = types.ModuleType(".".join(parts[:depth]))
    package.__path__ = [path]
    sys.modules[package.__name__] = package
__import__(module_name, fromlist=["_worker_main"])._worker_main()
"""


class _VerifierWorker:
    """Parent-side handle on the verification worker: spawn, request with a hard deadline, kill and replace."""

    startup_timeout = 120.0  # for imports on a loaded machine; not counted against any completion's time limit

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ready = False
        self._buffer = b""
        self._owner_pid = os.getpid()
        self.unavailable_reason: str | None = None
        self.stats = {"requests": 0, "timeouts": 0, "restarts": 0, "errors": 0}

    def _spawn(self) -> None:
        package_dirs = []
        path = os.path.dirname(os.path.abspath(__file__))
        for _ in __name__.split(".")[:-1]:
            package_dirs.insert(0, path)
            path = os.path.dirname(path)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, __name__, *package_dirs],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
            # Own session: a Ctrl-C aimed at the trainer does not print a worker traceback; the worker exits on EOF.
            start_new_session=True,
        )
        self._ready = False
        self._buffer = b""

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except Exception:
                pass
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except Exception:
                    pass
        self._proc = None
        self._ready = False

    def _read_line(self, deadline: float) -> dict:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("verification worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _ensure_ready(self) -> bool:
        if self.unavailable_reason is not None:
            return False
        if self._owner_pid != os.getpid():  # we are a forked child: the pipes belong to the parent's worker
            self._proc, self._ready, self._owner_pid = None, False, os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._spawn()
        if not self._ready:
            try:
                hello = self._read_line(time.monotonic() + self.startup_timeout)
            except (TimeoutError, EOFError, OSError, ValueError) as exc:
                hello = {"ready": False, "error": repr(exc)}
            if not hello.get("ready"):
                self._kill()
                self.unavailable_reason = str(hello.get("error"))
                logger.warning(
                    "The math verification worker could not start (%s); verifying in-process instead, where the time "
                    "limit only applies on the main thread.",
                    self.unavailable_reason,
                )
                return False
            self._ready = True
        return True

    def verify(self, pred: str, gold: str, wrap_gold: bool, timeout: float, soft_fraction: float | None) -> str:
        """Return `"equal"`, `"different"`, `"timeout"`, `"error"` or `"unavailable"` (caller then runs in-process)."""
        with self._lock:
            if not self._ensure_ready():
                return "unavailable"
            self.stats["requests"] += 1
            request = {"pred": pred, "gold": gold, "wrap_gold": wrap_gold}
            if soft_fraction:
                request["soft"] = timeout * soft_fraction
            deadline = time.monotonic() + timeout
            try:
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                reply = self._read_line(deadline)
            except TimeoutError:
                self.stats["timeouts"] += 1
                self._restart()
                return "timeout"
            except (EOFError, OSError, ValueError):  # crashed (e.g. out of memory) or garbled
                self.stats["errors"] += 1
                self._restart()
                return "error"
            except BaseException:  # interrupted (Ctrl-C in a notebook) with this reply in flight: the next request
                self._kill()  # would read it as its own. A fresh worker is spawned on the next request.
                raise
            if reply.get("timeout"):
                self.stats["timeouts"] += 1
                return "timeout"
            if reply.get("error"):
                self.stats["errors"] += 1
            return "equal" if reply.get("ok") else "different"

    def _restart(self) -> None:
        # Start the replacement now so that its imports overlap with the caller's other work.
        self._kill()
        self.stats["restarts"] += 1
        try:
            self._spawn()
        except OSError as exc:
            self.unavailable_reason = repr(exc)

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._owner_pid == os.getpid():
                try:
                    self._proc.stdin.close()  # the worker exits on EOF
                    self._proc.wait(timeout=2)
                except Exception:
                    pass
                self._kill()


_WORKER: _VerifierWorker | None = None
_WORKER_LOCK = threading.Lock()


def _get_worker() -> _VerifierWorker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _VerifierWorker()
            atexit.register(_WORKER.close)
        return _WORKER


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
            outcome = _get_worker().verify(pred, gold, wrap_gold, self.timeout_seconds, self.soft_timeout_fraction)
            if outcome != "unavailable":
                return 1.0 if outcome == "equal" else 0.0
        return self._verify_in_process(pred, gold, wrap_gold)

    def _verify_in_process(self, pred: str, gold: str, wrap_gold: bool) -> float:
        _silence_math_verify()
        on_main_thread = threading.current_thread() is threading.main_thread()
        if not on_main_thread:
            _warn_once(
                "no-timeout",
                "Verifying math answers in-process off the main thread: no time limit can be enforced there.",
            )
        try:
            timeout = self.timeout_seconds if on_main_thread and os.name == "posix" else None
            return float(_call_with_soft_timeout(timeout, _symbolic_equal, pred, gold, wrap_gold))
        except _SoftTimeout:
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
        worker = _get_worker() if self.use_subprocess else None
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

"""
Tool-call accuracy for ReAct-style completions (ToolAlpaca, as evaluated by SDFT's `eval_tooluse.py`).

A completion calls tools with blocks like

    Thought: I need the weather.
    Action: getWeather
    Action Input: {"city": "Paris", "unit": "C"}

and the reference is the dataset's `golden_answer`: a list of `{"Action": name, "Action_Input": <JSON string or dict>}`
(ToolAlpaca/SDFT), or a list of `{"name": ..., "arguments": <JSON string or dict>}` (OpenAI-style, optionally nested
under `"function"`), or that list as a JSON string.

The exact criterion is SDFT's: the multiset of action names equals the gold multiset **and** the merged argument
dict (all `Action Input` objects, later keys overriding earlier ones) equals the merged gold dict. SDFT extracts the
JSON with the regex `Action Input:\\s*({.*?})`, which stops at the first `}` and so cannot read nested objects; we
decode the JSON object that starts there (`json.JSONDecoder.raw_decode`), which agrees with SDFT on flat arguments and
also reads nested ones.
"""

import json
import re
from collections import Counter
from typing import Any

from .base import RewardFunction


__all__ = [
    "ToolCallReward",
    "parse_gold_calls",
    "parse_tool_calls",
    "tool_call_reward",
    "tool_calls_f1",
    "tool_calls_match",
]

_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = re.compile(r"Action Input:\s*")
_DECODER = json.JSONDecoder()


class _Malformed(Exception):
    pass


def parse_tool_calls(text: str) -> list[tuple[str, dict | None]] | None:
    """
    Parse the ReAct tool calls in a completion.

    Each `Action: <name>` starts a call; its arguments are the JSON object after the first `Action Input:` that follows
    it and precedes the next `Action:` (an `Action Input` without an `Action` is ignored, as in SDFT, whose regexes are
    independent).

    Returns:
        A list of `(name, arguments)`, `arguments` being `None` when the call has no `Action Input`; or `None` when an
        `Action Input` is present but is not a JSON object (malformed output).
    """
    actions = list(_ACTION.finditer(text))
    calls = []
    for index, action in enumerate(actions):
        end = actions[index + 1].start() if index + 1 < len(actions) else len(text)
        marker = _ACTION_INPUT.search(text, action.end(), end)
        if marker is None:
            calls.append((action.group(1), None))
            continue
        try:
            arguments, _ = _DECODER.raw_decode(text, marker.end())
        except (ValueError, RecursionError):  # invalid JSON, or absurdly deep nesting
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append((action.group(1), arguments))
    return calls


def _as_arguments(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise _Malformed(f"tool arguments must be a JSON object, got {type(value).__name__}")
    return value


def parse_gold_calls(golden_answer: Any) -> list[tuple[str, dict]]:
    """
    Normalize a reference to a list of `(name, arguments)`.

    Accepts a list (or a JSON string of a list, or a single call) of `{"Action", "Action_Input"}`,
    `{"name", "arguments"}` or `{"function": {"name", "arguments"}}`, arguments being a dict or a JSON string.

    Raises:
        `ValueError`: if the reference cannot be read.
    """
    try:
        if isinstance(golden_answer, str):
            golden_answer = json.loads(golden_answer)
        if isinstance(golden_answer, dict):
            golden_answer = [golden_answer]
        calls = []
        for call in golden_answer:
            if "function" in call and isinstance(call["function"], dict):
                call = call["function"]
            if "Action" in call:
                calls.append((str(call["Action"]).strip(), _as_arguments(call.get("Action_Input"))))
            else:
                calls.append((str(call["name"]).strip(), _as_arguments(call.get("arguments"))))
        return calls
    except (TypeError, KeyError, ValueError, _Malformed) as exc:
        raise ValueError(f"cannot read the reference tool calls {golden_answer!r:.200}: {exc}") from exc


def _merged(calls: list[tuple[str, dict | None]]) -> dict:
    merged: dict = {}
    for _, arguments in calls:
        merged.update(arguments or {})
    return merged


def _canonical(call: tuple[str, dict | None]) -> tuple[str, str]:
    name, arguments = call
    return name, json.dumps(arguments or {}, sort_keys=True, ensure_ascii=False, default=str)


def tool_calls_match(predicted: list[tuple[str, dict | None]], gold: list[tuple[str, dict]]) -> bool:
    """SDFT's criterion: same multiset of action names and same merged arguments."""
    return Counter(name for name, _ in predicted) == Counter(name for name, _ in gold) and _merged(
        predicted
    ) == _merged(gold)


def tool_calls_f1(predicted: list[tuple[str, dict | None]], gold: list[tuple[str, dict]]) -> float:
    """F1 between the multisets of `(name, arguments)` calls (1.0 when both are empty)."""
    if not predicted and not gold:
        return 1.0
    overlap = sum((Counter(map(_canonical, predicted)) & Counter(map(_canonical, gold))).values())
    return 2.0 * overlap / (len(predicted) + len(gold))


class ToolCallReward(RewardFunction):
    """
    1.0 if a ReAct completion makes the reference tool calls (SDFT's criterion, see the module docstring), else 0.0.

    Args:
        partial_credit: If `True`, a completion that does not match exactly scores the F1 between its calls and the
            gold calls, each call being a `(name, arguments)` pair compared exactly; e.g. one right call out of two
            gold calls scores 2/3, and a right tool with wrong arguments scores 0. An exact match still scores 1.0.
        gold_column: Dataset column holding the reference (default `golden_answer`).
        name: The function name used in GRPO's metrics.

    A malformed `Action Input` (not a JSON object) scores 0.0, also with partial credit: the output is unusable by a
    tool executor. A missing or unreadable reference gives `None` (GRPO then ignores this function for that
    completion). Never raises on model output.
    """

    name = "tool_call_reward"

    def __init__(self, partial_credit: bool = False, gold_column: str = "golden_answer", name: str | None = None):
        super().__init__(name)
        self.partial_credit = partial_credit
        self.gold_column = gold_column

    def score(self, prompt: Any, completion: str, **row: Any) -> float | None:
        if self.gold_column not in row:
            raise KeyError(
                f"{self.__name__} needs the reference tool calls in a dataset column named '{self.gold_column}'; "
                f"the batch has columns {sorted(row)}"
            )
        reference = row[self.gold_column]
        if reference is None:
            return None
        try:
            gold = parse_gold_calls(reference)
        except ValueError:
            return None
        predicted = parse_tool_calls(completion)
        if predicted is None:
            return 0.0
        if tool_calls_match(predicted, gold):
            return 1.0
        return tool_calls_f1(predicted, gold) if self.partial_credit else 0.0


_DEFAULT_REWARD = ToolCallReward()


def tool_call_reward(
    prompts: list | None = None, completions: list | None = None, **kwargs: Any
) -> list[float | None]:
    """
    GRPO reward function: 1.0 if the ReAct completion's `Action`/`Action Input` calls match the `golden_answer` column
    (same multiset of actions, same merged arguments), else 0.0. [`ToolCallReward`] with default settings.

    Example:
    ```python
    >>> gold = [[{"Action": "getWeather", "Action_Input": '{"city": "Paris"}'}]]
    >>> tool_call_reward(completions=['Action: getWeather\\nAction Input: {"city": "Paris"}'], golden_answer=gold)
    [1.0]
    ```
    """
    if completions is None:
        raise TypeError("tool_call_reward() needs `completions`")
    return _DEFAULT_REWARD(prompts, completions, **kwargs)

"""
Building blocks for reward functions: text extraction, a per-completion base class and weighted combination.

The calling contract is documented once, in the `pbsd_trl.rewards` package docstring. This module imports only the
standard library (it is also imported by the math verification worker process, which must start fast).
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from .validation import call_reward_safely, validate_reward_funcs, weighted_reward_sum


__all__ = ["CombinedReward", "RewardFunction", "combine_rewards", "completion_text"]

# Keyword arguments GRPO passes that are shared by the whole batch rather than one value per completion.
TRAINER_KWARGS = ("trainer_state", "log_extra", "log_metric")


def completion_text(completion: Any) -> str:
    """
    Return the text of one completion, whether standard or conversational.

    - `str`: returned as is.
    - a message `{"role": ..., "content": ...}` or a list of messages (GRPO's conversational format, e.g.
      `[{"role": "assistant", "content": "..."}]`): the contents of the assistant messages joined with newlines. Tool
      and user messages are skipped because they are not model output (multi-turn tool rollouts interleave them);
      messages without a `role` count as assistant messages. Content given as a list of parts
      (`[{"type": "text", "text": ...}]`) contributes its text parts.
    - `None`: `""`.

    Never raises: anything else is converted with `str()`.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, Sequence):
        texts = []
        for message in completion:
            if isinstance(message, str):
                texts.append(message)
            elif isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                texts.append(_content_text(message.get("content")))
        return "\n".join(text for text in texts if text)
    return str(completion)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal content parts
        return "".join(
            part.get("text") or "" if isinstance(part, dict) else str(part)
            for part in content
            if not isinstance(part, dict) or part.get("type", "text") == "text"
        )
    return str(content)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class RewardFunction:
    """
    Base class for reward functions that score one completion at a time.

    Subclass it and implement [`~RewardFunction.score`]; an instance is then a GRPO reward function (see the package
    docstring for the contract). It is picklable as long as its attributes are, which TRL's async rollout worker needs.

    The instance's `__name__`, which GRPO uses for its `rewards/<name>/*` metrics, is the `name` given to the
    constructor, else the class attribute `name`, else the class name in snake case (`MyReward` -> `my_reward`).

    Example:
    ```python
    >>> class LengthReward(RewardFunction):
    ...     def score(self, prompt, completion, **row):
    ...         return min(len(completion) / 100, 1.0)
    >>> LengthReward().__name__
    'length_reward'
    >>> LengthReward()(prompts=["p", "p"], completions=["a" * 50, "a" * 500])
    [0.5, 1.0]
    ```
    """

    name: str | None = None

    def __init__(self, name: str | None = None):
        if name is not None:
            self.name = name

    @property
    def __name__(self) -> str:  # noqa: PLW3201 - instances need `__name__`, the class keeps its own
        # A property rather than an instance attribute so subclasses that skip `super().__init__()` still get a name.
        return self.name or _snake_case(type(self).__name__)

    def score(self, prompt: Any, completion: str, **row: Any) -> float | None:
        """
        Score one completion.

        Args:
            prompt: The prompt, a string or a list of messages.
            completion: The completion text (see [`completion_text`]).
            **row: This completion's dataset columns (e.g. `answer`, `golden_answer`) and, when GRPO provides them,
                its `completion_ids`. Batch-wide arguments (`trainer_state`, `log_extra`, `log_metric`) are not
                passed here; override [`~RewardFunction.score_batch`] to use them.

        Returns:
            `float | None`: The reward, or `None` when this function does not apply to this completion.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `score`")

    def score_batch(
        self, prompts: list, completions: list[str], rows: list[dict[str, Any]], **batch_kwargs: Any
    ) -> list[float | None]:
        """Score a batch; calls [`~RewardFunction.score`] per completion. Override to batch work or to log."""
        return [self.score(p, c, **row) for p, c, row in zip(prompts, completions, rows, strict=True)]

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs: Any):
        n = len(completions)
        batch_kwargs = {key: kwargs.pop(key) for key in TRAINER_KWARGS if key in kwargs}
        # GRPO passes every dataset column as a list with one entry per completion; anything else (e.g. a user's
        # scalar keyword) is the same for every row.
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        rows = [{} for _ in range(n)]
        for key, values in kwargs.items():
            per_row = isinstance(values, (list, tuple)) and len(values) == n
            for i, row in enumerate(rows):
                row[key] = values[i] if per_row else values
        if prompts is None:
            prompts = [None] * n
        texts = [completion_text(c) for c in completions]
        return self.score_batch(list(prompts), texts, rows, **batch_kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"


class CombinedReward:
    """
    Weighted sum of several reward functions, as one GRPO reward function. Built by [`combine_rewards`].

    A component returning `None` (or NaN) for a completion is left out of that completion's sum, like GRPO does across
    its own reward functions (`nansum`); if every component is `None`, the result is `None`. When the trainer provides
    `log_metric`, the batch mean of each component is logged as `<name>/<component>` so the parts stay visible.
    """

    def __init__(self, reward_funcs: Sequence[Callable], weights: Sequence[float] | None, name: str):
        self.reward_funcs = list(reward_funcs)
        if not self.reward_funcs:
            raise ValueError("combine_rewards needs at least one reward function")
        self.weights = [1.0] * len(self.reward_funcs) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.reward_funcs):
            raise ValueError(
                f"combine_rewards got {len(self.weights)} weights for {len(self.reward_funcs)} reward functions"
            )
        self.__name__ = name
        # Unique names, so two partials of one function log under different keys.
        self.component_names = validate_reward_funcs(self.reward_funcs)

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        log_metric = kwargs.get("log_metric")
        outputs_per_func = []
        for func, comp_name in zip(self.reward_funcs, self.component_names, strict=True):
            outputs = call_reward_safely(comp_name, func, prompts=prompts, completions=completions, **kwargs)
            outputs_per_func.append(outputs)
            valid = [v for v in outputs if v is not None and not math.isnan(v)]
            if log_metric is not None and valid:
                log_metric(f"{self.__name__}/{comp_name}", sum(valid) / len(valid))
        return weighted_reward_sum(outputs_per_func, self.weights)

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}*{n}" for w, n in zip(self.weights, self.component_names, strict=True))
        return f"CombinedReward({self.__name__!r}: {parts})"


def combine_rewards(
    reward_funcs: Sequence[Callable], weights: Sequence[float] | None = None, name: str = "combined_reward"
) -> CombinedReward:
    """
    Combine reward functions into one that returns their weighted sum.

    GRPO's own `reward_weights` (a list of reward functions plus `GRPOConfig.reward_weights`) does the same and keeps
    per-function metrics; use this instead when one scalar must come out of one function, e.g. for PBSD's
    `pair_labels="reward"` ordering with a single criterion, or to nest a weighted group inside a larger list.

    Args:
        reward_funcs: The reward functions (sync or async, any form [`get_reward_func_name`] accepts).
        weights: One weight per function; defaults to all `1.0`.
        name: The combined function's `__name__`, used in GRPO's metric names.

    Returns:
        [`CombinedReward`]: A picklable callable following GRPO's reward function contract.
    """
    return CombinedReward(reward_funcs, weights, name)

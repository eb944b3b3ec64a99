r"""
Reward functions for PBSD, following TRL's `GRPOTrainer` reward-function interface exactly.

PBSD computes rewards for both the student's and the teacher's samples (for logging, for `pair_labels="reward"` and for
evaluation) through GRPO's `_calculate_rewards`, so any GRPO reward function works here and these work in GRPO.

## The interface (TRL 1.16, `GRPOTrainer._calculate_rewards`)

A reward function is a callable (function, `functools.partial`, callable instance, or `async def` function/`__call__`)
called once per batch with keyword arguments only:

```python
def my_reward(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **kwargs):
    ...  # -> list[float | None], one per completion
```

- `prompts`: one per completion (prompts are repeated for the group). Strings, or lists of messages
  (`[{"role": "user", "content": ...}]`) for conversational datasets.
- `completions`: strings, or for conversational datasets lists of messages, typically
  `[{"role": "assistant", "content": "..."}]` (multi-turn tool rollouts add `tool` and more `assistant` messages).
  Use [`completion_text`] to get the text of either form.
- `completion_ids`: the completion token ids, one list per completion.
- every dataset column other than `prompt`/`completion`/`completion_ids`, as a keyword argument holding a list with
  one value per completion (e.g. `answer=[...]`, `solution=[...]`, `golden_answer=[...]`).
- `trainer_state`: the `transformers.TrainerState` (for schedules over training progress).
- `log_extra(column: str, values: list)`: add a column to the logged completions table (one value per completion).
- `log_metric(name: str, value: float)`: log a scalar, averaged over the logging step.
- `environments`: only with environment-based rollouts.
- `**kwargs`: required, since new columns/arguments may be passed at any time.

It returns a list with exactly one value per completion: a `float`, or `None` when the function does not apply to that
completion (GRPO stores NaN and leaves it out of the weighted sum `nansum(rewards * reward_weights)`). GRPO names each
function by `__name__` (partials are unwrapped, instances without `__name__` use their class name; see
[`get_reward_func_name`]) and logs `rewards/<name>/mean` and `/std`. Async functions are awaited concurrently on a
background event loop. A string instead of a callable is a reward model id that TRL loads as a sequence classifier.

## What is here

- [`completion_text`], [`RewardFunction`] (implement `score(prompt, completion_text, **row)`), [`combine_rewards`].
- [`math_accuracy_reward`] / [`MathAccuracyReward`]: final-answer equivalence with math-verify under a hard
  per-completion time limit (`verifier.py`: the worker process that enforces it, also off the main thread).
- [`tool_call_reward`] / [`ToolCallReward`]: ReAct tool-call accuracy (ToolAlpaca/SDFT criterion), optional F1 credit.
- [`weighted_reward_sum`]: the weighted sum over reward functions (GRPO's `nansum`), used by [`CombinedReward`],
  the trainer's per-sample rewards and the Avg@k evaluation.
- [`validate_reward_funcs`], [`get_reward_func_name`], [`check_reward_outputs`], [`call_reward_safely`],
  [`ensure_sync`], [`is_async_reward_func`]: used by the trainer to validate and call reward functions with errors
  that name the function.

These modules import only the standard library; math-verify is imported in the verification worker process.
"""

from .base import CombinedReward, RewardFunction, combine_rewards, completion_text
from .math import MathAccuracyReward, extract_boxed, extract_final_answer, math_accuracy_reward, normalize_answer
from .tool_use import ToolCallReward, parse_gold_calls, parse_tool_calls, tool_call_reward
from .validation import (
    call_reward_safely,
    check_reward_outputs,
    ensure_sync,
    get_reward_func_name,
    is_async_reward_func,
    validate_reward_funcs,
    weighted_reward_sum,
)


__all__ = [
    "CombinedReward",
    "MathAccuracyReward",
    "RewardFunction",
    "ToolCallReward",
    "call_reward_safely",
    "check_reward_outputs",
    "combine_rewards",
    "completion_text",
    "ensure_sync",
    "extract_boxed",
    "extract_final_answer",
    "get_reward_func_name",
    "is_async_reward_func",
    "math_accuracy_reward",
    "normalize_answer",
    "parse_gold_calls",
    "parse_tool_calls",
    "tool_call_reward",
    "validate_reward_funcs",
    "weighted_reward_sum",
]

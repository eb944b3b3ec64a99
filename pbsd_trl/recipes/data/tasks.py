"""The built-in tasks: how each is scored, which columns its reward reads, how its teacher is prompted."""

from collections.abc import Callable
from dataclasses import dataclass

from ...rewards import math_accuracy_reward, tool_call_reward
from .math_task import MATH_TEACHER_TEMPLATE, make_math_dataset
from .tool_task import TOOL_TEACHER_TEMPLATE, make_tool_dataset


@dataclass(frozen=True)
class TaskSpec:
    """
    A built-in task.

    Args:
        name: `"math"` or `"tool_use"`; `builtin:<name>` names its synthetic dataset.
        reward_funcs: The GRPO reward functions that score it.
        answer_column: Column the reward reads the reference from (`--answer_column` is renamed to it).
        reward_columns: Alternatives of columns the reward needs: each inner tuple is satisfied by any of its columns.
        make_dataset: `make_dataset(split, n, seed)` builds the synthetic dataset (`split` is `"train"` or `"eval"`).
        teacher_prompt_template: The teacher prompt template of the synthetic dataset.
        max_completion_length: Completion budget (tokens of the built-in character tokenizer, end of turn included)
            of the example script and the benchmarks: the longest right completion of the synthetic dataset fits.
    """

    name: str
    reward_funcs: tuple[Callable, ...]
    answer_column: str
    reward_columns: tuple[tuple[str, ...], ...]
    make_dataset: Callable
    teacher_prompt_template: str
    max_completion_length: int


TASKS: dict[str, TaskSpec] = {
    "math": TaskSpec(
        name="math",
        reward_funcs=(math_accuracy_reward,),
        answer_column="answer",
        reward_columns=(("answer", "solution"),),
        make_dataset=make_math_dataset,
        teacher_prompt_template=MATH_TEACHER_TEMPLATE,
        max_completion_length=64,
    ),
    "tool_use": TaskSpec(
        name="tool_use",
        reward_funcs=(tool_call_reward,),
        answer_column="golden_answer",
        reward_columns=(("golden_answer",),),
        make_dataset=make_tool_dataset,
        teacher_prompt_template=TOOL_TEACHER_TEMPLATE,
        max_completion_length=64,
    ),
}

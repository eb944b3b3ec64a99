"""Built-in synthetic tasks with privileged context, in the column schema of TRL's self-distillation
trainers (`prompt`, `privileged_context`):

- `pbsd_trl.recipes.data.math_task`: arithmetic whose operation is written as a code; the privileged context is a hint (the
  method and the first step of the scratchpad), not the solution (`answer` column).
- `pbsd_trl.recipes.data.tool_task`: ReAct tool use whose argument names are not in the prompt; the privileged context is the
  tool's documentation and a demonstration of a similar call, not the golden one (`golden_answer` column, SDFT's
  format).
"""

from .math_task import (
    MATH_TEACHER_TEMPLATE,
    make_math_dataset,
    math_completion,
    math_hint,
    math_solution,
    parse_final_answer,
)
from .tool_task import TOOL_TEACHER_TEMPLATE, make_tool_dataset, tool_completion


__all__ = [
    "MATH_TEACHER_TEMPLATE",
    "TOOL_TEACHER_TEMPLATE",
    "make_math_dataset",
    "make_tool_dataset",
    "math_completion",
    "math_hint",
    "math_solution",
    "parse_final_answer",
    "tool_completion",
]

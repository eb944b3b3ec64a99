"""Built-in synthetic tasks with privileged context, in the column schema of TRL's self-distillation
trainers (`prompt`, `privileged_context`):

- `pbsd_trl.data.math_task`: arithmetic with a step-by-step reference solution (`answer` column).
- `pbsd_trl.data.tool_task`: ReAct tool use with API documentation and a demonstration
  (`golden_answer` column, SDFT's format).
"""

from .math_task import MATH_TEACHER_TEMPLATE, make_math_dataset, math_solution, parse_final_answer
from .tool_task import TOOL_TEACHER_TEMPLATE, make_tool_dataset, tool_completion


__all__ = [
    "MATH_TEACHER_TEMPLATE",
    "TOOL_TEACHER_TEMPLATE",
    "make_math_dataset",
    "make_tool_dataset",
    "math_solution",
    "parse_final_answer",
    "tool_completion",
]

"""PBSD's teacher: the same network given the privileged context.

- `prompts`: the teacher prompt built from the student's prompt and the privileged context, and the checks of both;
- `weights`: the teacher's weights (`base`, `live` or `ema`) and the context that makes them the active ones;
- `batch`: a step's teacher rows, samples and padded tensors;
- `generation`: the trainer mixin that draws the teacher samples (GRPO's generation path, or the one generation pass).
"""

from .prompts import TeacherPromptBuilder, check_privileged_context, check_prompt, compose_teacher_prompt
from .weights import TeacherWeights


__all__ = [
    "TeacherPromptBuilder",
    "TeacherWeights",
    "check_privileged_context",
    "check_prompt",
    "compose_teacher_prompt",
]

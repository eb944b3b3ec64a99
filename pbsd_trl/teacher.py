"""The privileged-context teacher collator: teacher prompts from `(prompt, privileged context)` rows.

The teacher prompt is the student prompt with the privileged context folded in by a template. The student prompt is
never cut (a known failure of SDFT-style trainers, whose left truncation can drop the problem itself): when a token
budget is set and exceeded, only the privileged context gives way.
"""

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _message_text(content: Any) -> str:
    """Text of a chat message's content: a string, or the concatenated text parts of a content-block list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise TypeError(f"Unsupported message content of type {type(content).__name__}.")


def compose_teacher_prompt(prompt: str | list[dict], privileged_context: str, template: str) -> str | list[dict]:
    """Fold `privileged_context` into `prompt` with `template` (fields `{prompt}`, `{privileged_context}`).

    A plain-text prompt is formatted directly. A conversational prompt keeps every turn but the last user turn, whose
    text becomes `template.format(prompt=that text, privileged_context=…)`; the chat template is applied later, once,
    by the trainer's tokenization (as for the student prompt).
    """
    if isinstance(prompt, str):
        return template.format(prompt=prompt, privileged_context=privileged_context)
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError(
            "A conversational prompt must end with a user turn to receive the privileged context; got last role "
            f"{prompt[-1].get('role') if prompt else None!r}."
        )
    teacher_prompt = copy.deepcopy(prompt[:-1])
    last = dict(prompt[-1])
    last["content"] = template.format(prompt=_message_text(last["content"]), privileged_context=privileged_context)
    return teacher_prompt + [last]


def check_privileged_context(value: Any, column: str, row: int, allow_empty: bool) -> str:
    """Return the row's privileged context as a string, or raise an error that names the column and the row."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return "" if value is None else value
        raise ValueError(
            f"Row {row} has an empty privileged context (column '{column}' is {value!r}). Fill it, drop the row, or "
            "set `allow_empty_privileged_context=True` to give such rows a teacher prompt with an empty context."
        )
    if not isinstance(value, str):
        raise TypeError(
            f"Column '{column}' must hold strings, but row {row} holds a {type(value).__name__}: {value!r:.80}. "
            "Convert the privileged context to text (e.g. join a list of steps) before training."
        )
    return value


class TeacherPromptBuilder:
    """Builds the teacher prompts of a batch of dataset rows.

    Args:
        template: the teacher prompt template.
        column: the dataset column holding the privileged context.
        allow_empty: accept `None`/empty contexts (else an error names the row).
        max_length: token budget of a teacher prompt, or `None`.
        count_tokens: maps a list of prompts to their token counts as the trainer tokenizes them (chat template
            included). Needed only with `max_length`.
        encode / decode: the tokenizer's text ↔ ids, used to cut the context on token boundaries.
    """

    def __init__(
        self,
        template: str,
        column: str,
        allow_empty: bool = False,
        max_length: int | None = None,
        count_tokens: Callable[[list], list[int]] | None = None,
        encode: Callable[[str], list[int]] | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ):
        if max_length is not None and (count_tokens is None or encode is None or decode is None):
            raise ValueError("A teacher prompt budget needs `count_tokens`, `encode` and `decode`.")
        self.template = template
        self.column = column
        self.allow_empty = allow_empty
        self.max_length = max_length
        self.count_tokens = count_tokens
        self.encode = encode
        self.decode = decode
        self._warned_truncation = False

    def contexts(self, rows: Sequence[dict]) -> list[str]:
        """The privileged contexts of `rows`, checked."""
        if rows and self.column not in rows[0]:
            raise KeyError(
                f"The dataset has no privileged-context column '{self.column}' (columns: {sorted(rows[0])}). Add it, "
                "or point `privileged_context_column` at the column holding the context."
            )
        return [
            check_privileged_context(row.get(self.column), self.column, i, self.allow_empty)
            for i, row in enumerate(rows)
        ]

    def __call__(self, prompts: Sequence, rows: Sequence[dict]) -> tuple[list, list[bool]]:
        """Teacher prompts for `prompts` (one per row) and, per row, whether its context had to be cut."""
        contexts = self.contexts(rows)
        teacher_prompts = [compose_teacher_prompt(p, c, self.template) for p, c in zip(prompts, contexts, strict=True)]
        truncated = [False] * len(teacher_prompts)
        if self.max_length is None:
            return teacher_prompts, truncated
        lengths = self.count_tokens(teacher_prompts)
        for i, length in enumerate(lengths):
            if length > self.max_length:
                teacher_prompts[i] = self._fit(prompts[i], contexts[i])
                truncated[i] = True
        if any(truncated) and not self._warned_truncation:
            logger.warning(
                "Some teacher prompts exceed max_teacher_prompt_length=%d tokens: their privileged context was cut to "
                "fit (the student prompt is never cut). The fraction is logged as pbsd/context_truncated_frac.",
                self.max_length,
            )
            self._warned_truncation = True
        return teacher_prompts, truncated

    def _fit(self, prompt, context: str):
        """The longest prefix of `context` (in tokens) whose teacher prompt fits the budget; binary search."""
        ids = self.encode(context)
        low, high = 0, len(ids)  # invariant: a prefix of `low` tokens fits (0 is kept even if nothing fits)
        while low < high:
            mid = (low + high + 1) // 2
            candidate = compose_teacher_prompt(prompt, self.decode(ids[:mid]), self.template)
            if self.count_tokens([candidate])[0] <= self.max_length:
                low = mid
            else:
                high = mid - 1
        return compose_teacher_prompt(prompt, self.decode(ids[:low]), self.template)

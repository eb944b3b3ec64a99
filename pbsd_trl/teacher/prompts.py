"""The privileged-context teacher collator: teacher prompts from `(prompt, privileged context)` rows.

The teacher prompt is the student prompt with the privileged context folded in by a template. The student prompt is
never cut (a known failure of SDFT-style trainers, whose left truncation can drop the problem itself): when a token
budget is set and exceeded, only the privileged context gives way.
"""

import copy
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
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


# Bytes allowed for the first token of a context when judging, without tokenizing, that a cut context keeps one
_FIRST_TOKEN_SLACK = 32

ROW_INDEX_COLUMN = "pbsd_row_index"
"""Column the trainer adds to iterable (streaming) datasets: each row's position in the stream, so that an error found
when the row arrives names the dataset row, not its position in the generation batch."""


# Terminal escape sequences (CSI such as colours, OSC such as titles, two-character escapes): control, not text
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# Unicode categories that draw nothing on their own: controls, format characters (zero-width space, BOM, bidi marks),
# surrogates, unassigned code points, separators, and combining marks without a base character
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})
# Letters and symbols drawn as blank space (Hangul fillers, the blank Braille pattern, Mongolian vowel separator)
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")


def has_visible_text(text: str) -> bool:
    """Whether `text` has a character that draws something: the one definition of a non-empty prompt or context."""
    if "\x1b" in text:
        text = _ESCAPE_SEQUENCE.sub("", text)
    return any(ch not in _BLANK_CHARACTERS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text)


def check_encodable(text: str, what: str, row: int | str) -> None:
    """Raise an error naming the row and column when `text` has no UTF-8 form (a lone surrogate), which no tokenizer
    can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"Row {row}: {what} holds {text[err.start : err.end]!r} at character {err.start}, which has no UTF-8 form "
            "(a lone surrogate, e.g. from bytes decoded with errors='surrogateescape'): the tokenizer cannot read it. "
            "Repair the text (e.g. `text.encode('utf-8', 'replace').decode()`) or drop the row."
        ) from None


def row_label(row: Any, position: int) -> int | str:
    """How errors name a row: its dataset index when known (construction checks, streaming data), else its position."""
    index = row.get(ROW_INDEX_COLUMN) if isinstance(row, Mapping) else None
    return int(index) if index is not None else f"{position} of the generation batch"


def check_prompt(prompt: Any, row: int | str) -> None:
    """Raise an error naming the row when `prompt` cannot be generated from or given a privileged context.

    GRPO accepts a non-empty plain-text prompt or a list of chat messages; PBSD also needs the last turn of a
    conversational prompt to be the user's (its text receives the context).
    """
    if isinstance(prompt, str):
        check_encodable(prompt, "column 'prompt'", row)
        if not has_visible_text(prompt):
            raise ValueError(
                f"Row {row} has an empty prompt (column 'prompt' is {prompt!r:.80}, no visible character): there is "
                "nothing to generate from. Fill it or drop the row."
            )
        return
    if not isinstance(prompt, list) or not prompt:
        raise (ValueError if isinstance(prompt, list) else TypeError)(
            f"Row {row}: column 'prompt' must hold a non-empty string or a non-empty list of chat messages, got "
            f"{type(prompt).__name__}: {prompt!r:.80}."
        )
    for turn, message in enumerate(prompt):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise TypeError(
                f"Row {row}: message {turn} of column 'prompt' must be a dict with a 'role' and a 'content', got "
                f"{message!r:.80}."
            )
        content = message["content"]
        if not isinstance(content, (str, list)) or (
            isinstance(content, list) and not all(isinstance(part, Mapping) and "type" in part for part in content)
        ):
            raise TypeError(
                f"Row {row}: message {turn} of column 'prompt' has content {content!r:.80}; expected a string or a "
                "list of content parts (dicts with a 'type')."
            )
        check_encodable(_message_text(content), f"message {turn} of column 'prompt'", row)
    last = prompt[-1]
    if last["role"] != "user":
        raise ValueError(
            f"Row {row}: a conversational prompt must end with a user turn to receive the privileged context; its "
            f"last turn (message {len(prompt) - 1} of column 'prompt') is the {last['role']!r}'s. Drop the trailing "
            "turn or the row."
        )


def check_privileged_context(value: Any, column: str, row: int | str, allow_empty: bool) -> str:
    """Return the row's privileged context as a string, or raise an error that names the column and the row.

    Empty means no visible character ([`has_visible_text`]): whitespace, zero-width and control characters and
    terminal escape sequences give the teacher no information.
    """
    if isinstance(value, str):
        check_encodable(value, f"column '{column}'", row)
    if value is None or (isinstance(value, str) and not has_visible_text(value)):
        if allow_empty:
            return "" if value is None else value
        raise ValueError(
            f"Row {row} has an empty privileged context (column '{column}' is {value!r:.80}, no visible character). "
            "Fill it, drop the row, or set `allow_empty_privileged_context=True` to give such rows a teacher prompt "
            "with an empty context."
        )
    if not isinstance(value, str):
        raise TypeError(
            f"Column '{column}' must hold strings, but row {row} holds a {type(value).__name__}: {value!r:.80}. "
            "Convert the privileged context to text (e.g. join a list of steps) before training."
        )
    return value


def teacher_position_limit(model_config, args, use_vllm: bool = False) -> tuple[int, str] | None:
    """Most tokens a teacher prompt may take: the model's positions (or vLLM's `max_model_len`) less a completion.

    `(tokens, how to name the limit in an error)`, or None where the model states no limit. The trainer and the pool
    build both use it, so that a row the trainer refuses is refused before any sampling.
    """
    positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    limits = []
    if positions:
        limits.append((positions, f"the model's max_position_embeddings={positions}"))
    if use_vllm and args.vllm_max_model_length:
        limits.append((args.vllm_max_model_length, f"vllm_max_model_length={args.vllm_max_model_length}"))
    if not limits:
        return None
    total, what = min(limits)
    completion = args.max_completion_length or 0
    limit = total - completion
    what = f"{what} with max_completion_length={completion}"
    if args.max_teacher_prompt_length is not None and args.max_teacher_prompt_length > limit:
        raise ValueError(
            f"`max_teacher_prompt_length` ({args.max_teacher_prompt_length}) does not fit in {what}: a teacher "
            f"prompt and its completion need at most {total} tokens. Set it to at most {limit}."
        )
    if limit < 1:
        raise ValueError(f"`max_completion_length` ({completion}) leaves no room for a prompt in {total} positions.")
    return limit, what


class TeacherPromptBuilder:
    """Builds the teacher prompts of a batch of dataset rows, and refuses rows that cannot make one.

    Args:
        template: the teacher prompt template.
        column: the dataset column holding the privileged context.
        allow_empty: accept `None`/empty contexts (else an error names the row).
        max_length: token budget of a teacher prompt, or `None`.
        count_tokens: maps a list of prompts to their token counts as the trainer tokenizes them (chat template
            included). Needed with `max_length` or `position_limit`.
        encode / decode: the tokenizer's text ↔ ids, used to cut the context on token boundaries.
        position_limit: `(tokens, what)`: the most tokens a teacher prompt may take (the model's positions, or vLLM's
            `max_model_len`, less the completion length) and how to name that limit in an error; `None` for no check.
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
        position_limit: tuple[int, str] | None = None,
    ):
        if max_length is not None and (count_tokens is None or encode is None or decode is None):
            raise ValueError("A teacher prompt budget needs `count_tokens`, `encode` and `decode`.")
        if position_limit is not None and count_tokens is None:
            raise ValueError("A position limit needs `count_tokens`.")
        self.template = template
        self.column = column
        self.allow_empty = allow_empty
        self.max_length = max_length
        self.count_tokens = count_tokens
        self.encode = encode
        self.decode = decode
        self.position_limit = position_limit
        self._warned_truncation = False

    @staticmethod
    def prompts(rows: Sequence[dict], labels: Sequence | None = None) -> list:
        """The `prompt` of every row, or a `KeyError` naming the first row without one."""
        labels = labels or [row_label(row, i) for i, row in enumerate(rows)]
        for row, label in zip(rows, labels, strict=True):
            if "prompt" not in row:
                raise KeyError(f"Row {label} has no 'prompt' (its keys: {sorted(row)}).")
        return [row["prompt"] for row in rows]

    def contexts(self, rows: Sequence[dict], labels: Sequence | None = None) -> list[str]:
        """The privileged contexts of `rows`, checked; errors name the row (dataset index when known) and column."""
        labels = labels or [row_label(row, i) for i, row in enumerate(rows)]
        contexts = []
        for row, label in zip(rows, labels, strict=True):
            if self.column not in row:
                raise KeyError(
                    f"Row {label} has no privileged-context column '{self.column}' (its keys: {sorted(row)}). Add "
                    "it, or point `privileged_context_column` at the column holding the context."
                )
            contexts.append(check_privileged_context(row[self.column], self.column, label, self.allow_empty))
        return contexts

    def __call__(
        self, prompts: Sequence, rows: Sequence[dict], indices: Sequence[int] | None = None, fit: bool = True
    ) -> tuple[list, list[bool]]:
        """Teacher prompts for `prompts` (one per row) and, per row, whether its context had to be cut.

        `indices` are the rows' dataset indices (default: the index column of streaming rows, else the position).
        With `fit=False` (construction checks) over-long rows are only checked to be fittable, not cut.
        """
        if not rows:
            return [], []
        labels = list(indices) if indices is not None else [row_label(row, i) for i, row in enumerate(rows)]
        for prompt, label in zip(prompts, labels, strict=True):
            check_prompt(prompt, label)
        contexts = self.contexts(rows, labels)
        teacher_prompts = [compose_teacher_prompt(p, c, self.template) for p, c in zip(prompts, contexts, strict=True)]
        truncated = [False] * len(teacher_prompts)
        if self.max_length is None and self.position_limit is None:
            return teacher_prompts, truncated
        lengths = self.count_tokens(teacher_prompts)
        if self.max_length is not None:
            over = [i for i, length in enumerate(lengths) if length > self.max_length]
            self._check_fittable([prompts[i] for i in over], [contexts[i] for i in over], [labels[i] for i in over])
            for i in over:
                truncated[i] = True
                lengths[i] = self.max_length  # at most, once cut
                if fit:
                    teacher_prompts[i] = self._fit(prompts[i], contexts[i])
            if any(truncated) and fit and not self._warned_truncation:
                logger.warning(
                    "Some teacher prompts exceed max_teacher_prompt_length=%d tokens: their privileged context was cut "
                    "to fit (the student prompt is never cut). The fraction is logged as pbsd/context_truncated_frac.",
                    self.max_length,
                )
                self._warned_truncation = True
        if self.position_limit is not None:
            limit, what = self.position_limit
            for length, label in zip(lengths, labels, strict=True):
                if length > limit:
                    raise ValueError(
                        f"Row {label}: its teacher prompt is {length} tokens, more than the {limit} that fit in {what}. "
                        f"Set `max_teacher_prompt_length` (at most {limit}) to cut the privileged context to fit, or "
                        "shorten the row's prompt and context."
                    )
        return teacher_prompts, truncated

    def check_rows(self, rows: Sequence[dict], indices: Sequence[int]) -> None:
        """Raise for the first of `rows` (dataset rows `indices`) whose teacher prompt cannot be made or cannot fit;
        only the rows [`surely_fit`] cannot clear are tokenized."""
        contexts = self.contexts(rows, indices)
        if self.max_length is None and self.position_limit is None:
            return
        doubtful = [i for i, ok in enumerate(self.surely_fit([r["prompt"] for r in rows], contexts)) if not ok]
        self([rows[i]["prompt"] for i in doubtful], [rows[i] for i in doubtful],
             indices=[indices[i] for i in doubtful], fit=False)  # fmt: skip

    def surely_fit(self, prompts: Sequence, contexts: Sequence[str]) -> list[bool]:
        """Per row, whether its teacher prompt certainly fits every limit, judged without tokenizing the row.

        Upper bound: the tokens of the same prompt with every text emptied (chat template and teacher template, exact,
        once per message layout) plus one token per UTF-8 byte of the texts; no tokenizer in use makes more tokens
        than bytes of ordinary text. Rows it cannot clear are tokenized; the per-batch check still covers every row.
        """
        limits = [limit for limit in (self.max_length, self.position_limit and self.position_limit[0]) if limit]
        if not limits or self.count_tokens is None:
            return [False] * len(prompts)
        limit, overheads, result = min(limits), {}, []
        for prompt, context in zip(prompts, contexts, strict=True):
            if isinstance(prompt, str):
                layout, texts, empty = "plain", [prompt], ""
            elif all(isinstance(m.get("content"), str) for m in prompt):
                layout = tuple(m["role"] for m in prompt)
                texts = [m["content"] for m in prompt]
                empty = [{"role": m["role"], "content": ""} for m in prompt]
            else:
                result.append(False)
                continue
            if layout not in overheads:
                overheads[layout] = self.count_tokens([compose_teacher_prompt(empty, "", self.template)])[0]
            prompt_size = overheads[layout] + sum(len(t.encode()) for t in texts)
            fits = prompt_size + len(context.encode()) <= limit
            # over the budget but surely cut to fit with some context left (32 bytes of slack for its first token);
            # the budget itself fits the positions (checked at construction)
            cuttable = self.max_length is not None and prompt_size + _FIRST_TOKEN_SLACK <= self.max_length
            result.append(fits or cuttable)
        return result

    def _check_fittable(self, prompts: list, contexts: list[str], labels: list) -> None:
        """Over-budget rows must fit with their context cut, and keep at least one token of it (unless allowed empty)."""
        if not prompts:
            return
        bare = self.count_tokens([compose_teacher_prompt(p, "", self.template) for p in prompts])
        for length, label in zip(bare, labels, strict=True):
            if length > self.max_length:
                raise ValueError(
                    f"Row {label}: its teacher prompt takes {length} tokens even with an empty privileged context, "
                    f"more than max_teacher_prompt_length={self.max_length}; only the context may be cut, never the "
                    "student prompt. Raise `max_teacher_prompt_length` or shorten or drop the row."
                )
        if self.allow_empty:
            return
        first = [self.decode(self.encode(c)[:1]) for c in contexts]
        one = self.count_tokens(
            [compose_teacher_prompt(p, c, self.template) for p, c in zip(prompts, first, strict=True)]
        )
        for length, label, b in zip(one, labels, bare, strict=True):
            if length > self.max_length:
                raise ValueError(
                    f"Row {label}: max_teacher_prompt_length={self.max_length} leaves no room for its privileged "
                    f"context (the teacher prompt takes {b} tokens without it), so the teacher would know no more "
                    "than the student. Raise `max_teacher_prompt_length`, shorten the prompt, or set "
                    "`allow_empty_privileged_context=True` to accept that."
                )

    def _fit(self, prompt, context: str):
        """The longest prefix of `context` (in tokens) whose teacher prompt fits the budget; binary search."""
        ids = self.encode(context)
        low, high = 0, len(ids)  # invariant: a prefix of `low` tokens fits (checked by `_check_fittable`)
        while low < high:
            mid = (low + high + 1) // 2
            candidate = compose_teacher_prompt(prompt, self.decode(ids[:mid]), self.template)
            if self.count_tokens([candidate])[0] <= self.max_length:
                low = mid
            else:
                high = mid - 1
        return compose_teacher_prompt(prompt, self.decode(ids[:low]), self.template)

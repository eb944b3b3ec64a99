"""The teacher's prompts and the teacher log-probs of its samples, as the trainer builds and scores them (the samples
are drawn by `pbsd_trl.sampling`)."""

from __future__ import annotations

import functools

import torch

from .. import scoring
from ..logprobs import pad_token_lists
from ..sampling import bf16_autocast
from ..tokens import cut_after_eos, tokenize_prompts  # noqa: F401  (part of `pbsd_trl.pool`'s API)


# ---- prompts ----------------------------------------------------------------------------------------------------
def teacher_prompt_builder(tokenizer, args, position_limit: tuple[int, str] | None = None):
    """The trainer's [`TeacherPromptBuilder`] for `args`, tokenizing as GRPOTrainer does; `position_limit` as the
    trainer's ([`teacher_position_limit`])."""
    from ..teacher.prompts import TeacherPromptBuilder

    kwargs = args.chat_template_kwargs or {}
    return TeacherPromptBuilder(
        template=args.teacher_prompt_template,
        column=args.privileged_context_column,
        allow_empty=args.allow_empty_privileged_context,
        max_length=args.max_teacher_prompt_length,
        count_tokens=lambda prompts: [len(ids) for ids in tokenize_prompts(tokenizer, prompts, kwargs)],
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        position_limit=position_limit,
    )


# ---- scoring ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def sequence_logps(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    pad_id: int,
    device,
    bf16: bool = False,
) -> list[float]:
    """Sum over each completion of `log softmax(logits / temperature)` at its tokens, given its prompt: the trainer's
    own teacher scoring ([`pbsd_trl.scoring.sequence_logps`]) on token lists (left-padded prompts, right-padded
    completions)."""
    p_ids, p_mask = pad_token_lists(prompt_ids, pad_id, "left", device)
    c_ids, c_mask = pad_token_lists(completion_ids, pad_id, "right", device)
    autocast = functools.partial(bf16_autocast, device, bf16)
    (logps,) = scoring.sequence_logps(
        model, p_ids, p_mask, [(c_ids, c_mask, c_mask)], temperature=temperature, autocast=autocast
    )
    return logps.tolist()

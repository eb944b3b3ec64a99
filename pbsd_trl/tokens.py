"""Token lists and EOS ids shared by the trainer's own calls, the pool build and evaluation: prompts tokenized as GRPOTrainer
tokenizes them, and completions cut as GRPO's completion mask cuts them. Padding is `pbsd_trl.logprobs.pad_token_lists`."""

from __future__ import annotations

from collections.abc import Sequence


def tokenize_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt ids as GRPOTrainer tokenizes text prompts (chat template with the generation prompt, or plain text)."""
    from trl.data_utils import is_conversational

    if not prompts:
        return []
    if is_conversational({"prompt": prompts[0]}):
        out = tokenizer.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in out["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def cut_after_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS (GRPO's completion mask), as a list."""
    out = []
    for token in ids:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion, as GRPOTrainer collects them: the tokenizer's EOS and the model's
    generation-config EOS ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids

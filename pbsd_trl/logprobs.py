"""Scoring completions: `[prompt ; completion]` batches and the fused log-prob head.

`add_pbsd_logprob_head` patches a causal LM's forward the way TRL's `add_fused_lm_head` does, so that the call goes
through the DDP/DeepSpeed wrapper (its hooks stay armed), but routes the LM head through pbsd-trl's plain-PyTorch
kernel: `model(input_ids, attention_mask=…, labels=…, pbsd_logprobs=True)` returns per-token log-probs `(B, S-1)`
with 0 where the label is -100, without materializing `[tokens, vocab]` logits. Without the flag the forward is
untouched, so generation and TRL's own `fused_lm_head=True` path keep working.

`reset_forward_patches` undoes both patches on a model handed to a second trainer (a notebook cell run twice), so that
each trainer patches the model's own forward instead of wrapping the previous trainer's heads.
"""

import functools
import types

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .ops import fused_logprobs


def check_fused_head_supported(model) -> None:
    """Raise when the model's head does something the kernel does not model (logit scaling or soft-capping)."""
    config = model.config.get_text_config()
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, attribute, None)
        if value not in (None, 1.0):
            raise ValueError(
                f"{type(model).__name__} sets `{attribute}={value}`, which pbsd-trl's fused log-prob kernel does not "
                "apply. Set `use_fused_logprob_kernel=False` to score with TRL's fused LM head."
            )


_UNPATCHED_FORWARD = "_pbsd_unpatched_forward"
_CLASS_FORWARD = "class"  # marker: the model had no instance-level forward, i.e. it used its class's


def reset_forward_patches(model) -> None:
    """Call before a trainer patches `model`: remember its unpatched forward, or restore it if a trainer patched it.

    TRL's `add_fused_lm_head` and `add_pbsd_logprob_head` each wrap whatever `model.forward` is, so a second trainer
    built on the same model object would stack its heads on top of the first one's. The unpatched forward is kept on
    the model itself (not in a module-level registry) so that nothing outlives the model. A model belongs to the last
    trainer built on it: an earlier trainer still holding it scores through the new trainer's heads.
    """
    original = model.__dict__.get(_UNPATCHED_FORWARD)
    if original is None:
        model.__dict__[_UNPATCHED_FORWARD] = model.__dict__.get("forward", _CLASS_FORWARD)
    elif original is _CLASS_FORWARD:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = original


def add_pbsd_logprob_head(model, temperature: float = 1.0) -> None:
    """Patch `model.forward` to accept `pbsd_logprobs=True` (see the module docstring)."""
    check_fused_head_supported(model)
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def _forward(self, *args, pbsd_logprobs=False, labels=None, **kwargs):
        if not pbsd_logprobs:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        # PEFT and FSDP replace the backbone and the head after patching: look them up on every call
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        head = self.get_output_embeddings()
        labels = labels[:, 1:].to(head.weight.device)
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            return fused_logprobs(
                hidden_states.to(head.weight.device), head.weight, labels, temperature=temperature, bias=head.bias
            )

    model.forward = types.MethodType(_forward, model)


def concat_prompt_completion(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[left-padded prompt ; right-padded completion]` ids, attention mask, and labels scoring the completion only."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : prompt_ids.size(1)] = -100
    return input_ids, attention_mask, labels


def pad_token_lists(
    sequences: list[list[int]], pad_token_id: int, side: str, device, pad_to_multiple_of: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists (possibly empty) on `side` (`"left"` for prompts, `"right"` for completions): ids and mask."""
    tensors = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side=side, pad_to_multiple_of=pad_to_multiple_of)
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side=side, pad_to_multiple_of=pad_to_multiple_of)
    return ids.to(device), mask.to(device)


def right_pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad a `(B, T)` tensor to `(B, width)`."""
    if tensor.size(1) >= width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)

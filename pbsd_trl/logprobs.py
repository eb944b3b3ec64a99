"""Scoring completions: `[prompt ; completion]` batches and the fused log-prob head.

`add_pbsd_logprob_head` patches a causal LM's forward the way TRL's `add_fused_lm_head` does, so that the call goes
through the DDP/DeepSpeed wrapper (its hooks stay armed), but routes the LM head through pbsd-trl's plain-PyTorch
kernel: `model(input_ids, attention_mask=…, labels=…, pbsd_logprobs=True)` returns per-token log-probs `(B, S-1)`
with 0 where the label is -100, without materializing `[tokens, vocab]` logits. Without the flag the forward is
untouched, so generation and TRL's own `fused_lm_head=True` path keep working.

`reset_forward_patches` undoes both patches on a model handed to a second trainer (a notebook cell run twice), so that
each trainer patches the model's own forward instead of wrapping the previous trainer's heads.
"""

import contextlib
import functools
import types

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from .kernels import fused_logprobs


def head_logit_transform(model) -> tuple[float | None, float]:
    """`(softcap, logit_scale)` of the model's head, read from its config by the rules TRL's fused head uses, so that
    both heads score the same logits: `final_logit_softcapping` (Gemma-2), and a multiplier from `logit_scale`
    (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1) or `logits_scaling` (a divisor for Granite and
    MiniCPM3, a multiplier for HyperCLOVA X)."""
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None) or None
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    return softcap, 1.0 if scale is None else float(scale)


def backbone_of(model):
    """The decoder stack under a causal LM's head (under the PEFT wrapper of a PEFT model)."""
    return model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model


def head_token_logps(model, hidden_states: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token log-probs of `labels` (0 where -100) given the backbone's `hidden_states` at the positions that
    predict them, through the model's LM head in pbsd-trl's fused kernel (fp32, no `[tokens, vocab]` logits), with the
    head's softcap and scale; under ZeRO-3 the head's partitioned weight is gathered for the call."""
    head = model.get_output_embeddings()
    softcap, logit_scale = head_logit_transform(model)
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        return fused_logprobs(
            hidden_states.to(head.weight.device),
            head.weight,
            labels.to(head.weight.device),
            temperature=temperature,
            bias=head.bias,
            softcap=softcap,
            logit_scale=logit_scale,
        )


def fused_forward_logps(model, input_ids, attention_mask, labels, temperature: float) -> torch.Tensor:
    """What a patched forward returns for `pbsd_logprobs=True` ([`add_pbsd_logprob_head`]), on an unpatched model:
    per-token log-probs `(B, S-1)` of `labels` (0 where -100)."""
    hidden = backbone_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head_token_logps(model, hidden[:, :-1], labels[:, 1:], temperature)


def router_aux_loss(router_logits, text_config, attention_mask=None) -> torch.Tensor:
    """The MoE load-balancing loss the model's own forward adds (transformers' Mixtral formula, which every MoE family
    reuses), from the backbone's router logits; the same call as TRL's fused head makes."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    return load_balancing_loss_func(router_logits, num_experts, text_config.num_experts_per_tok, attention_mask)


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
    """Patch `model.forward` to accept `pbsd_logprobs=True` (see the module docstring).

    With `output_router_logits=True` as well (MoE models), the call returns `(log_probs, aux_loss)`, the router
    load-balancing loss of the same forward.
    """
    original_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def _forward(self, *args, pbsd_logprobs=False, labels=None, **kwargs):
        if not pbsd_logprobs:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        # PEFT and FSDP replace the backbone and the head after patching: look them up on every call
        backbone_outputs = self.base_model(*args, **kwargs)
        logps = head_token_logps(self, backbone_outputs.last_hidden_state[:, :-1], labels[:, 1:], temperature)
        if kwargs.get("output_router_logits"):
            return logps, router_aux_loss(backbone_outputs.router_logits, text_config, kwargs.get("attention_mask"))
        return logps

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
    mask = pad(
        [torch.ones_like(t) for t in tensors],
        padding_value=0,
        padding_side=side,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return ids.to(device), mask.to(device)


def right_pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad a `(B, T)` tensor to `(B, width)`."""
    if tensor.size(1) >= width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)


class SampledTokenLogps:
    """Log-probs, at `temperature`, of the tokens a `generate` call samples, read off its decoding steps' logits.

    Registered as a forward hook (`with_kwargs=True`) on the causal LM while `generate` runs, it keeps the
    log-softmax of the last position's logits of each call (the raw logits, before any logits processor, which is
    what scoring a sample computes) and, at the next call, gathers it at the token fed in, which is the token sampled
    from it. The sampling weights' own log-probs of their samples then need no second forward pass.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.fed: list[torch.Tensor] = []  # the token fed to call k + 1: the sample drawn from call k's logits
        self.logps: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None
        self.failed = False

    def __call__(self, module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if input_ids is None or logits is None or logits.dim() != 3:
            self.failed = True  # inputs_embeds or a patched head: leave these samples to scoring
            return
        if self.pending is not None:
            token = input_ids[:, -1:]
            self.fed.append(token.squeeze(1))
            self.logps.append(self.pending.gather(1, token).squeeze(1))
        self.pending = torch.log_softmax(logits[:, -1].float() / self.temperature, dim=-1)

    def per_row(self, completion_ids: list[list[int]]) -> list[list[float]] | None:
        """Per-token log-probs of each row's completion (cut after EOS, as GRPO returns them), or None where the
        recorded steps do not line up with the completions (then they must be scored)."""
        steps = len(self.logps) + 1 if self.pending is not None else 0
        if self.failed or steps == 0 or self.pending.size(0) != len(completion_ids):
            return None
        fed = torch.stack(self.fed, 1).tolist() if self.fed else [[] for _ in completion_ids]
        logps = torch.stack(self.logps, 1).tolist() if self.logps else [[] for _ in completion_ids]
        rows = []
        for i, ids in enumerate(completion_ids):
            length = len(ids)
            if length > steps or ids[: min(length, steps - 1)] != fed[i][: min(length, steps - 1)]:
                return None
            row = logps[i][: min(length, steps - 1)]
            if length == steps:  # its last token was never fed back
                row.append(self.pending[i, ids[-1]].item())
            rows.append(row)
        return rows


def use_decoding_logps(setting: bool | None, model, mixed_precision: bool) -> bool:
    """`teacher_logps_from_generation`: the setting, or for `None` whether `model` decodes and scores in float32 (no
    mixed precision), where an incremental decode and a full forward agree to float rounding."""
    if setting is not None:
        return bool(setting)
    return not mixed_precision and all(p.dtype == torch.float32 for p in model.parameters())


@contextlib.contextmanager
def record_sampled_token_logps(model, temperature: float):
    """While active, `model`'s forward calls (a `generate` call's decoding steps) feed a [`SampledTokenLogps`]."""
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    recorder = SampledTokenLogps(temperature)
    handle = causal_lm.register_forward_hook(recorder, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()

"""Scoring completions that share a prompt: the prompt once, its KV cache reused by every completion.

PBSD's teacher scores, without gradient, every completion of a prompt group (G student samples and, online, G_T
teacher samples) from the same teacher prompt, which is several times wider than a completion (the privileged
context). Scoring `[prompt ; completion]` rows recomputes that prompt once per row; here each distinct prompt row is
run once with `use_cache=True` and its cache is repeated for the completions that follow it. The result is the same
function as the full forward (same positions, same masks; equal up to floating-point rounding), on
`U·P + B·C` instead of `B·(P + C)` positions for `U` distinct prompts of width `P` and `B` completions of width `C`.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .logprobs import head_logit_transform
from .ops import fused_logprobs


def supports_shared_prefix(model) -> bool:
    """Decoder-only models whose cache is transformers' `DynamicCache` of plain full-attention layers."""
    config = model.config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", False)


@torch.no_grad()
def shared_prefix_token_logps(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    max_rows: int | None = None,
    autocast=None,
) -> torch.Tensor:
    """Per-token log-probs `(B, C)` (0 on padding) of right-padded completions given left-padded prompts.

    `model` is a causal LM (a PEFT model computes with its active adapter state). Rows with the same prompt ids and
    mask share one prompt forward; `max_rows` bounds the completion rows per forward (memory).
    """
    from transformers.cache_utils import DynamicCache

    backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
    head = model.get_output_embeddings()
    softcap, logit_scale = head_logit_transform(model)
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    rows = completion_mask.any(1).nonzero().flatten()  # rows without a completion score 0
    if rows.numel() == 0:
        return out
    keyed = torch.cat([prompt_ids[rows], prompt_mask[rows]], dim=1)
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    width = prompt_ids.size(1)
    max_rows = max_rows or rows.numel()
    # Chunks of whole prompt groups, at most `max_rows` completion rows each (a group larger than that goes alone)
    order = torch.argsort(inverse, stable=True)
    chunks, current, count = [], [], 0
    for u in range(unique.size(0)):
        members = order[inverse[order] == u]
        if current and count + members.numel() > max_rows:
            chunks.append(current)
            current, count = [], 0
        current.append((u, members))
        count += members.numel()
    chunks.append(current)
    context = autocast if autocast is not None else torch.autocast(prompt_ids.device.type, enabled=False)
    for chunk in chunks:
        uniq = torch.tensor([u for u, _ in chunk], device=prompt_ids.device)
        members = torch.cat([m for _, m in chunk])
        owner = torch.cat([torch.full((m.numel(),), i, device=prompt_ids.device) for i, (_, m) in enumerate(chunk)])
        u_ids, u_mask = unique[uniq, :width], unique[uniq, width:]
        target = rows[members]
        c_ids, c_mask = completion_ids[target], completion_mask[target]
        with context:
            prefix = backbone(input_ids=u_ids, attention_mask=u_mask, use_cache=True)
            cache = prefix.past_key_values
            if not isinstance(cache, DynamicCache):
                raise TypeError(
                    f"Shared-prefix scoring needs a DynamicCache, the model returned {type(cache).__name__}."
                )
            cache.reorder_cache(owner)
            hidden = backbone(
                input_ids=c_ids,
                attention_mask=torch.cat([u_mask[owner], c_mask], dim=1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        # the first completion token is predicted from the prompt's last position
        hidden = torch.cat([prefix.last_hidden_state[owner, -1:], hidden[:, :-1]], dim=1)
        labels = c_ids.masked_fill(c_mask == 0, -100)
        with maybe_gather_lm_head_ctx(head.weight, head.bias):  # ZeRO-3: the head's weight is partitioned
            logps = fused_logprobs(
                hidden.to(head.weight.device),
                head.weight,
                labels.to(head.weight.device),
                temperature=temperature,
                bias=head.bias,
                softcap=softcap,
                logit_scale=logit_scale,
            )
        out[target] = logps.float().to(out.device)
    return out

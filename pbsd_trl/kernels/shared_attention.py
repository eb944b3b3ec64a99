"""Shared-prefix attention: decoding steps over a KV cache that holds each prompt once for all its samples.

Repeating a prompt's cache for its G samples still makes every decoding step read G copies of it: attention over
the prompt is most of a decoding step, and PBSD's teacher prompts are several times wider than the completions.
When every distinct prompt has as many samples, each layer's cache holds one block per prompt (`U` blocks): the
prompt once, then its G rows' completions interleaved position by position (`P + t·G + g` for row g's t-th
position). A decoding step stacks a prompt's G queries and attends to its block in one `scaled_dot_product_attention`
call, under a mask that lets row g see the prompt (less its padding) and its own completion positions only: the
same attention as over `[prompt ; own completion]`, reading each prompt's keys once for its G rows. The masked
products of the other rows' completions cost less than the extra calls a split into prompt and completion parts
would make (`benchmarks/results/README.md`).
"""

import contextlib
import types

import torch


SHARED_PREFIX_ATTENTION = "pbsd_shared_prefix"
# what the attention layers of transformers' decoder-only models pass that does not change plain attention; anything
# else (attention sinks, a position bias, ...) would be silently dropped, so it sends the call back to a plain cache
_PLAIN_ATTENTION_KWARGS = {
    "position_ids",
    "use_cache",
    "cache_position",
    "output_attentions",
    "is_causal",
    "output_router_logits",  # MoE decoder layers pass their forward's flags down (Qwen3-MoE)
}


class SharedPrefixAttentionUnsupported(RuntimeError):
    """The model's attention is not plain full attention through transformers' `AttentionInterface`: generation is
    redone with the prompt's cache repeated per row (the plain computation)."""


class _SharedPrefix:
    """What the layers of a shared-prefix cache have in common: the `B` rows' grouping into `U` prompts of `G` rows
    (`order` puts the rows prompt by prompt, `restore` undoes it; both None where the rows already come that way) and
    the masks, as additive biases made once per decoding step for all layers."""

    def __init__(self, prompt_mask: torch.Tensor, inverse: torch.Tensor):
        self.units, self.prompt_length = prompt_mask.shape
        self.group = inverse.numel() // self.units
        order = torch.argsort(inverse, stable=True)
        grouped = torch.equal(order, torch.arange(order.numel(), device=order.device))
        self.order = None if grouped else order
        self.restore = None if grouped else torch.argsort(order)
        self.prompt_mask = prompt_mask.bool()
        self._bias_key, self._bias = None, None

    def bias(self, query_rows: int, q_len: int, steps: int, dtype) -> torch.Tensor:
        """`(U, 1, G·query_rows·q_len, P + (steps + q_len)·G)` additive mask of the step whose `q_len` queries follow
        `steps` completion positions; query rows ordered (row g, query head, position j)."""
        key = (query_rows, q_len, steps, dtype)
        if key != self._bias_key:
            device, group = self.prompt_mask.device, self.group
            length = steps + q_len
            row = torch.arange(group, device=device).repeat_interleave(query_rows * q_len)
            position = torch.arange(q_len, device=device).repeat(group * query_rows) + steps
            key_row = torch.arange(group, device=device).repeat(length)
            key_position = torch.arange(length, device=device).repeat_interleave(group)
            own = (row[:, None] == key_row[None]) & (key_position[None] <= position[:, None])  # causal, own row
            allowed = torch.cat(
                [
                    self.prompt_mask[:, None, :].expand(-1, row.numel(), -1),
                    own[None].expand(self.units, -1, -1),
                ],
                dim=-1,
            )
            zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
            self._bias_key, self._bias = key, zeros.masked_fill(~allowed, float("-inf")).unsqueeze(1)
        return self._bias


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a decoding step over a shared-prefix cache layer (see [`_share_prefix`]): `key` and `value` are
    the step's own states, tagged with the layer that holds the prompt blocks."""
    layer = getattr(key, "pbsd_layer", None)
    if layer is None:
        raise SharedPrefixAttentionUnsupported(
            "shared-prefix attention got keys without their prompt cache (the model transforms the cache's keys "
            "before attention)"
        )
    unsupported = {name for name, value in kwargs.items() if value is not None} - _PLAIN_ATTENTION_KWARGS
    if dropout or unsupported:
        raise SharedPrefixAttentionUnsupported(
            "shared-prefix attention supports plain full attention only, the model's attention passes "
            + ", ".join(sorted(unsupported | ({"dropout"} if dropout else set())))
        )
    layer.pbsd_pending = False
    shared = layer.pbsd_prefix
    batch, heads, q_len, dim = query.shape
    units, group, kv_heads = shared.units, shared.group, layer.pbsd_keys.size(1)
    groups = heads // kv_heads  # query heads per kv head
    end = shared.prompt_length + layer.pbsd_steps * group
    if shared.order is not None:
        query = query[shared.order]
    # a prompt's G rows (and the query heads of a kv head) as the query rows of one product over the prompt's block
    stacked = query.reshape(units, group, kv_heads, groups * q_len, dim).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        stacked.reshape(units, kv_heads, group * groups * q_len, dim),
        layer.pbsd_keys[:, :, :end],
        layer.pbsd_values[:, :, :end],
        attn_mask=shared.bias(groups, q_len, layer.pbsd_steps - q_len, query.dtype),
        scale=dim**-0.5 if scaling is None else scaling,
    )
    value_dim = out.size(-1)  # may differ from the query's (e.g. multi-head latent attention)
    out = out.view(units, kv_heads, group, groups * q_len, value_dim).transpose(1, 2)
    out = out.reshape(batch, heads, q_len, value_dim)
    if shared.restore is not None:
        out = out[shared.restore]
    return out.transpose(1, 2).contiguous(), None


def _grow_buffers(layer, positions: int) -> None:
    """Append room for `positions` more positions to a layer's preallocated key and value buffers (a call that
    outgrows the room it was given)."""
    layer.pbsd_keys, layer.pbsd_values = (
        torch.cat([buf, buf.new_empty(*buf.shape[:2], positions, buf.size(-1))], dim=-2)
        for buf in (layer.pbsd_keys, layer.pbsd_values)
    )


def _register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def _append_completion(layer, key_states, value_states, *args, **kwargs):
    """`DynamicLayer.update` of a shared-prefix layer: the step's states go to their rows' slots of the prompt blocks
    (the buffers double if a call outgrows them); it returns the step's own states, tagged with the layer."""
    if layer.pbsd_pending:
        raise SharedPrefixAttentionUnsupported(
            "the model's attention does not dispatch through transformers' AttentionInterface"
        )
    shared = layer.pbsd_prefix
    units, group, q_len = shared.units, shared.group, key_states.size(-2)
    start = shared.prompt_length + layer.pbsd_steps * group
    end = start + q_len * group
    while end > layer.pbsd_keys.size(-2):  # double the completion room
        _grow_buffers(layer, max(layer.pbsd_keys.size(-2) - shared.prompt_length, group))
    for buffer, states in ((layer.pbsd_keys, key_states), (layer.pbsd_values, value_states)):
        if shared.order is not None:
            states = states[shared.order]
        states = states.view(units, group, *states.shape[1:]).permute(0, 2, 3, 1, 4)  # (U, kv, q_len, G, d)
        buffer[:, :, start:end].unflatten(2, (q_len, group)).copy_(states)
    layer.pbsd_steps += q_len
    layer.pbsd_pending = True  # until the attention reads it: a model that bypasses it is caught at the next update
    keys = key_states.view(key_states.shape)
    keys.pbsd_layer = layer
    return keys, value_states


def _share_prefix(cache, inverse, prefix_mask, room: int) -> None:
    """Turn the prefilled cache of `U` distinct prompts into shared-prefix layers: per prompt, a block of the prompt's
    keys and values followed by room for `room` positions of each of its `G` rows (`inverse[b]`: row b's prompt)."""
    shared = _SharedPrefix(prefix_mask, inverse)
    prompt = shared.prompt_length
    for layer in cache.layers:
        for name, states in (("pbsd_keys", layer.keys), ("pbsd_values", layer.values)):
            units, kv_heads, _, dim = states.shape
            buffer = states.new_empty(units, kv_heads, prompt + room * shared.group, dim)
            buffer[:, :, :prompt] = states
            setattr(layer, name, buffer)
        layer.pbsd_prefix, layer.pbsd_steps, layer.pbsd_pending = shared, 0, False
        # what the cache's other methods read: one row per batch row, no positions of their own
        layer.keys, layer.values = (
            states.new_empty(inverse.numel(), states.size(1), 0, states.size(-1))
            for states in (layer.keys, layer.values)
        )
        layer.update = types.MethodType(_append_completion, layer)
        layer.get_seq_length = types.MethodType(lambda self, _p=prompt: _p + self.pbsd_steps, layer)


def can_share_prefix_attention(model, cache, inverse: torch.Tensor) -> bool:
    """Every distinct prompt has the same number of rows (more than one), every cache layer is a plain initialized
    `DynamicLayer`, and attention has no dropout to apply."""
    from transformers.cache_utils import DynamicLayer

    counts = torch.bincount(inverse)
    if counts.numel() == inverse.numel() or not (counts == counts[0]).all():
        return False
    if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in cache.layers):
        return False
    return not (model.training and getattr(model.config.get_text_config(), "attention_dropout", 0.0))


@contextlib.contextmanager
def _attention_implementation(model, name: str):
    config = model.config.get_text_config()
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous

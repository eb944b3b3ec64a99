"""Scoring completions that share a prompt: the prompt once, its KV cache reused by every completion.

PBSD's teacher scores, without gradient, every completion of a prompt group (G student samples and, online, G_T
teacher samples) from the same teacher prompt, which is several times wider than a completion (the privileged
context). Scoring `[prompt ; completion]` rows recomputes that prompt once per row; here each distinct prompt row is
run once with `use_cache=True` and its cache is repeated for the completions that follow it. The result is the same
function as the full forward (same positions, same masks; equal up to floating-point rounding), on
`U·P + B·C` instead of `B·(P + C)` positions for `U` distinct prompts of width `P` and `B` completions of width `C`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings

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
    mask share one prompt forward; `max_rows` bounds the completion rows per forward (memory). `autocast` is a
    callable returning the context manager each chunk's forward runs in (called once per chunk: a generator-based
    manager such as `Accelerator.autocast()` can be entered only once); default: autocast disabled.
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
    if autocast is None:
        autocast = functools.partial(torch.autocast, prompt_ids.device.type, enabled=False)
    for chunk in chunks:
        uniq = torch.tensor([u for u, _ in chunk], device=prompt_ids.device)
        members = torch.cat([m for _, m in chunk])
        owner = torch.cat([torch.full((m.numel(),), i, device=prompt_ids.device) for i, (_, m) in enumerate(chunk)])
        u_ids, u_mask = unique[uniq, :width], unique[uniq, width:]
        target = rows[members]
        c_ids, c_mask = completion_ids[target], completion_mask[target]
        with autocast():
            prefix = backbone(input_ids=u_ids, attention_mask=u_mask, use_cache=True)
            cache = prefix.cache if "cache" in prefix else prefix.past_key_values
            if not isinstance(cache, DynamicCache):
                raise TypeError(
                    f"Shared-prefix scoring needs a DynamicCache, the model returned {type(cache).__name__}."
                )
            cache.reorder_cache(owner)
            hidden = backbone(
                input_ids=c_ids,
                attention_mask=torch.cat([u_mask[owner], c_mask], dim=1),
                use_cache=True,
                **{_cache_keyword(backbone): cache},
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


# ---- generation ---------------------------------------------------------------------------------------------------
# GRPO samples G completions of every prompt, so a `generate` batch holds each prompt row G times (and PBSD's teacher
# rows carry prompts several times wider than the student's). `generate` prefills every row, and its DynamicCache
# grows by concatenation: every decoding step copies the whole cache, prompt included, of every layer. Here each
# distinct prompt row is prefilled once, its cache repeated into buffers with room for the completion, and
# `generate` resumes from that cache, appending in place: the same positions, masks and sampling steps (the same
# samples for the same seed, up to floating-point rounding of the prefill).

# `generate` arguments under which resuming from a prefilled cache is the same computation as a plain call
_PLAIN_GENERATE_KWARGS = {"input_ids", "attention_mask", "generation_config"}


def _cache_keyword(module) -> str:
    """transformers renamed `past_key_values` to `cache` (5.24, old name deprecated): the name this version takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # as `GenerationMixin._prepare_position_ids_for_generation` does for a left-padded batch
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _append_in_place(layer, key_states, value_states, *args, **kwargs):
    """`DynamicLayer.update` into the buffers of [`_preallocate`] (doubling them if a call outgrows them)."""
    start, end = layer.pbsd_length, layer.pbsd_length + key_states.size(-2)
    if end > layer.pbsd_keys.size(-2):
        grow = lambda buf: torch.cat([buf, torch.empty_like(buf[:, :, : max(end - start, buf.size(-2))])], dim=-2)  # noqa: E731
        layer.pbsd_keys, layer.pbsd_values = grow(layer.pbsd_keys), grow(layer.pbsd_values)
    layer.pbsd_keys[:, :, start:end] = key_states
    layer.pbsd_values[:, :, start:end] = value_states
    layer.pbsd_length = end
    layer.keys, layer.values = layer.pbsd_keys[:, :, :end], layer.pbsd_values[:, :, :end]
    return layer.keys, layer.values


def _preallocate(cache, room: int) -> None:
    """Give each `DynamicLayer` of `cache` buffers with `room` more positions, appended to in place."""
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            continue
        length = layer.keys.size(-2)
        for name, states in (("pbsd_keys", layer.keys), ("pbsd_values", layer.values)):
            buffer = states.new_empty(*states.shape[:2], length + room, states.size(-1))
            buffer[:, :, :length] = states
            setattr(layer, name, buffer)
        layer.pbsd_length = length
        layer.keys, layer.values = layer.pbsd_keys[:, :, :length], layer.pbsd_values[:, :, :length]
        layer.update = types.MethodType(_append_in_place, layer)


# ---- shared-prefix attention -------------------------------------------------------------------------------------
# Repeating a prompt's cache for its G samples still makes every decoding step read G copies of it: attention over
# the prompt is most of a decoding step, and PBSD's teacher prompts are several times wider than the completions.
# When every distinct prompt has as many samples, the cache keeps one copy of each prompt (`U` rows) and a per-row
# buffer for the completion; a decoding step attends to the prompt with the G samples' queries stacked into one
# matrix product per prompt, to the completion per row, and merges the two softmax parts by their log-sum-exp: the
# same attention, up to floating-point rounding.
SHARED_PREFIX_ATTENTION = "pbsd_shared_prefix"
# what the attention layers of transformers' decoder-only models pass that does not change plain attention; anything
# else (attention sinks, a position bias, ...) would be silently dropped, so it sends the call back to a plain cache
_PLAIN_ATTENTION_KWARGS = {"position_ids", "use_cache", "cache_position", "output_attentions", "is_causal"}


class SharedPrefixAttentionUnsupported(RuntimeError):
    """The model's attention is not plain full attention through transformers' `AttentionInterface`: generation is
    redone with the prompt's cache repeated per row (the plain computation)."""


class _SharedPrefix:
    """One layer's prompt cache `(U, kv_heads, P, d)`, its padding mask `(U, P)`, and the row order grouping the
    batch's rows by prompt (`order`, `G` rows per prompt; `restore` undoes it)."""

    def __init__(self, keys, values, mask, inverse):
        self.keys, self.values, self.mask = keys, values, mask.bool()
        self.bias = None  # the mask as the additive bias of the fused CPU kernel, made on first use
        self.order = torch.argsort(inverse, stable=True)
        self.restore = torch.argsort(self.order)
        self.group = inverse.numel() // keys.size(0)
        self.pending = False  # keys appended and not yet attended to: the model bypassed this attention


@functools.cache
def _flash_cpu_kernel():
    """PyTorch's fused CPU attention that also returns the log-sum-exp (private ATen op; None where missing); looked
    up once, not at every layer of every decoding step."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_prefix(prefix, query, scaling):
    """[`_attend`] of the grouped queries `(U, kv, rows, d)` over the prompt cache. On CPU through PyTorch's fused
    kernel, which returns the log-sum-exp too: measured about twice as fast as the matrix products at the shapes of
    the pool build and the one-pass call (16-32 prompts, 4-8 samples, ~100 prompt positions)."""
    kernel = _flash_cpu_kernel() if query.device.type == "cpu" else None
    if kernel is None:
        return _attend(query, prefix.keys, prefix.values, scaling, prefix.mask[:, None, None, :])
    if prefix.bias is None or prefix.bias.dtype != query.dtype:
        zeros = torch.zeros(prefix.mask.shape, dtype=query.dtype, device=query.device)
        prefix.bias = zeros.masked_fill(~prefix.mask, float("-inf"))[:, None, None, :]
    out, lse = kernel(query, prefix.keys, prefix.values, attn_mask=prefix.bias, scale=scaling)
    return out.float().contiguous(), lse.unsqueeze(-1).contiguous()


def _attend(query, key, value, scaling, mask=None):
    """Softmax attention of `query (N, kv, Q, d)` over `key/value (N, kv, L, d)`, in float32 with its log-sum-exp."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse).to(value.dtype), value).float()
    return out, lse


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a decoding step over a [`_SharedPrefix`] cache (`key`/`value` hold the completion part only)."""
    prefix = getattr(key, "pbsd_prefix", None)
    if prefix is None:
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
    prefix.pending = False
    batch, heads, q_len, dim = query.shape
    kv_heads = key.size(1)
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    # prompt part: the G samples of a prompt (and the query heads of a kv head) as the rows of one product
    units, group = prefix.keys.size(0), prefix.group
    grouped = query[prefix.order].reshape(units, group, kv_heads, groups * q_len, dim).transpose(1, 2)
    out_p, lse_p = _attend_prefix(prefix, grouped.reshape(units, kv_heads, group * groups * q_len, dim), scaling)
    out_p = out_p.view(units, kv_heads, group, groups * q_len, dim).transpose(1, 2).reshape(batch, kv_heads, -1, dim)
    lse_p = lse_p.view(units, kv_heads, group, groups * q_len, 1).transpose(1, 2).reshape(batch, kv_heads, -1, 1)
    out_p, lse_p = out_p[prefix.restore], lse_p[prefix.restore]
    # completion part: per row, causal within the step's queries (generation feeds no padding after the prompt)
    length = key.size(-2)
    causal = torch.ones(q_len, length, dtype=torch.bool, device=query.device).tril(length - q_len)
    causal = causal.repeat(groups, 1)  # rows: (query head within the kv head, query position)
    out_s, lse_s = _attend(query.reshape(batch, kv_heads, groups * q_len, dim), key, value, scaling, causal)
    # the completion part's share of the softmax mass: exp(lse_s) / (exp(lse_p) + exp(lse_s))
    out = torch.lerp(out_p, out_s, torch.sigmoid(lse_s - lse_p))
    out = out.view(batch, heads, q_len, dim).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _register_shared_prefix_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def _append_completion(layer, key_states, value_states, *args, **kwargs):
    """[`_append_in_place`] for a [`_SharedPrefix`] layer: the returned keys carry the layer's prompt cache."""
    prefix = layer.pbsd_prefix
    if prefix.pending:
        raise SharedPrefixAttentionUnsupported(
            "the model's attention does not dispatch through transformers' AttentionInterface"
        )
    keys, values = _append_in_place(layer, key_states, value_states)
    keys.pbsd_prefix, prefix.pending = prefix, True
    return keys, values


def _share_prefix(cache, inverse, prefix_mask, room: int) -> None:
    """Turn the prefilled cache of `U` distinct prompts into [`_SharedPrefix`] layers with per-row buffers of `room`
    positions for the completions of the `B` rows (`inverse[b]`: row b's prompt)."""
    for layer in cache.layers:
        prefix = _SharedPrefix(layer.keys, layer.values, prefix_mask, inverse)
        rows = inverse.numel()
        shape = (rows, layer.keys.size(1), room, layer.keys.size(-1))
        layer.pbsd_keys, layer.pbsd_values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
        layer.pbsd_length, layer.pbsd_prefix = 0, prefix
        layer.keys, layer.values = layer.pbsd_keys[:, :, :0], layer.pbsd_values[:, :, :0]
        layer.update = types.MethodType(_append_completion, layer)
        prompt = prefix.keys.size(-2)
        layer.get_seq_length = types.MethodType(lambda self, _p=prompt: _p + self.pbsd_length, layer)


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


def _generation_setting(model, generation_config, name: str, default=None):
    # unset fields of the call's config fall back to the model's, as `generate` merges them
    for config in (generation_config, getattr(model, "generation_config", None)):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def can_prefill_once(model, generation_config, kwargs: dict) -> bool:
    """Whether [`generate_with_shared_prefill`] may serve this `generate` call (else it is a plain call)."""
    if set(kwargs) - _PLAIN_GENERATE_KWARGS or kwargs.get("input_ids") is None:
        return False  # multimodal inputs, token types, adapter names, a cache of the caller's
    if getattr(model, "peft_config", None) and model.active_peft_config.is_prompt_learning:
        return False  # prompt learning adapters own the cache
    if not supports_shared_prefix(model):
        return False

    def setting(name, default):
        return _generation_setting(model, generation_config, name, default)

    return (
        setting("num_beams", 1) == 1
        and setting("cache_implementation", None) is None
        and setting("prefill_chunk_size", None) is None
        and setting("use_cache", True) is not False
        and kwargs["input_ids"].size(1) > 1
    )


@torch.no_grad()
def generate_with_shared_prefill(generate, model, select_rows=None, share_attention=False, **kwargs):
    """`generate(**kwargs)` with each distinct prompt row of the batch prefilled once, into a preallocated cache.

    `generate` is the model's bound `generate`; `select_rows(index)` (optional) switches per-row state the model holds
    (e.g. per-row LoRA scalings) to the rows `index` of the batch, and `select_rows(None)` back to the whole batch.
    The last prompt position is left to `generate`, which computes the first sampled token's logits from it. With
    `share_attention` (and as many rows for every distinct prompt) the cache keeps one copy of each prompt and the
    decoding steps attend to it once per prompt ([`shared_prefix_attention`]); `None`: on CPU, where it was measured
    faster for wide prompts (`benchmarks/results/pool_batch_size.md`, `step_cost.md`); elsewhere the model's own
    attention kernel (e.g. FlashAttention on CUDA) is kept until it is measured there. Off by default, as in
    [`shared_prompt_prefill`]. A model whose attention is not plain full attention through transformers'
    `AttentionInterface` gets the call redone with the cache repeated per row, and a warning.
    """
    call = dict(kwargs)
    input_ids, attention_mask = kwargs["input_ids"], kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    width = input_ids.size(1)
    unique, inverse = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    first_row = torch.full((unique.size(0),), input_ids.size(0), device=inverse.device, dtype=torch.long)
    first_row.scatter_reduce_(0, inverse, torch.arange(inverse.numel(), device=inverse.device), reduce="amin")
    u_ids, u_mask = unique[:, : width - 1], unique[:, width : 2 * width - 1]
    backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
    if select_rows is not None:
        select_rows(first_row)
    try:
        out = backbone(
            input_ids=u_ids, attention_mask=u_mask, position_ids=_generation_position_ids(u_mask), use_cache=True
        )
    finally:
        if select_rows is not None:
            select_rows(None)
    cache = out.cache if "cache" in out else out.past_key_values
    config = kwargs.get("generation_config")
    max_new_tokens = _generation_setting(model, config, "max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = max(0, _generation_setting(model, config, "max_length", 20) - width)
    room = max_new_tokens + 1  # + the last prompt position, which `generate` runs
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    kwargs = {**kwargs, "attention_mask": attention_mask, _cache_keyword(causal_lm): cache}
    if share_attention is None:
        share_attention = input_ids.device.type == "cpu"
    if share_attention and can_share_prefix_attention(causal_lm, cache, inverse):
        _register_shared_prefix_attention()
        _share_prefix(cache, inverse, u_mask, room)
        try:
            with _attention_implementation(causal_lm, SHARED_PREFIX_ATTENTION):
                return generate(**kwargs)
        except SharedPrefixAttentionUnsupported as err:
            warnings.warn(
                f"Not attending to each prompt's cache once: {err}. Generating with the prompt's cache repeated per "
                "row instead (the same computation, without this saving).",
                stacklevel=2,
            )
            return generate_with_shared_prefill(generate, model, select_rows, share_attention=False, **call)
    cache.batch_select_indices(inverse)
    _preallocate(cache, room)
    return generate(**kwargs)


@contextlib.contextmanager
def shared_prompt_prefill(model, select_rows=None, share_attention=False):
    """While active, `model.generate` prefills each distinct prompt row once (see [`generate_with_shared_prefill`])
    where that is the same computation, and is a plain call elsewhere.

    `share_attention`: also attend to each prompt's cache once per decoding step (see [`shared_prefix_attention`];
    `None`: on CPU). Off by default: measured on CPU (`benchmarks/results/step_cost.md`) it pays for large batches of
    wide prompts (the pool build: 256 completions per call, K=8) and costs time in the trainer's calls of 32-64 rows,
    whose student prompts are a small part of what a decoding step attends to.
    """
    original = model.__dict__.get("generate")
    generate = model.generate

    def prefill_once_generate(*args, generation_config=None, **kwargs):
        if args:  # positional `inputs`
            kwargs = {"input_ids": args[0], **kwargs}
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        if not can_prefill_once(model, generation_config, kwargs):
            return generate(**kwargs)
        return generate_with_shared_prefill(generate, model, select_rows, share_attention=share_attention, **kwargs)

    model.generate = prefill_once_generate
    try:
        yield
    finally:
        if original is None:
            del model.generate
        else:
            model.generate = original

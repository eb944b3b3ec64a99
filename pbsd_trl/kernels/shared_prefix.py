"""Scoring and sampling completions that share a prompt: the prompt once, its KV cache reused by every completion.

PBSD's teacher scores, without gradient, every completion of a prompt group (G student samples and, online, G_T
teacher samples) from the same teacher prompt, which is several times wider than a completion (the privileged
context). Scoring `[prompt ; completion]` rows recomputes that prompt once per row; here each distinct prompt row is
run once with `use_cache=True` and its cache is repeated for the completions that follow it. The result is the same
function as the full forward (same positions, same masks; equal up to floating-point rounding), on
`U·P + B·C` instead of `B·(P + C)` positions for `U` distinct prompts of width `P` and `B` completions of width `C`.
`generate` calls get the same treatment (see "generation" below, and `shared_attention` for the decoding steps).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
import warnings

import torch

from ..logprobs import backbone_of, head_token_logps
from .shared_attention import (
    SHARED_PREFIX_ATTENTION,
    SharedPrefixAttentionUnsupported,
    _attention_implementation,
    _grow_buffers,
    _register_shared_prefix_attention,
    _share_prefix,
    can_share_prefix_attention,
)


def supports_shared_prefix(model) -> bool:
    """Decoder-only models whose cache is transformers' `DynamicCache` of plain full-attention layers."""
    config = model.config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    return getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", False)


def _fewer_positions_pay(device) -> bool:
    """Whether trading extra calls or masked products for fewer positions read or run pays on `device`: prompts and
    completions grouped by width (several narrower forwards) and shared-prefix attention (each prompt's cache read
    once, other rows' completions masked). On CPU the cost follows the positions; a GPU's small calls are bound by
    kernel launches, so the plain computation is kept there (`benchmarks/results/README.md`)."""
    return torch.device(device).type == "cpu"


def _length_groups(lengths: list[int], overhead: int | None = 64, max_cuts: int = 64) -> list[list[int]]:
    """Indices of right-padded completions of `lengths` in groups, each run at its longest member's width: the split of
    the completions sorted by length that runs the fewest positions, counting `overhead` positions for each forward
    (its fixed cost; None: one group). Cut points are the ends of distinct lengths, at most `max_cuts` of them (evenly
    spaced)."""
    if overhead is None:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[i] for i in order]
    ends = [j + 1 for j in range(len(order) - 1) if ordered[j + 1] != ordered[j]]
    ends = ends[:: max(1, math.ceil(len(ends) / max_cuts))] + [len(order)]
    cost, start_of = {0: 0}, {}
    for end in ends:
        width = ordered[end - 1]
        start = min(cost, key=lambda s: cost[s] + (end - s) * width)
        cost[end], start_of[end] = cost[start] + (end - start) * width + overhead, start
    groups, end = [], len(order)
    while end:
        groups.append(order[start_of[end] : end])
        end = start_of[end]
    return groups[::-1]


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
    mask share one prompt forward; `max_rows` bounds the completion rows per forward (memory). The completions then
    run in groups of similar length, each cut to its longest member ([`_length_groups`]), not all at the batch's
    padded width. `autocast` is a callable returning the context manager each chunk's forward runs in (called once
    per chunk: a generator-based manager such as `Accelerator.autocast()` can be entered only once); default:
    autocast disabled.
    """
    from transformers.cache_utils import DynamicCache

    backbone = backbone_of(model)
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    rows = completion_mask.any(1).nonzero().flatten()  # rows without a completion score 0
    if rows.numel() == 0:
        return out
    unique, inverse = torch.unique(torch.cat([prompt_ids[rows], prompt_mask[rows]], dim=1), dim=0, return_inverse=True)
    width = prompt_ids.size(1)
    # right padding: a completion's length is one past its last attended position
    positions = torch.arange(1, completion_mask.size(1) + 1, device=completion_mask.device)
    lengths = (completion_mask.bool() * positions).amax(1)
    chunks = _prompt_group_chunks(inverse, unique.size(0), max_rows or rows.numel())
    autocast = autocast or functools.partial(torch.autocast, prompt_ids.device.type, enabled=False)
    for chunk in chunks:
        uniq = torch.tensor([u for u, _ in chunk], device=prompt_ids.device)
        members = torch.cat([m for _, m in chunk])
        owner = torch.cat([torch.full((m.numel(),), i, device=prompt_ids.device) for i, (_, m) in enumerate(chunk)])
        u_ids, u_mask = unique[uniq, :width], unique[uniq, width:]
        target = rows[members]
        hidden_states = []
        with autocast():
            prefix = backbone(input_ids=u_ids, attention_mask=u_mask, use_cache=True)
            cache = prefix.cache if "cache" in prefix else prefix.past_key_values
            if not isinstance(cache, DynamicCache):
                raise TypeError(
                    f"Shared-prefix scoring needs a DynamicCache, the model returned {type(cache).__name__}."
                )
            prompt_states = [(layer.keys, layer.values) for layer in cache.layers]
            overhead = 64 if _fewer_positions_pay(completion_ids.device) else None
            for group in _length_groups(lengths[target].tolist(), overhead):
                group = torch.tensor(group, device=prompt_ids.device)
                length = int(lengths[target[group]].max())
                for layer, (keys, values) in zip(cache.layers, prompt_states, strict=True):
                    layer.keys, layer.values = keys, values
                cache.batch_select_indices(owner[group])  # the prompt's cache, once per completion row
                c_ids, c_mask = completion_ids[target[group], :length], completion_mask[target[group], :length]
                hidden = backbone(
                    input_ids=c_ids,
                    attention_mask=torch.cat([u_mask[owner[group]], c_mask], dim=1),
                    use_cache=True,
                    **{_cache_keyword(backbone): cache},
                ).last_hidden_state
                # the first completion token is predicted from the prompt's last position
                hidden = torch.cat([prefix.last_hidden_state[owner[group], -1:], hidden[:, :-1]], dim=1)
                hidden_states.append((target[group], c_ids.masked_fill(c_mask == 0, -100), hidden))
        for index, labels, hidden in hidden_states:
            logps = head_token_logps(model, hidden, labels, temperature)
            out[index, : labels.size(1)] = logps.float().to(out.device)
    return out


def _prompt_group_chunks(inverse: torch.Tensor, num_prompts: int, max_rows: int) -> list[list]:
    """`[(prompt, member rows)]` chunks of whole prompt groups, at most `max_rows` completion rows each (a group
    larger than that goes alone)."""
    order = torch.argsort(inverse, stable=True)
    chunks, current, count = [], [], 0
    for u in range(num_prompts):
        members = order[inverse[order] == u]
        if current and count + members.numel() > max_rows:
            chunks.append(current)
            current, count = [], 0
        current.append((u, members))
        count += members.numel()
    chunks.append(current)
    return chunks


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
        _grow_buffers(layer, max(end - start, layer.pbsd_keys.size(-2)))
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


def _width_groups(lengths: list[int], split: bool = True) -> list[list[int]]:
    """Indices of prompts of `lengths`, grouped so that no prompt is padded to more than twice its length (widest
    first); one group if not `split`."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not groups or (split and 2 * lengths[i] <= lengths[groups[-1][0]]):
            groups.append([])
        groups[-1].append(i)
    return groups


def _prefill(backbone, ids, mask, first_row, select_rows=None):
    """The KV cache of the left-padded prompt rows `ids`, prefilled in groups of similar width, each cut to its widest
    prompt: in PBSD's one-pass call the student prompts are a fifth of the teacher prompts' width and would otherwise
    be run over it. The cache has the batch's width: the padding positions cut off hold zeros (masked like any
    padding)."""
    width = ids.size(1)
    # left padding: a prompt's length runs from its first attended position (1 for a row with none)
    lengths = (width - (mask != 0).int().argmax(1)).masked_fill(~mask.bool().any(1), 1).tolist()
    groups, caches = _width_groups(lengths, split=_fewer_positions_pay(ids.device)), []
    for group in groups:
        index = torch.tensor(group, device=ids.device) if len(groups) > 1 else slice(None)
        cut = width - lengths[group[0]]
        g_ids, g_mask = ids[index, cut:], mask[index, cut:]
        if select_rows is not None:
            select_rows(first_row[index])
        try:
            out = backbone(
                input_ids=g_ids, attention_mask=g_mask, position_ids=_generation_position_ids(g_mask), use_cache=True
            )
        finally:
            if select_rows is not None:
                select_rows(None)
        caches.append((index, cut, out.cache if "cache" in out else out.past_key_values))
    cache = caches[0][2]
    if len(caches) == 1 and caches[0][1] == 0:
        return cache
    for layer_idx, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            states = getattr(layer, name)
            full = states.new_zeros(ids.size(0), states.size(1), width, states.size(-1))
            for index, cut, group_cache in caches:
                full[index, :, cut:] = getattr(group_cache.layers[layer_idx], name)
            setattr(layer, name, full)
    return cache


@torch.no_grad()
def generate_with_shared_prefill(generate, model, select_rows=None, share_attention=None, **kwargs):
    """`generate(**kwargs)` with each distinct prompt row of the batch prefilled once, into a preallocated cache.

    `generate` is the model's bound `generate`; `select_rows(index)` (optional) switches per-row state the model holds
    (e.g. per-row LoRA scalings) to the rows `index` of the batch, and `select_rows(None)` back to the whole batch.
    The last prompt position is left to `generate`, which computes the first sampled token's logits from it. With
    `share_attention` (and as many rows for every distinct prompt) the cache keeps one copy of each prompt and the
    decoding steps attend to it once per prompt ([`shared_prefix_attention`]); `None` (the default): on CPU, where it
    pays in every call PBSD makes (`benchmarks/results/step_cost.md`); elsewhere the model's own attention kernel (e.g.
    FlashAttention on CUDA) is kept. A model whose attention is not
    plain full attention through transformers' `AttentionInterface` gets the call redone with the cache repeated per
    row, and a warning.
    """
    call = dict(kwargs)
    input_ids, attention_mask = kwargs["input_ids"], kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    width = input_ids.size(1)
    unique, inverse = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
    first_row = torch.full((unique.size(0),), input_ids.size(0), device=inverse.device, dtype=torch.long)
    first_row.scatter_reduce_(0, inverse, torch.arange(inverse.numel(), device=inverse.device), reduce="amin")
    # distinct prompts in the order of their first row: a batch that comes prompt by prompt needs no reordering
    by_first_row = torch.argsort(first_row)
    unique, first_row, inverse = unique[by_first_row], first_row[by_first_row], torch.argsort(by_first_row)[inverse]
    u_ids, u_mask = unique[:, : width - 1], unique[:, width : 2 * width - 1]
    backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
    cache = _prefill(backbone, u_ids, u_mask, first_row, select_rows)
    config = kwargs.get("generation_config")
    max_new_tokens = _generation_setting(model, config, "max_new_tokens")
    if max_new_tokens is None:
        max_new_tokens = max(0, _generation_setting(model, config, "max_length", 20) - width)
    room = max_new_tokens + 1  # + the last prompt position, which `generate` runs
    causal_lm = model.get_base_model() if hasattr(model, "peft_config") else model
    kwargs = {**kwargs, "attention_mask": attention_mask, _cache_keyword(causal_lm): cache}
    if share_attention is None:
        share_attention = _fewer_positions_pay(input_ids.device)
    if share_attention and can_share_prefix_attention(causal_lm, cache, inverse):
        _register_shared_prefix_attention()
        _share_prefix(cache, inverse, u_mask, room)
        try:
            with _attention_implementation(causal_lm, SHARED_PREFIX_ATTENTION):
                result = generate(**kwargs)
            if any(layer.pbsd_pending for layer in cache.layers):  # the last step's states were never attended to
                raise SharedPrefixAttentionUnsupported(
                    "the model's attention does not dispatch through transformers' AttentionInterface"
                )
            return result
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
def shared_prompt_prefill(model, select_rows=None, share_attention=None):
    """While active, `model.generate` prefills each distinct prompt row once (see [`generate_with_shared_prefill`])
    where that is the same computation, and is a plain call elsewhere.

    `share_attention`: also attend to each prompt's cache once per decoding step (see [`shared_prefix_attention`];
    `None`, the default: on CPU, where it pays for the trainer's calls and the pool build's,
    `benchmarks/results/step_cost.md`).
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

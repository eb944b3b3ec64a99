"""Shared-prefix teacher scoring equals the full `[prompt ; completion]` forward."""

import contextlib
import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import perturb_lora_adapters

from pbsd_trl.kernels.shared_prefix import shared_prefix_token_logps
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model


def full_forward_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    """Independent reference: full logits of the concatenated rows, float64 log-softmax."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = (
            model(input_ids=ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1 : -1].double() / temperature
        )
    logps = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return (logps * completion_mask).float()


@pytest.mark.parametrize("overhead", [64, 0, None])
@pytest.mark.parametrize("max_rows", [None, 3])
@pytest.mark.parametrize("peft", [False, True])
def test_shared_prefix_equals_full_forward(max_rows, peft, overhead, monkeypatch):
    """`overhead` 0: every distinct completion length runs as its own group, cut to that length; None: one group (as
    off the CPU)."""
    import pbsd_trl.kernels.shared_prefix as shared_prefix

    length_groups = shared_prefix._length_groups
    monkeypatch.setattr(shared_prefix, "_length_groups", lambda lengths, _: length_groups(lengths, overhead))
    torch.manual_seed(0)
    tok, model = _tiny_lm(peft)
    vocab = model.config.vocab_size
    # 3 distinct left-padded prompts of different lengths, groups of 3, 2 and 4 rows, interleaved
    lengths, pad = [9, 5, 12], tok.pad_token_id
    prompts = [torch.randint(3, vocab, (n,)) for n in lengths]
    owner = [0, 1, 2, 0, 2, 1, 0, 2, 2]
    width = max(lengths)
    prompt_ids = torch.full((len(owner), width), pad)
    prompt_mask = torch.zeros((len(owner), width), dtype=torch.long)
    for r, u in enumerate(owner):
        prompt_ids[r, width - lengths[u] :] = prompts[u]
        prompt_mask[r, width - lengths[u] :] = 1
    completion_ids = torch.randint(3, vocab, (len(owner), 7))
    completion_mask = torch.ones_like(completion_ids)
    for r, n in enumerate([7, 3, 0, 5, 7, 1, 6, 0, 4]):  # right padding, two empty completions
        completion_mask[r, n:] = 0
        completion_ids[r, n:] = pad
    entered = []

    @contextlib.contextmanager
    def single_use_autocast():  # like `Accelerator.autocast()`: a generator-based manager, enterable once
        entered.append(True)
        yield

    got = shared_prefix_token_logps(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7, max_rows, autocast=single_use_autocast
    )
    assert len(entered) == (1 if max_rows is None else 3)  # one context per chunk of whole prompt groups
    expected = full_forward_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got[completion_mask == 0] == 0).all() and (got[completion_mask == 1] < 0).all()


@pytest.mark.parametrize(
    "lengths", [[7, 3, 5, 7, 1, 6, 4], [40] * 6 + [10] * 30, [5, 50, 5, 50, 49, 6], [3], list(range(1, 12))]
)
@pytest.mark.parametrize("overhead", [0, 8, 64])
def test_length_groups_run_the_fewest_positions(lengths, overhead):
    """Against every split of the length-sorted completions into consecutive groups (brute force)."""
    from pbsd_trl.kernels.shared_prefix import _length_groups

    assert _length_groups(lengths, overhead=None) == [list(range(len(lengths)))]
    groups = _length_groups(lengths, overhead=overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(parts):
        return sum(len(p) * max(p) + overhead for p in parts)

    ordered = sorted(lengths)
    best = min(
        cost([ordered[a:b] for a, b in itertools.pairwise((0, *cuts, len(ordered)))])
        for k in range(len(ordered) if len(ordered) <= 12 else 3)  # the long case has two distinct lengths
        for cuts in itertools.combinations(range(1, len(ordered)), k)
    )
    assert cost([[lengths[i] for i in g] for g in groups]) == best


def test_width_groups_pad_no_prompt_to_more_than_twice_its_length():
    from pbsd_trl.kernels.shared_prefix import _width_groups

    lengths = [95, 15, 80, 14, 96, 16, 40, 47]
    groups = _width_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[96, 95, 80], [47, 40], [16, 15, 14]]
    assert all(2 * lengths[i] > lengths[g[0]] for g in groups for i in g)
    assert _width_groups(lengths, split=False) == [sorted(range(len(lengths)), key=lambda i: -lengths[i])]


# ---- generation: each distinct prompt row prefilled once ----------------------------------------------------------
def _repeated_prompt_batch(tok, vocab, lengths, repeats, seed=0, extra_padding=0):
    """Left-padded rows: prompt u of length `lengths[u]` repeated `repeats` times, groups interleaved; every row with
    `extra_padding` more padding positions (as `pad_to_multiple_of` leaves)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    owner = [u for _ in range(repeats) for u in range(len(lengths))]
    width = max(lengths) + extra_padding
    ids = torch.full((len(owner), width), tok.pad_token_id)
    mask = torch.zeros((len(owner), width), dtype=torch.long)
    for r, u in enumerate(owner):
        ids[r, width - lengths[u] :] = prompts[u]
        mask[r, width - lengths[u] :] = 1
    return ids, mask


class _BackboneCalls:
    """Sequence widths of the backbone's forward calls (generate's prefill is the one wider than one position)."""

    def __init__(self, model):
        backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
        self.shapes = []
        self._handle = backbone.register_forward_pre_hook(
            lambda module, args, kwargs: self.shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )

    def remove(self):
        self._handle.remove()


def _tiny_lm(peft: bool):
    tok = build_char_tokenizer()
    model = build_random_model(tok, seed=3)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        perturb_lora_adapters(model)  # an adapter that changes the outputs
    return tok, model.eval()


@pytest.mark.parametrize("lengths", [[9, 4, 13], [9, 8, 13]])
@pytest.mark.parametrize("extra_padding", [0, 3])
@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("peft", [False, True])
def test_shared_prompt_prefill_generates_the_same_samples(do_sample, peft, extra_padding, lengths):
    from transformers import GenerationConfig

    from pbsd_trl.kernels.shared_prefix import shared_prompt_prefill

    tok, model = _tiny_lm(peft)
    ids, mask = _repeated_prompt_batch(
        tok, model.config.vocab_size, lengths=lengths, repeats=4, extra_padding=extra_padding
    )
    config = GenerationConfig(
        max_new_tokens=12, do_sample=do_sample, temperature=0.9, pad_token_id=tok.pad_token_id, eos_token_id=None
    )
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    calls = _BackboneCalls(model)
    try:
        with shared_prompt_prefill(model):
            torch.manual_seed(0)
            shared = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    finally:
        calls.remove()
    assert "generate" not in model.__dict__  # the patch is undone
    assert torch.equal(plain, shared)
    # 3 distinct prompts prefilled once (all but the last position; a group cut to its widest prompt), a prompt
    # less than half as wide as the widest apart from it, then generate steps one position at a time
    prefill = [(2, 12), (1, 3)] if min(lengths) == 4 else [(3, 12)]
    assert calls.shapes[: len(prefill)] == prefill
    decoding = calls.shapes[len(prefill) :]
    assert all(width == 1 for _, width in decoding) and len(decoding) == config.max_new_tokens


def test_shared_prompt_prefill_leaves_other_calls_plain():
    from transformers import GenerationConfig

    from pbsd_trl.kernels.shared_prefix import can_prefill_once, shared_prompt_prefill

    tok, model = _tiny_lm(peft=False)
    ids, mask = _repeated_prompt_batch(tok, model.config.vocab_size, lengths=[6, 8], repeats=2)
    greedy = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    beams = GenerationConfig(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=tok.pad_token_id)
    distinct_ids, distinct_mask = ids[:2], mask[:2]  # no prompt repeats: still one prefill, into a preallocated cache
    for kwargs, shareable in [
        (dict(input_ids=ids, attention_mask=mask, generation_config=greedy), True),
        (dict(input_ids=ids, attention_mask=mask, generation_config=beams), False),
        (
            dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), generation_config=greedy),
            False,
        ),
        (dict(input_ids=distinct_ids, attention_mask=distinct_mask, generation_config=greedy), True),
    ]:
        assert can_prefill_once(model, kwargs["generation_config"], kwargs) is shareable
        if "token_type_ids" in kwargs:
            continue  # the tiny model takes no token types; the check above is what decides
        expected = model.generate(**kwargs)
        calls = _BackboneCalls(model)
        try:
            with shared_prompt_prefill(model):
                got = model.generate(**kwargs)
        finally:
            calls.remove()
        assert torch.equal(got, expected)
        prefilled_once = calls.shapes[0][1] == ids.size(1) - 1
        assert prefilled_once is shareable


def test_preallocated_cache_appends_like_concatenation():
    """The in-place cache holds what DynamicCache's concatenation holds, also once it outgrows its room."""
    from pbsd_trl.kernels.shared_prefix import _preallocate

    tok, model = _tiny_lm(peft=False)
    ids, mask = _repeated_prompt_batch(tok, model.config.vocab_size, lengths=[5, 7], repeats=2)
    with torch.no_grad():
        caches = [model.base_model(input_ids=ids, attention_mask=mask, use_cache=True).cache for _ in range(2)]
    plain, in_place = caches
    _preallocate(in_place, room=2)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):  # 5 appends into room for 2: the buffers grow
        width = 1 if step < 4 else 3
        for layer_idx, layer in enumerate(plain.layers):
            k, v = (torch.randn(layer.keys.shape[:2] + (width, layer.keys.size(-1)), generator=gen) for _ in range(2))
            expected = plain.update(k, v, layer_idx)
            got = in_place.update(k, v, layer_idx)
            for e, g in zip(expected, got, strict=True):
                assert torch.equal(e, g)
    assert in_place.get_seq_length() == plain.get_seq_length() == ids.size(1) + 7


@pytest.mark.parametrize("value_dim", [8, 6])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("q_len", [1, 3])
def test_shared_prefix_attention_equals_attention_over_the_repeated_cache(q_len, grouped, value_dim):
    """Each prompt's block (prompt once, its rows' completions interleaved) filled step by step through the cache's
    `update`, past its room (the buffers grow), then attended to with the rows' queries stacked: against float64
    softmax attention over `[prompt repeated ; own completion]` keys with the equivalent mask (GQA, left padding, rows
    grouped by prompt or interleaved, values narrower than keys as in multi-head latent attention)."""
    from types import SimpleNamespace

    from transformers.cache_utils import DynamicLayer

    from pbsd_trl.kernels.shared_attention import _share_prefix, shared_prefix_attention

    gen = torch.Generator().manual_seed(0)
    units, group, heads, kv_heads, dim, prompt = 3, 4, 4, 2, 8, 7
    inverse = torch.arange(units).repeat_interleave(group) if grouped else torch.arange(units).repeat(group)
    prefix_mask = torch.ones(units, prompt, dtype=torch.bool)
    prefix_mask[1, :3] = prefix_mask[2, :5] = False  # left padding
    keys_p = torch.randn(units, kv_heads, prompt, dim, generator=gen)
    values_p = torch.randn(units, kv_heads, prompt, value_dim, generator=gen)
    layer = DynamicLayer()
    layer.lazy_initialization(keys_p, values_p)
    layer.keys, layer.values = keys_p, values_p
    _share_prefix(SimpleNamespace(layers=[layer]), inverse, prefix_mask, room=2)
    batch = units * group
    steps = [1, 1, 1, q_len]  # 3 decoding steps, then q_len positions at once: 6 positions in room for 2
    completion_k = torch.randn(batch, kv_heads, sum(steps), dim, generator=gen)
    completion_v = torch.randn(batch, kv_heads, sum(steps), value_dim, generator=gen)
    done = 0
    for width in steps:
        keys, values = layer.update(completion_k[:, :, done : done + width], completion_v[:, :, done : done + width])
        done += width
        query = torch.randn(batch, heads, width, dim, generator=gen)
        out, _ = shared_prefix_attention(SimpleNamespace(), query, keys, values, None, scaling=0.3)
    assert layer.get_seq_length() == prompt + done

    keys = torch.cat([keys_p[inverse], completion_k], dim=2).double().repeat_interleave(heads // kv_heads, dim=1)
    values = torch.cat([values_p[inverse], completion_v], dim=2).double().repeat_interleave(heads // kv_heads, dim=1)
    causal = torch.ones(q_len, done, dtype=torch.bool).tril(done - q_len)
    mask = torch.cat([prefix_mask[inverse][:, None, :].expand(-1, q_len, -1), causal.expand(batch, -1, -1)], dim=-1)
    scores = (query.double() @ keys.transpose(-1, -2) * 0.3).masked_fill(~mask[:, None], float("-inf"))
    expected = (scores.softmax(-1) @ values).transpose(1, 2)
    assert out.shape == (batch, q_len, heads, value_dim)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra_padding", [0, 3])
@pytest.mark.parametrize("repeats", [4, None])
def test_generation_attends_to_each_prompt_once_where_groups_are_equal(repeats, extra_padding, monkeypatch):
    """Equal groups: every decoding step of every layer goes through shared-prefix attention, with the same greedy
    tokens and logits as a plain call; unequal groups keep the repeated cache."""
    from transformers import GenerationConfig

    import pbsd_trl.kernels.shared_attention as shared_attention
    import pbsd_trl.kernels.shared_prefix as shared_prefix

    tok, model = _tiny_lm(peft=False)
    ids, mask = _repeated_prompt_batch(
        tok, model.config.vocab_size, lengths=[9, 8, 13], repeats=repeats or 2, extra_padding=extra_padding
    )
    if repeats is None:  # prompt 0 once more: groups of 3, 2, 2
        ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    config = GenerationConfig(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    calls = []
    original = shared_attention.shared_prefix_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(shared_attention, "shared_prefix_attention", counting)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    with shared_prefix.shared_prompt_prefill(model, share_attention=True):
        shared = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert model.config._attn_implementation != shared_attention.SHARED_PREFIX_ATTENTION  # restored
    assert torch.equal(plain.sequences, shared.sequences)
    torch.testing.assert_close(torch.stack(shared.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    expected = model.config.num_hidden_layers * config.max_new_tokens if repeats else 0
    assert len(calls) == expected


@pytest.mark.parametrize("problem", ["bypass", "attention sinks"])
def test_generation_falls_back_where_the_model_attention_is_not_plain(monkeypatch, problem):
    """A model that does not attend through transformers' AttentionInterface would see only the completion's keys,
    and one that passes more to attention (e.g. sinks) would have it dropped: the call is redone with the prompt's
    cache repeated per row, with a warning naming why, and draws what a plain call draws."""
    from transformers import AttentionInterface, GenerationConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pbsd_trl.kernels.shared_prefix import shared_prompt_prefill

    tok, model = _tiny_lm(peft=False)
    ids, mask = _repeated_prompt_batch(tok, model.config.vocab_size, lengths=[5, 8], repeats=3)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    get_interface = AttentionInterface.get_interface
    if problem == "bypass":
        patched = lambda self, name, default: sdpa_attention_forward  # noqa: E731
    else:

        def patched(self, name, default):
            function = get_interface(self, name, default)
            return lambda *args, **kwargs: function(*args, **kwargs, s_aux=torch.zeros(1))

    monkeypatch.setattr(AttentionInterface, "get_interface", patched)
    expected = "AttentionInterface" if problem == "bypass" else "passes s_aux"
    with shared_prompt_prefill(model, share_attention=True), pytest.warns(UserWarning, match=expected):
        shared = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(shared, plain)


# decoder-only families (tiny random configs): whether each prompt's cache is attended to once, or the call falls
# back to the plain computation (sliding-window layers, a latent KV cache the model expands after the cache update)
_ARCHITECTURES = {
    "Llama": ("LlamaConfig", {}, True),
    "Mistral": ("MistralConfig", {"sliding_window": None}, True),
    "Mixtral": ("MixtralConfig", {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}, True),
    "Qwen3": ("Qwen3Config", {"head_dim": 8}, True),
    "Qwen3Moe": (
        "Qwen3MoeConfig",
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        True,
    ),
    "Phi3": ("Phi3Config", {}, True),
    "Gemma": ("GemmaConfig", {"head_dim": 8}, True),
    "Gemma2": ("Gemma2Config", {"head_dim": 8}, False),  # sliding-window layers: left to `generate`
    "Olmo2": ("Olmo2Config", {}, True),
    "Cohere": ("CohereConfig", {}, True),
    "GPT2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4}, True),
    "GPTNeoX": ("GPTNeoXConfig", {}, True),
    "Granite": ("GraniteConfig", {}, True),
    "GptOss": ("GptOssConfig", {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2}, False),
    "DeepseekV3": (
        "DeepseekV3Config",
        {
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 6,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        False,  # latent KV cache, expanded after the cache update: falls back with a warning
    ),
}


@pytest.mark.parametrize("name", list(_ARCHITECTURES))
def test_shared_prefix_generation_across_architectures(name, monkeypatch):
    """Greedy samples and logits equal a plain call's for each family, and each prompt's cache is attended to once
    wherever the family allows it."""
    import warnings

    import transformers
    from transformers import GenerationConfig

    import pbsd_trl.kernels.shared_attention as shared_attention
    from pbsd_trl.kernels.shared_prefix import shared_prompt_prefill

    config_class, extra, shares = _ARCHITECTURES[name]
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields.update(intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**fields, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[2, :2] = 0  # left padding
    ids, mask = ids.masked_fill(mask == 0, 0).repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    generation = GenerationConfig(
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    calls = []
    attention = shared_attention.shared_prefix_attention
    monkeypatch.setattr(
        shared_attention, "shared_prefix_attention", lambda *a, **kw: (calls.append(1), attention(*a, **kw))[1]
    )
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    with warnings.catch_warnings(record=True) as caught, shared_prompt_prefill(model, share_attention=True):
        warnings.simplefilter("always")
        shared = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
    assert torch.equal(plain.sequences, shared.sequences)
    torch.testing.assert_close(torch.stack(shared.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    fell_back = [w for w in caught if "Not attending to each prompt's cache once" in str(w.message)]
    if shares:
        assert len(calls) == config.num_hidden_layers * generation.max_new_tokens and not fell_back
    else:
        assert len(calls) <= 1  # never shared, or given up at the first attention call with a warning
        assert bool(fell_back) == (len(calls) == 1)

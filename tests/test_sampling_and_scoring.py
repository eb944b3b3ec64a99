"""The sampling-and-scoring layer (`pbsd_trl.tokens`, `pbsd_trl.sampling`, `pbsd_trl.scoring`) that the trainer, the
teacher-pool build and evaluation share: its scoring against the float64 reference on both of its paths, the sampler's
decoding-step log-probs against that scoring, and the sampler against the `num_return_sequences` call evaluation used
to make."""

import pytest
import torch
from testing_utils import manual_sequence_logps
from transformers import GenerationConfig

import pbsd_trl.kernels.shared_prefix as shared_prefix
from pbsd_trl.kernels.shared_prefix import supports_shared_prefix
from pbsd_trl.logprobs import pad_token_lists
from pbsd_trl.pool import sequence_logps as pool_sequence_logps
from pbsd_trl.recipes.tiny import build_random_model
from pbsd_trl.sampling import HFSampler
from pbsd_trl.scoring import sequence_logps
from pbsd_trl.tokens import cut_after_eos, eos_token_ids, tokenize_prompts


PROMPTS = ["12+7=", "12+7=", "305-18=", "4*9="]  # a repeated prompt: one shared-prefix group of two rows
COMPLETIONS = ["19", "1", "287 so", ""]  # an empty completion scores 0


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_random_model(tokenizer, seed=2).eval()


def batch(tokenizer):
    p_ids, p_mask = pad_token_lists(
        [tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id, "left", "cpu"
    )
    c_ids, c_mask = pad_token_lists(
        [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS],
        tokenizer.pad_token_id,
        "right",
        "cpu",
    )
    return p_ids, p_mask, c_ids, c_mask


@pytest.mark.parametrize("shared_prefix", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logps_equal_the_float64_reference(model, tokenizer, monkeypatch, shared_prefix, temperature):
    assert supports_shared_prefix(model)
    if not shared_prefix:  # the `[prompt ; completion]` path of models the shared prefix does not support
        monkeypatch.setattr("pbsd_trl.scoring.supports_shared_prefix", lambda m: False)
    p_ids, p_mask, c_ids, c_mask = batch(tokenizer)
    score_mask = c_mask.clone()
    score_mask[2, 1:3] = 0  # tokens attended to but not scored (tool results)
    with torch.no_grad():
        reference = manual_sequence_logps(model, p_ids, p_mask, c_ids, c_mask, temperature)
        reference_masked = manual_sequence_logps(model, p_ids, p_mask, c_ids, c_mask, temperature, score_mask)
    full, masked = sequence_logps(
        model,
        p_ids,
        p_mask,
        [(c_ids, c_mask, c_mask), (c_ids, c_mask, score_mask)],
        temperature=temperature,
        batch_size=2,
    )
    torch.testing.assert_close(full.double(), reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(masked.double(), reference_masked, atol=1e-4, rtol=1e-5)
    assert full[3] == 0 and (full - masked).abs()[2] > 1e-3  # the masked tokens were left out, so the check has teeth


def test_the_pools_token_list_scoring_is_the_same_function(model, tokenizer):
    p_ids, p_mask, c_ids, c_mask = batch(tokenizer)
    (tensors,) = sequence_logps(model, p_ids, p_mask, [(c_ids, c_mask, c_mask)], temperature=1.0)
    lists = pool_sequence_logps(
        model,
        [tokenizer(p)["input_ids"] for p in PROMPTS],
        [tokenizer(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS],
        1.0,
        tokenizer.pad_token_id,
        "cpu",
    )
    assert lists == tensors.tolist()


def test_decoding_step_logps_equal_scoring_the_samples(model, tokenizer):
    eos = eos_token_ids(model, tokenizer)
    settings = dict(do_sample=True, temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=12)
    sampler = HFSampler(
        model,
        {**settings, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos},
        pad_token_id=tokenizer.pad_token_id,
        eos_ids=eos,
        device="cpu",
        record_logps_at=0.8,
    )
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS[1:])
    torch.manual_seed(0)
    completions, logps = sampler.sample(prompt_ids, 3)
    assert [len(c) for c in completions] == [3, 3, 3] and logps is not None
    flat_prompts = [ids for ids in prompt_ids for _ in range(3)]
    flat = [ids for group in completions for ids in group]
    assert all(0 < len(ids) <= 12 and ids == cut_after_eos(ids, eos) for ids in flat)
    scored = pool_sequence_logps(model, flat_prompts, flat, 0.8, tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(torch.tensor([x for g in logps for x in g]), torch.tensor(scored), atol=1e-4, rtol=1e-5)


def test_repeated_rows_sample_what_num_return_sequences_samples(model, tokenizer, monkeypatch):
    """Evaluation sampled with `num_return_sequences=k` before it went through [`HFSampler`], which repeats each
    prompt's row k times (and prefills it once): same seed, same samples, so its numbers did not move."""
    eos = eos_token_ids(model, tokenizer)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10)
    kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    prompt_ids = tokenize_prompts(tokenizer, PROMPTS)
    prefills, original = [], shared_prefix.generate_with_shared_prefill
    monkeypatch.setattr(
        shared_prefix, "generate_with_shared_prefill", lambda *a, **kw: prefills.append(1) or original(*a, **kw)
    )
    config = {"generation_config": GenerationConfig(**kwargs)}  # loose settings would skip the shared prefill
    sampler = HFSampler(model, config, pad_token_id=tokenizer.pad_token_id, eos_ids=eos, device="cpu")
    torch.manual_seed(5)
    completions, logps = sampler.sample(prompt_ids, 4)
    monkeypatch.undo()
    assert prefills and logps is None  # each prompt prefilled once; log-probs not asked for
    input_ids, attention_mask = pad_token_lists(prompt_ids, tokenizer.pad_token_id, "left", "cpu")
    torch.manual_seed(5)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=4, **kwargs)
    expected = [cut_after_eos(ids, eos) for ids in out[:, input_ids.size(1) :].tolist()]
    assert [ids for group in completions for ids in group] == expected
    assert len({tuple(ids) for ids in expected}) > 4  # samples, not one repeated completion

"""Shared-prefix teacher scoring equals the full `[prompt ; completion]` forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pbsd_trl.shared_prefix import shared_prefix_token_logps
from pbsd_trl.tiny import build_char_tokenizer, build_random_model


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


@pytest.mark.parametrize("max_rows", [None, 3])
@pytest.mark.parametrize("peft", [False, True])
def test_shared_prefix_equals_full_forward(max_rows, peft):
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = build_random_model(tok, seed=3)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # an adapter that changes the outputs
    model.eval()
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
    got = shared_prefix_token_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7, max_rows)
    expected = full_forward_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 0.7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got[completion_mask == 0] == 0).all() and (got[completion_mask == 1] < 0).all()

"""What GRPOTrainer adds beyond its own objective, kept by PBSDTrainer (`pbsd_trl/grpo_features.py`): MoE router loss,
entropy bonus and mask; also a Gemma-2 soft-capped head scored as the model scores it, and the model card.
"""

import copy

import pytest
import torch
from testing_utils import TEMPLATE, tiny_pbsd_config
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from pbsd_trl.logprobs import concat_prompt_completion, right_pad_to
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_random_model


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=16, seed=0)


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(tmp_path, **{"teacher_prompt_template": TEMPLATE, "max_steps": 2, **kwargs})


def tiny_moe(tokenizer, router_aux_loss_coef=0.5, seed=0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        router_aux_loss_coef=router_aux_loss_coef,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Qwen3MoeForCausalLM(config)


def generation_batch(dataset, num_prompts=2, group=4):
    return [dict(dataset[i]) for i in range(num_prompts) for _ in range(group)]


def reference_aux_loss(model, inputs, pad_id):
    """The model's own `aux_loss` (transformers' forward, output_router_logits=True) on the loss's student batch."""
    student_ids, teacher_ids = inputs["completion_ids"], inputs["teacher_completion_ids"]
    width = max(student_ids.size(1), teacher_ids.size(1))
    ids = torch.cat([right_pad_to(student_ids, width, pad_id), right_pad_to(teacher_ids, width, pad_id)])
    mask = torch.cat(
        [right_pad_to(inputs["completion_mask"], width, 0), right_pad_to(inputs["teacher_completion_mask"], width, 0)]
    )
    input_ids, attention_mask, _ = concat_prompt_completion(
        inputs["prompt_ids"].repeat(2, 1), inputs["prompt_mask"].repeat(2, 1), ids, mask
    )
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True).aux_loss


@pytest.mark.parametrize("fused", [True, False])
def test_moe_router_aux_loss_is_in_the_loss_and_its_gradient(tmp_path, tokenizer, dataset, fused, tiny_trainer):
    model = tiny_moe(tokenizer, router_aux_loss_coef=0.5)
    initial = copy.deepcopy(model)
    with_aux = tiny_trainer(dataset, args=make_args(tmp_path / "a", use_fused_logprob_kernel=fused), model=model)
    without = tiny_trainer(
        dataset,
        args=make_args(tmp_path / "b", use_fused_logprob_kernel=fused, router_aux_loss_coef=0.0),
        model=copy.deepcopy(initial),
    )
    assert with_aux.aux_loss_enabled and with_aux.router_aux_loss_coef == 0.5  # the architecture's own coefficient
    assert not without.aux_loss_enabled

    with_aux.model.train()
    without.model.train()
    inputs = with_aux._generate_and_score_completions(generation_batch(dataset))
    loss_aux = with_aux.compute_loss(with_aux.model, inputs)
    loss_plain = without.compute_loss(without.model, inputs)

    aux = reference_aux_loss(initial, inputs, tokenizer.pad_token_id)
    assert aux.item() > 0.5  # Switch-style loss is ~1 at balance for top-2 of 4: a value that changes the loss
    torch.testing.assert_close((loss_aux - loss_plain).detach(), 0.5 * aux, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(with_aux._metrics["train"]["aux_loss"][-1], aux.item(), atol=1e-5, rtol=1e-4)
    assert "aux_loss" not in without._metrics["train"]

    # The router (gate) weights get the load-balancing gradient on top of the PBSD one
    loss_aux.backward()
    loss_plain.backward()
    gate_aux = with_aux.model.model.layers[0].mlp.gate.weight.grad
    gate_plain = without.model.model.layers[0].mlp.gate.weight.grad
    assert (gate_aux - gate_plain).abs().max() > 1e-4


def test_moe_training_logs_aux_loss(tmp_path, tokenizer, dataset, tiny_trainer):
    trainer = tiny_trainer(dataset, args=make_args(tmp_path), model=tiny_moe(tokenizer))
    trainer.train()
    logged = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
    assert len(logged) == 2 and all(value > 0 for value in logged)


def token_entropies(model, inputs):
    """Reference per-token entropy of the student on its own samples, full logits in float64."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, inputs["prompt_ids"].size(1) - 1 : -1].double()
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def test_entropy_bonus_subtracts_coef_times_student_entropy(tmp_path, tokenizer, dataset, tiny_trainer):
    model = build_random_model(tokenizer, seed=1)
    initial = copy.deepcopy(model)
    bonus = tiny_trainer(dataset, args=make_args(tmp_path / "a", entropy_coef=0.3), model=model)
    plain = tiny_trainer(dataset, args=make_args(tmp_path / "b"), model=copy.deepcopy(initial))
    bonus.model.train()
    plain.model.train()
    inputs = bonus._generate_and_score_completions(generation_batch(dataset))
    loss_bonus = bonus.compute_loss(bonus.model, inputs)
    loss_plain = plain.compute_loss(plain.model, inputs)

    mask = inputs["completion_mask"].double()
    entropy = (token_entropies(initial, inputs) * mask).sum() / mask.sum()
    assert entropy.item() > 0.5  # a random model over ~100 tokens: the bonus has teeth
    torch.testing.assert_close((loss_plain - loss_bonus).double().detach(), 0.3 * entropy, atol=1e-4, rtol=1e-4)
    metrics = bonus._metrics["train"]
    torch.testing.assert_close(metrics["entropy"][-1], entropy.item(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metrics["policy_loss"][-1], loss_plain.item(), atol=1e-5, rtol=1e-5)


def test_adaptive_entropy_trains_and_moves_the_coefficient(tmp_path, tokenizer, dataset, tiny_trainer):
    # Entropy of a random model is far above the target, so the controller lowers the coefficient each step
    args = make_args(
        tmp_path, entropy_coef=0.1, use_adaptive_entropy=True, entropy_target=0.01, entropy_coef_delta=0.02
    )
    trainer = tiny_trainer(dataset, args=args, model=build_random_model(tokenizer, seed=1))
    trainer.train()
    coefs = [log["entropy_coef"] for log in trainer.state.log_history if "entropy_coef" in log]
    assert coefs == pytest.approx([0.08, 0.06])
    assert all("policy_loss" in log and "entropy" in log for log in trainer.state.log_history[:-1])


def test_top_entropy_quantile_keeps_the_loss_and_restricts_the_gradient(tmp_path, tokenizer, dataset, tiny_trainer):
    model = build_random_model(tokenizer, seed=1)
    initial = copy.deepcopy(model)
    masked = tiny_trainer(dataset, args=make_args(tmp_path / "a", top_entropy_quantile=0.0), model=model)
    full = tiny_trainer(dataset, args=make_args(tmp_path / "b"), model=copy.deepcopy(initial))
    masked.model.train()
    full.model.train()
    inputs = masked._generate_and_score_completions(generation_batch(dataset))
    loss_masked = masked.compute_loss(masked.model, inputs)
    loss_full = full.compute_loss(full.model, inputs)
    torch.testing.assert_close(loss_masked, loss_full, atol=1e-5, rtol=1e-5)  # the PBSD loss value is unchanged
    loss_masked.backward()
    loss_full.backward()
    # quantile 0 keeps the gradient of the single highest-entropy token: much smaller than through all tokens
    grad_masked = torch.cat([p.grad.flatten() for p in masked.model.parameters() if p.grad is not None])
    grad_full = torch.cat([p.grad.flatten() for p in full.model.parameters() if p.grad is not None])
    assert 0 < grad_masked.norm() < 0.5 * grad_full.norm()


def test_gemma2_softcapped_head_is_scored_by_the_default_kernel(tmp_path, tokenizer, dataset, tiny_trainer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of several units, so that a cap of 2 bends them
        model.lm_head.weight.mul_(30)
    trainer = tiny_trainer(dataset, args=make_args(tmp_path), model=model)
    assert trainer.args.use_fused_logprob_kernel  # the default on CPU: pbsd-trl's kernel, no refusal
    inputs = trainer._generate_and_score_completions(generation_batch(dataset))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        scored = trainer._sequence_logps(
            trainer.model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
        )
        hidden = trainer.model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        raw = trainer.model.lm_head(hidden)[:, inputs["prompt_ids"].size(1) - 1 : -1].double()
    completion = inputs["completion_ids"].unsqueeze(-1)
    cmask = inputs["completion_mask"]

    def seq_logps(logits):
        return (logits.log_softmax(-1).gather(-1, completion).squeeze(-1) * cmask).sum(-1)

    capped, uncapped = seq_logps(2.0 * torch.tanh(raw / 2.0)), seq_logps(raw)
    assert (capped - uncapped).abs().max() > 1.0  # the cap matters at these logits
    torch.testing.assert_close(scored.double(), capped, atol=1e-4, rtol=1e-4)
    # and the model's own forward (which applies the cap) agrees with the hand-written reference
    with torch.no_grad():
        own = trainer.model(input_ids=ids, attention_mask=mask).logits[:, inputs["prompt_ids"].size(1) - 1 : -1]
    torch.testing.assert_close(seq_logps(own.double()), capped, atol=1e-4, rtol=1e-4)


def test_model_card_names_pbsd_and_cites_it(tmp_path, tokenizer, dataset, tiny_trainer):
    # GRPO writes the card at every checkpoint (and on push_to_hub) from the trainer's class attributes
    trainer = tiny_trainer(dataset, args=make_args(tmp_path), model=build_random_model(tokenizer, seed=1))
    trainer.create_model_card(model_name="tiny-pbsd")
    card = (tmp_path / "README.md").read_text()
    assert "PBSD" in card and "2605.05040" in card and "yu2026pbsd" in card
    assert "pbsd" in card.split("tags:")[1].split("\n---")[0]  # hub tag

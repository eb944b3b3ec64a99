"""How the teacher samples are drawn (`pbsd_trl/teacher/generation.py`): one generation pass for student and teacher
samples equals two passes (greedy decoding: the same samples), a shared prompt prefill draws the same samples, and
teacher log-probs read off the decoding steps equal a scoring pass.
"""

import copy

import pytest
import torch
from peft import LoraConfig
from testing_utils import TEMPLATE, contains_answer, perturb_lora_adapters, tiny_pbsd_config
from trl import GRPOTrainer

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(
        tmp_path,
        **{"teacher_prompt_template": TEMPLATE, "max_steps": 2, "generation_kwargs": {"do_sample": False}, **kwargs},
    )


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    return tok, make_math_dataset("train", n=8, seed=0), build_random_model(tok, seed=1)


def _trainer(tmp_path, setup, peft=None, **config):
    """A trainer on a copy of the fixture's model; with `peft`, a trained-looking adapter, so that student (adapter)
    and base teacher differ."""
    tok, dataset, model = setup
    trainer = PBSDTrainer(
        copy.deepcopy(model),
        contains_answer,
        args=make_args(tmp_path, **config),
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft,
    )
    if peft is not None:
        perturb_lora_adapters(trainer.model)
    return trainer


def _step(trainer, rows):
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(rows)
    loss = trainer.compute_loss(trainer.model, inputs)
    return inputs, loss.detach()


def _completions(ids, mask):
    return [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]


@pytest.mark.parametrize("case", ["live", "samples_from_live", "lora_base", "lora_ema"])
def test_one_pass_equals_two_passes(tmp_path, setup, monkeypatch, case):
    dataset = setup[1]
    kwargs, peft = {}, None
    if case == "live":
        kwargs = dict(teacher_model_kind="live")
    elif case == "samples_from_live":
        kwargs = dict(teacher_samples_from="live")
    else:
        kwargs = dict(teacher_model_kind=case.split("_")[1])
        peft = LORA
    calls = []
    original = GRPOTrainer._generate_single_turn

    def counting(self, prompt_ids, *args, **kw):
        calls.append(len(prompt_ids))
        return original(self, prompt_ids, *args, **kw)

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", counting)
    rows = [dict(dataset[i]) for i in range(2) for _ in range(4)]
    results = []
    for one_pass in (True, False):
        trainer = _trainer(tmp_path, setup, peft, one_generation_pass=one_pass, **kwargs)
        calls.clear()
        inputs, loss = _step(trainer, rows)
        results.append((inputs, loss, list(calls)))
    (a, loss_a, calls_a), (b, loss_b, calls_b) = results
    assert calls_a == [16] and calls_b == [8, 8]  # one generate call over student + teacher rows, against two
    assert _completions(a["completion_ids"], a["completion_mask"]) == _completions(
        b["completion_ids"], b["completion_mask"]
    )
    teacher_a = _completions(a["teacher_completion_ids"], a["teacher_completion_mask"])
    assert teacher_a == _completions(b["teacher_completion_ids"], b["teacher_completion_mask"])
    if case == "lora_base":  # per-row adapters: student rows with the adapter, teacher rows without
        assert _completions(a["completion_ids"], a["completion_mask"]) != teacher_a
    torch.testing.assert_close(
        a["teacher_logps_teacher_samples"], b["teacher_logps_teacher_samples"], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-6)


def test_one_pass_is_not_used_where_weights_differ(tmp_path, setup):
    trainer = _trainer(tmp_path, setup)
    assert trainer._one_pass_mode is None  # full-model student, frozen base copy: two different networks
    trainer = _trainer(tmp_path, setup, teacher_model_kind="ema")
    assert trainer._one_pass_mode is None  # full-model student, a second model as the EMA teacher


@pytest.mark.parametrize("case", ["base", "live", "lora_base"])
def test_shared_prompt_prefill_draws_the_same_samples(tmp_path, setup, monkeypatch, case):
    """Prefilling each distinct prompt once (student, teacher and one-pass `generate` calls): the same samples for
    the same seed, with sampling on, and the same loss."""
    import pbsd_trl.kernels.shared_prefix as shared_prefix

    dataset = setup[1]
    kwargs = {"generation_kwargs": {"do_sample": True}}
    peft = None
    if case == "lora_base":
        peft = LORA
    else:
        kwargs["teacher_model_kind"] = case
    prefilled = []
    original = shared_prefix.generate_with_shared_prefill

    def counting(generate, model, select_rows=None, **kw):
        prefilled.append((kw["input_ids"].size(0), select_rows is not None))
        return original(generate, model, select_rows, **kw)

    monkeypatch.setattr(shared_prefix, "generate_with_shared_prefill", counting)
    rows = [dict(dataset[i]) for i in range(2) for _ in range(4)]
    results = []
    for share in (True, False):
        trainer = _trainer(tmp_path, setup, peft, share_prompt_prefill=share, **kwargs)
        prefilled.clear()
        inputs, loss = _step(trainer, rows)
        results.append((inputs, loss, list(prefilled)))
    (a, loss_a, prefilled_a), (b, loss_b, prefilled_b) = results
    # two calls of 8 rows (student, base teacher), or one of 16 (student + teacher rows, one pass); LoRA one pass
    # with per-row adapter scalings that the prefill follows
    expected = {"base": [(8, False), (8, False)], "live": [(16, False)], "lora_base": [(16, True)]}[case]
    assert prefilled_a == expected and prefilled_b == []
    for key in ("completion", "teacher_completion"):
        assert _completions(a[f"{key}_ids"], a[f"{key}_mask"]) == _completions(b[f"{key}_ids"], b[f"{key}_mask"])
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["live", "lora_base", "lora_ema"])
def test_teacher_logps_from_generation_equal_scoring(tmp_path, setup, monkeypatch, case):
    """Where the one pass samples the teacher rows with the teacher's weights, their teacher log-probs come from the
    decoding logits (one scoring set fewer) and equal a scoring pass over the same samples (sampling on, seed fixed)."""
    dataset = setup[1]
    kwargs = {"generation_kwargs": {"do_sample": True}, "temperature": 0.7}
    peft = None
    if case == "live":
        kwargs["teacher_model_kind"] = "live"
    else:
        kwargs["teacher_model_kind"], peft = case.split("_")[1], LORA
    scored_sets = []
    original = PBSDTrainer._teacher_sequence_logps

    def counting(self, scorer, prompt_ids, prompt_mask, completion_sets, batch_size):
        scored_sets.append(len(completion_sets))
        return original(self, scorer, prompt_ids, prompt_mask, completion_sets, batch_size)

    monkeypatch.setattr(PBSDTrainer, "_teacher_sequence_logps", counting)
    rows = [dict(dataset[i]) for i in range(2) for _ in range(4)]
    results = []
    for from_generation in (None, False):  # None: the default, on for this float32 model
        trainer = _trainer(tmp_path, setup, peft, teacher_logps_from_generation=from_generation, **kwargs)
        assert trainer._teacher_logps_from_generation is (from_generation is None)
        scored_sets.clear()
        inputs, loss = _step(trainer, rows)
        results.append((inputs, loss, list(scored_sets)))
    (a, loss_a, sets_a), (b, loss_b, sets_b) = results
    assert sets_a == [1] and sets_b == [2]  # the student samples only, against both sample sets
    teacher_a = _completions(a["teacher_completion_ids"], a["teacher_completion_mask"])
    assert teacher_a == _completions(b["teacher_completion_ids"], b["teacher_completion_mask"])
    assert len(set(teacher_a)) > 1  # sampled, not one greedy answer repeated
    logps_a, logps_b = a["teacher_logps_teacher_samples"], b["teacher_logps_teacher_samples"]
    assert (logps_b != 0).sum() == len(teacher_a)  # every row carries a teacher sample here
    torch.testing.assert_close(logps_a, logps_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)


def test_teacher_logps_from_generation_only_where_the_samples_are_the_teachers(tmp_path, setup):
    # a base teacher whose samples come from the live weights: the decoding logits are not the teacher's
    trainer = _trainer(tmp_path, setup, teacher_samples_from="live", teacher_logps_from_generation=True)
    assert trainer._one_pass_mode == "shared" and not trainer._teacher_logps_from_generation
    trainer = _trainer(tmp_path, setup, teacher_model_kind="live", one_generation_pass=False)
    assert not trainer._teacher_logps_from_generation  # two calls: the teacher's samples are scored
    tok, dataset, model = setup
    bf16 = PBSDTrainer(
        copy.deepcopy(model).to(torch.bfloat16),
        contains_answer,
        args=make_args(tmp_path, teacher_model_kind="live"),
        train_dataset=dataset,
        processing_class=tok,
    )
    assert bf16._one_pass_mode == "shared" and not bf16._teacher_logps_from_generation  # auto: float32 only


def test_sampled_token_logps_equal_a_full_forward(setup):
    """The recorder against log-softmax of one `[prompt ; completion]` forward, with rows that stop early (EOS) and
    a row cut short by `max_new_tokens`; a completion that does not match what was fed is refused."""
    from pbsd_trl.logprobs import record_sampled_token_logps

    tok, _, model = setup
    model = copy.deepcopy(model).eval()
    prompts = [tok("1+1=")["input_ids"], tok("12*3=")["input_ids"]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts]).repeat_interleave(3, 0)
    attention_mask = (torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]).long()
    attention_mask = attention_mask.repeat_interleave(3, 0)
    eos = tok.eos_token_id
    # the tiny model rarely samples EOS: favour it so that some rows stop early
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 0.3
    handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    torch.manual_seed(0)
    with record_sampled_token_logps(model, temperature=0.8) as recorder:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=0.8,
            top_k=5,  # a logits processor: the recorded log-probs are of the raw logits, as scoring computes them
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
        )
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    assert min(map(len, completions)) < 12 and max(map(len, completions)) == out.size(1) - width
    recorded = recorder.per_row(completions)
    assert recorded is not None and [len(r) for r in recorded] == [len(c) for c in completions]
    with torch.no_grad():
        full = torch.cat([input_ids, out[:, width:]], 1)
        mask = torch.cat([attention_mask, torch.ones_like(out[:, width:])], 1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=full, attention_mask=mask, position_ids=position_ids).logits
        logps = torch.log_softmax(logits[:, width - 1 : -1].float() / 0.8, -1)
    handle.remove()
    for i, completion in enumerate(completions):
        expected = logps[i, : len(completion)].gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(recorded[i]), expected, rtol=1e-5, atol=1e-5)
    bad = [list(c) for c in completions]
    longest = max(range(len(bad)), key=lambda i: len(bad[i]))
    assert len(bad[longest]) >= 2
    bad[longest][0] = (bad[longest][0] + 1) % model.config.vocab_size  # a token fed back to the model: checked
    assert recorder.per_row(bad) is None
    assert recorder.per_row(completions[:-1]) is None

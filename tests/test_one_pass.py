"""One generation pass for student and teacher samples equals two passes (greedy decoding: the same samples)."""

import copy

import pytest
import torch
from peft import LoraConfig
from testing_utils import perturb_lora_adapters, tiny_pbsd_config
from trl import GRPOTrainer

from pbsd_trl import PBSDTrainer
from pbsd_trl.data.math_task import make_math_dataset
from pbsd_trl.tiny import build_char_tokenizer, build_random_model


TEMPLATE = "{prompt} Reference solution: {privileged_context}"


def contains_answer(completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


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
    import pbsd_trl.shared_prefix as shared_prefix

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

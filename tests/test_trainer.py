"""PBSDTrainer on a tiny model: what it scores, with which weights and prompts, and that it trains."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from testing_utils import TEMPLATE, contains_answer, manual_sequence_logps, save_tiny_model, tiny_pbsd_config
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from pbsd_trl import PBSDConfig, PBSDTrainer
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_random_model
from pbsd_trl.teacher.weights import TEACHER_ADAPTER_NAME


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=16, seed=0)


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(tmp_path, **{"teacher_prompt_template": TEMPLATE, **kwargs})


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def generation_batch(dataset, num_prompts=2, group=4):
    return [dict(dataset[i]) for i in range(num_prompts) for _ in range(group)]


@pytest.mark.parametrize("use_peft", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_teacher_scores_with_teacher_prompt_and_weights_student_with_its_own(
    tmp_path, tokenizer, dataset, use_peft, fused
):
    model = build_random_model(tokenizer, seed=1)
    initial = copy.deepcopy(model)
    args = make_args(tmp_path, use_fused_logprob_kernel=fused, gradient_checkpointing=False)
    trainer = PBSDTrainer(
        model,
        contains_answer,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora() if use_peft else None,
    )
    # move the student away from its initial weights so that teacher (= base) and student differ
    with torch.no_grad():
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    trainer.model.train()
    rows = generation_batch(dataset)
    inputs = trainer._generate_and_score_completions(rows)

    # The teacher prompt carries the privileged context; the student prompt does not
    for i, row in enumerate(rows):
        teacher_prompt = tokenizer.decode(inputs["teacher_prompt_ids"][i][inputs["teacher_prompt_mask"][i].bool()])
        student_prompt = tokenizer.decode(inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()])
        assert row["privileged_context"] in teacher_prompt and row["privileged_context"] not in student_prompt
        assert row["prompt"][0]["content"] in teacher_prompt

    # Teacher log-probs: teacher prompt, initial weights, no gradient
    for key, ids, mask in [
        ("teacher_logps_teacher_samples", "teacher_completion_ids", "teacher_completion_mask"),
        ("teacher_logps_student_samples", "completion_ids", "completion_mask"),
    ]:
        assert not inputs[key].requires_grad
        with torch.no_grad():
            expected = manual_sequence_logps(
                initial, inputs["teacher_prompt_ids"], inputs["teacher_prompt_mask"], inputs[ids], inputs[mask]
            )
            with_student_prompt = manual_sequence_logps(
                initial, inputs["prompt_ids"], inputs["prompt_mask"], inputs[ids], inputs[mask]
            )
        torch.testing.assert_close(inputs[key].double(), expected, atol=1e-4, rtol=1e-4)
        assert (expected - with_student_prompt).abs().max() > 1e-2  # the prompt matters, so the check has teeth

    # Student log-probs: student prompt, current weights, with gradient: rebuild the loss by hand
    loss = trainer.compute_loss(trainer.model, inputs)
    student = trainer.model
    pi_s = manual_sequence_logps(
        student, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
    )
    pi_t = manual_sequence_logps(
        student,
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["teacher_completion_ids"],
        inputs["teacher_completion_mask"],
    )
    margins = args.pbsd_beta * (
        (pi_t - inputs["teacher_logps_teacher_samples"]) - (pi_s - inputs["teacher_logps_student_samples"])
    )
    expected_loss = -torch.nn.functional.logsigmoid(margins).mean()
    torch.testing.assert_close(loss.double(), expected_loss.detach(), atol=1e-5, rtol=1e-5)

    loss.backward()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable) and sum(p.grad.abs().sum() for p in trainable) > 0
    if use_peft:
        assert all(p.grad is None for n, p in trainer.model.named_parameters() if "lora_" not in n)
    else:
        assert all(p.grad is None for p in trainer.teacher.model.parameters())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_kernel_and_trl_head_give_the_same_step(tmp_path, tokenizer, dataset, accumulation, tiny_trainer):
    """One PBSD step with pbsd-trl's kernel and with TRL's fused head: same loss, same update. With gradient
    accumulation the generation batch spans several micro-batches, so the kernel's teacher scoring runs in several
    chunks (regression: each chunk entered the same single-use autocast context)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_random_model(tokenizer, seed=3)
        # SGD: the update is the gradient itself (Adam amplifies float noise on near-zero gradients)
        args = make_args(
            tmp_path / str(fused),
            use_fused_logprob_kernel=fused,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            gradient_accumulation_steps=accumulation,
        )
        trainer = tiny_trainer(dataset, args=args, model=model)
        trainer.train()
        results.append(
            (trainer.state.log_history[0]["loss"], [p.detach().clone() for p in trainer.model.parameters()])
        )
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def run_script(trainer_cls, config_cls, model_dir, dataset, output_dir):
    """A user's GRPO script, verbatim but for the two class names."""
    training_args = config_cls(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
    )
    trainer = trainer_cls(model=model_dir, reward_funcs=contains_answer, args=training_args, train_dataset=dataset)
    trainer.train()
    return trainer


def test_swap_in_for_grpo(tmp_path, tokenizer, dataset):
    model_dir = save_tiny_model(tmp_path / "model", tokenizer, seed=2)
    initial = {n: p.clone() for n, p in build_random_model(tokenizer, seed=2).named_parameters()}

    grpo = run_script(GRPOTrainer, GRPOConfig, model_dir, dataset, str(tmp_path / "grpo"))
    assert grpo.state.global_step == 3

    pbsd = run_script(PBSDTrainer, PBSDConfig, model_dir, dataset, str(tmp_path / "pbsd"))
    assert pbsd.state.global_step == 3
    assert pbsd.args.use_fused_logprob_kernel is True  # the device default resolves to pbsd-trl's kernel on CPU
    changed = [n for n, p in pbsd.model.named_parameters() if not torch.equal(p.detach(), initial[n])]
    assert len(changed) == len(initial)
    logged = {k for entry in pbsd.state.log_history for k in entry}
    for key in (
        "loss",
        "pbsd/margin",
        "pbsd/preference_accuracy",
        "pbsd/teacher_reward",
        "pbsd/student_reward",
        "pbsd/log_ratio_teacher_samples",
        "pbsd/teacher_length",
        "rewards/contains_answer/mean",
    ):
        assert key in logged, key
    # Teacher generation stays out of GRPO's completion metrics: they describe the student samples only
    first = pbsd.state.log_history[0]
    assert first["completions/mean_length"] == pytest.approx(first["pbsd/student_length"])


class RecordStudent(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.snapshots = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots.append([p.detach().clone() for p in self.trainer.teacher._student_params])


@pytest.mark.parametrize("use_peft", [False, True])
@pytest.mark.parametrize("kind", ["base", "live", "ema"])
def test_teacher_kinds_train(tmp_path, tokenizer, dataset, kind, use_peft):
    model = build_random_model(tokenizer, seed=4)
    initial = copy.deepcopy(model)
    args = make_args(tmp_path, teacher_model_kind=kind, max_steps=2, teacher_update_rate=0.3)
    trainer = PBSDTrainer(
        model,
        contains_answer,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora() if use_peft else None,
    )
    recorder = None
    if kind == "ema":
        initial_teacher = [p.detach().clone() for p in trainer.teacher._teacher_params]
        recorder = RecordStudent(trainer)
        trainer.add_callback(recorder)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(k.startswith("pbsd/") for k in trainer.state.log_history[0])

    if kind == "base":
        if use_peft:  # the base weights under the adapter never move
            for name, param in trainer.model.get_base_model().named_parameters():
                if "lora_" not in name:
                    torch.testing.assert_close(
                        param, initial.get_parameter(name.replace(".base_layer", "")), atol=0, rtol=0
                    )
        else:
            for a, b in zip(trainer.teacher.model.parameters(), initial.parameters(), strict=True):
                assert torch.equal(a, b)
            # regression: a copy of the student keeps GRPO's patched forward, bound to the *student's* weights
            ids = torch.tensor([[5, 6, 7, 8, 9]])
            with torch.no_grad():
                teacher_logits = trainer.teacher.model(input_ids=ids).logits
                teacher_logps = trainer.teacher.model(input_ids=ids, labels=ids, pbsd_logprobs=True)
                reference = initial(input_ids=ids).logits
                student_logits = trainer.model(input_ids=ids).logits
            torch.testing.assert_close(teacher_logits, reference)
            expected = reference[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            torch.testing.assert_close(teacher_logps, expected, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(student_logits, reference)
    if kind == "ema":
        expected = initial_teacher
        for student in recorder.snapshots:
            expected = [(1 - 0.3) * t + 0.3 * s for t, s in zip(expected, student, strict=True)]
        assert len(recorder.snapshots) == 2
        for actual, value in zip(trainer.teacher._teacher_params, expected, strict=True):
            torch.testing.assert_close(actual.detach(), value, atol=1e-6, rtol=1e-5)
        if use_peft:
            assert TEACHER_ADAPTER_NAME in trainer.model.peft_config
            assert all(not p.requires_grad for p in trainer.teacher._teacher_params)


def test_all_pairing_with_fewer_teacher_samples_matches_full_pair_loss_gradient(
    tmp_path, tokenizer, dataset, tiny_trainer
):
    """`pairing="all"` differentiates each process's samples against a detached partner table: check that the
    gradient equals the one of the plain mean over all G_T × G_S pairs, recomputed from scratch."""
    model = build_random_model(tokenizer, seed=5)
    args = make_args(tmp_path, pairing="all", num_teacher_generations=2, gradient_checkpointing=False)
    trainer = tiny_trainer(dataset, args=args, model=model)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(generation_batch(dataset))
    assert inputs["pbsd_has_teacher"].tolist() == [True, True, False, False] * 2
    assert inputs["pbsd_num_pairs"].item() == 2 * 2 * 4

    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()

    student = trainer.model
    pi_s = manual_sequence_logps(
        student, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
    )
    pi_t = manual_sequence_logps(
        student,
        inputs["prompt_ids"],
        inputs["prompt_mask"],
        inputs["teacher_completion_ids"],
        inputs["teacher_completion_mask"],
    )
    lr_t = pi_t - inputs["teacher_logps_teacher_samples"]
    lr_s = pi_s - inputs["teacher_logps_student_samples"]
    losses = [
        -torch.nn.functional.logsigmoid(args.pbsd_beta * (lr_t[i] - lr_s[j]))
        for i in range(8)
        for j in range(8)
        if inputs["pbsd_has_teacher"][i] and i // 4 == j // 4
    ]
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    expected.backward()
    for actual, reference in zip(grads, (p.grad for p in trainer.model.parameters()), strict=True):
        torch.testing.assert_close(actual.double(), reference.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [
        dict(pairing="union", pair_labels="soft", reward_temperature=0.5),
        dict(pairing="union", pair_labels="reward", tie_policy="role"),
        dict(pairing="all", pair_labels="role", teacher_weighting="tilted", reward_temperature=0.3),
        dict(pairing="union", pair_labels="reward", pbsd_loss_type="kl_regularized_pg"),
    ],
)
def test_reward_aware_pairings_match_the_pair_loss_recomputed_from_scratch(
    tmp_path, tokenizer, dataset, variant, tiny_trainer
):
    """Union pairs (teacher and student samples of a prompt together, ordered by reward) and tilted teacher weights:
    the trainer's loss and gradient equal the weighted mean over the pairs, enumerated and scored from scratch."""
    model = build_random_model(tokenizer, seed=7)
    args = make_args(tmp_path, num_teacher_generations=3, gradient_checkpointing=False, **variant)
    rewards = iter(range(10**6))

    def spread_reward(completions, **kwargs):  # distinct, varied rewards: every pair is informative
        return [float((next(rewards) * 7) % 5) / 4 for _ in completions]

    trainer = tiny_trainer(dataset, spread_reward, args=args, model=model)
    trainer.model.train()
    inputs = trainer._generate_and_score_completions(generation_batch(dataset))
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()

    student = trainer.model
    pi = [
        manual_sequence_logps(student, inputs["prompt_ids"], inputs["prompt_mask"], inputs[ids], inputs[mask])
        for ids, mask in (("completion_ids", "completion_mask"), ("teacher_completion_ids", "teacher_completion_mask"))
    ]
    rho = torch.cat([pi[0] - inputs["teacher_logps_student_samples"], pi[1] - inputs["teacher_logps_teacher_samples"]])
    samples = trainer._pair_table["train"].samples
    reward = samples.reward.tolist()
    valid = [True] * 8 + inputs["pbsd_has_teacher"].tolist()
    tau, beta = args.reward_temperature, args.pbsd_beta
    terms, weights = [], []
    for g in range(2):
        members = [k for k in range(16) if valid[k] and (k % 8) // 4 == g]
        teachers = [k for k in members if k >= 8]
        z = sum(math.exp(reward[k] / tau) for k in teachers)
        for a in members:
            for b in members:
                if args.pbsd_loss_type == "kl_regularized_pg":
                    if a > b and b < a < 8:  # two student samples: ℓ = −sg(R_a − R_b)·(ρ_a − ρ_b)
                        gap = (reward[a] - reward[b]) - beta * (rho[a] - rho[b]).detach()
                        terms.append(-gap * (rho[a] - rho[b]))
                        weights.append(1.0)
                    continue
                if args.pairing == "union" and a > b:
                    gap = reward[a] - reward[b]
                    if args.pair_labels == "soft":
                        p = 1 / (1 + math.exp(-gap / tau))
                    elif gap != 0:
                        p = float(gap > 0)
                    elif a >= 8 > b:  # a tie, teacher first: the role decides
                        p = 1.0
                    else:
                        continue
                    w = 1.0
                elif args.pairing == "all" and a >= 8 > b:
                    p, w = 1.0, len(teachers) * math.exp(reward[a] / tau) / z
                else:
                    continue
                m = beta * (rho[a] - rho[b])
                terms.append(-p * torch.nn.functional.logsigmoid(m) - (1 - p) * torch.nn.functional.logsigmoid(-m))
                weights.append(w)
    weights = torch.tensor(weights, dtype=torch.float64)
    expected = (torch.stack(terms) * weights).sum() / weights.sum()
    assert inputs["pbsd_num_pairs"].item() == pytest.approx(weights.sum().item(), rel=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    expected.backward()
    for actual, reference in zip(grads, (p.grad for p in trainer.model.parameters()), strict=True):
        torch.testing.assert_close(actual.double(), reference.double(), atol=1e-5, rtol=1e-4)
    logged = trainer._metrics["train"]
    assert 0.0 <= logged["pbsd/preference_accuracy"][-1] <= 1.0
    assert not math.isnan(logged["pbsd/weight_reward_corr"][-1])
    assert logged["pbsd/identical_frac"][-1] >= 0.0 and logged["pbsd/tie_frac"][-1] >= 0.0


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_missing_privileged_column_fails_at_construction(tmp_path, tokenizer, dataset, tiny_trainer):
    with pytest.raises(ValueError, match="train_dataset has no privileged-context column 'privileged_context'"):
        tiny_trainer(dataset.remove_columns("privileged_context"), args=make_args(tmp_path))


def test_dataset_given_to_evaluate_is_checked_before_generation(tmp_path, tokenizer, dataset, tiny_trainer):
    trainer = tiny_trainer(dataset, args=make_args(tmp_path, per_device_eval_batch_size=8))
    calls = []
    trainer._generate = lambda *args, **kwargs: calls.append(args)  # must not be reached
    with pytest.raises(ValueError, match="eval_dataset has no privileged-context column 'privileged_context'"):
        trainer.evaluate(eval_dataset=make_math_dataset("eval", n=4).remove_columns("privileged_context"))
    assert not calls
    del trainer._generate
    metrics = trainer.evaluate(eval_dataset=make_math_dataset("eval", n=4))
    assert "eval_pbsd/margin" in metrics


@pytest.mark.parametrize(
    "contexts, error, match",
    [
        (
            lambda rows: [None if i == 5 else r["privileged_context"] for i, r in enumerate(rows)],
            ValueError,
            "train_dataset: Row 5 has an empty privileged context",
        ),
        (
            lambda rows: ["" if i == 5 else r["privileged_context"] for i, r in enumerate(rows)],
            ValueError,
            "train_dataset: Row 5 has an empty",
        ),
        (
            lambda rows: [r["privileged_context"].split(";") for r in rows],
            TypeError,
            "train_dataset: Column 'privileged_context' must hold strings, but row 0 holds a list",
        ),
    ],
)
def test_bad_context_fails_at_construction(tmp_path, tokenizer, dataset, contexts, error, match, tiny_trainer):
    bad = dataset.remove_columns("privileged_context").add_column("privileged_context", contexts(dataset.to_list()))
    with pytest.raises(error, match=match):
        tiny_trainer(bad, args=make_args(tmp_path))


def test_none_context_allowed_when_configured(tmp_path, tokenizer, dataset, tiny_trainer):
    rows = dataset.to_list()
    for row in rows:
        row["privileged_context"] = None
    trainer = tiny_trainer(
        Dataset.from_list(rows), args=make_args(tmp_path, allow_empty_privileged_context=True, max_steps=1)
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_reward_function_with_wrong_length_is_named_before_any_update(tmp_path, tokenizer, dataset, tiny_trainer):
    def short_reward(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    model = build_random_model(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = tiny_trainer(dataset, short_reward, args=make_args(tmp_path), model=model)
    with pytest.raises(ValueError, match="reward function 'short_reward' returned 7 values for 8 completions"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_raising_reward_function_is_named(tmp_path, tokenizer, dataset, tiny_trainer):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    trainer = tiny_trainer(dataset, broken_reward, args=make_args(tmp_path))
    with pytest.raises(RuntimeError, match="reward function 'broken_reward' raised KeyError"):
        trainer.train()


def test_reward_labels_need_reward_functions(tmp_path, tokenizer, dataset, tiny_trainer):
    with pytest.raises(ValueError, match="pair_labels='reward'"):
        tiny_trainer(dataset, None, args=make_args(tmp_path, pair_labels="reward"))


def test_grpo_config_is_rejected_with_a_hint(tmp_path, tokenizer, dataset, tiny_trainer):
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True, report_to=[]
    )
    with pytest.raises(TypeError, match="PBSDConfig"):
        tiny_trainer(dataset, args=args)


def test_role_mode_trains_without_reward_functions_and_eval_works(tmp_path, tokenizer, dataset, tiny_trainer):
    args = make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8)
    trainer = tiny_trainer(dataset, None, args=args, eval_dataset=make_math_dataset("eval", n=4))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals and "eval_pbsd/preference_accuracy" in evals[0]
    assert "pbsd/teacher_reward" not in trainer.state.log_history[0]


def constant_reward(completions, value=1.0, **kwargs):
    return [value] * len(completions)


async def async_constant_reward(completions, **kwargs):
    return [4.0] * len(completions)


def test_reward_callables_of_every_kind_score_both_sample_sets(tmp_path, tokenizer, dataset, tiny_trainer):
    import functools

    from pbsd_trl.rewards import RewardFunction

    class CountingReward(RewardFunction):
        """A stateful class reward: 3.0 for everything, and it counts what it scored."""

        def __init__(self):
            self.scored = 0

        def score(self, prompt, completion, **row):
            self.scored += 1
            return 3.0

    counting = CountingReward()
    reward_funcs = [constant_reward, functools.partial(constant_reward, value=2.0), counting, async_constant_reward]
    args = make_args(tmp_path, max_steps=2, pair_labels="reward")
    trainer = tiny_trainer(dataset, reward_funcs, args=args)
    trainer.train()
    assert trainer.state.global_step == 2
    logs = trainer.state.log_history[0]
    for name, value in zip(trainer.reward_func_names, (1.0, 2.0, 3.0, 4.0), strict=True):
        assert logs[f"rewards/{name}/mean"] == pytest.approx(value), name
    # Teacher samples went through the same four functions (weights 1): their reward is the sum
    assert logs["pbsd/teacher_reward"] == pytest.approx(10.0)
    assert logs["pbsd/student_reward"] == pytest.approx(10.0)
    student_rows = args.per_device_train_batch_size
    teacher_rows = student_rows // args.num_generations * args.num_teacher_generations
    assert counting.scored == 2 * (student_rows + teacher_rows)

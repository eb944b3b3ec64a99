"""TRL's vLLM colocate path, for real: GRPO (the control) and PBSD train 3 steps each with vLLM's engine in the
trainer's process, and after every weight sync the engine's log-probs of a fixed sequence equal the trainer model's
(float32, within 1e-5): the weights that generate are the weights that train, LoRA merges included.

Runs where vLLM is installed (README's test command: vLLM's CPU build in `.venv-vllm`). What the CPU backend needs on
top of TRL and PBSD is in `vllm_support.py`, and only there.
"""

import pytest
import torch
from peft import LoraConfig
from testing_utils import TEMPLATE
from vllm_support import (
    MAX_MODEL_LEN,
    GenerationRecorder,
    PoolEngineProbe,
    WeightSyncProbe,
    cpu_engine_patches,
    make_model_dir,
    reference_logps,
    requires_vllm,
    set_engine_env,
)

from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import load_tokenizer


pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

PROBE_TEXT = "What is 12 + 7? Reference solution: 12 + 7 = 19, so the answer is \\boxed{19}."
STEPS = 3
TOLERANCE = 1e-5  # float32 engine vs float32 trainer; measured ~1e-6
MIN_CHANGE = 1e-3  # an optimizer step moves the probe's log-probs by far more than TOLERANCE


def digit_reward(completions, **kwargs):
    """Varies across a group of random-model samples, so GRPO's advantages (and its updates) are not all zero."""
    return [sum(ch.isdigit() for ch in c[0]["content"]) / 8 for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    set_engine_env()
    return make_model_dir(tmp_path_factory.mktemp("vllm-model"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=16, seed=0)


def common_args(tmp_path, **kwargs):
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=MAX_MODEL_LEN,
    )
    args.update(kwargs)
    return args


def build(trainer_cls, model_dir, tokenizer, **kwargs):
    """The trainer (its vLLM engine included, built with the CPU adjustments), a weight-sync probe, a recorder."""
    with cpu_engine_patches():
        trainer = trainer_cls(model_dir, processing_class=tokenizer, **kwargs)
    probe = WeightSyncProbe(trainer, tokenizer(PROBE_TEXT)["input_ids"])
    return trainer, probe, GenerationRecorder(trainer)


def check_weight_syncs(trainer, probe):
    # One sync per optimizer step, before the step's first generation
    assert len(probe.engine) == STEPS
    errors, changes = probe.max_errors(), probe.changes()
    print(f"after each sync, max |vLLM - trainer| log-prob: {errors}; change between syncs: {changes}")
    assert max(errors) < TOLERANCE, f"vLLM vs trainer log-probs after each sync: {errors}"
    # ...and the weights did move between syncs, so matching after each one is not trivially true
    assert min(changes) > MIN_CHANGE, f"probe log-prob change between syncs: {changes}"
    # The engine holds the weights as the last step left them: generation after the last update uses them
    final = probe.trainer_logps[-1]
    assert not torch.allclose(final, probe.engine[0], atol=MIN_CHANGE)


def check_sampled_logps(recorder):
    errors = [call["logps_error"] for call in recorder.calls]
    print(f"per generation call, max |vLLM - trainer| sampled-token log-prob: {errors}")
    assert max(errors) < TOLERANCE, f"vLLM's sampled-token log-probs vs the trainer model's, per call: {errors}"


def test_grpo_colocate_control(model_dir, tokenizer, dataset, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**common_args(tmp_path))
    trainer, probe, recorder = build(
        GRPOTrainer, model_dir, tokenizer, reward_funcs=digit_reward, args=args, train_dataset=dataset
    )
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert len(recorder.calls) == STEPS  # GRPO: one generation call per step
    check_weight_syncs(trainer, probe)
    check_sampled_logps(recorder)


def pbsd_trainer(model_dir, tokenizer, dataset, tmp_path, **kwargs):
    from pbsd_trl import PBSDConfig, PBSDTrainer

    peft_config = kwargs.pop("peft_config", None)
    args = PBSDConfig(**common_args(tmp_path, teacher_prompt_template=TEMPLATE, **kwargs))
    return build(PBSDTrainer, model_dir, tokenizer, args=args, train_dataset=dataset, peft_config=peft_config)


def check_pbsd_run(trainer, probe, recorder, tokenizer):
    assert trainer.state.global_step == STEPS
    logs = [entry for entry in trainer.state.log_history if "pbsd/margin" in entry]
    assert len(logs) == STEPS and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    # Both sample sets come from vLLM: per step, the student prompts, then the teacher prompts (with the context)
    assert len(recorder.calls) == 2 * STEPS
    for step in range(STEPS):
        student, teacher = recorder.calls[2 * step], recorder.calls[2 * step + 1]
        assert not any("Reference solution" in tokenizer.decode(p) for p in student["prompt_ids"])
        assert all("Reference solution" in tokenizer.decode(p) for p in teacher["prompt_ids"])
        assert len(teacher["completion_ids"]) == len(student["completion_ids"]) == 8
    check_weight_syncs(trainer, probe)
    # Student and teacher samples alike were drawn with the weights being trained
    check_sampled_logps(recorder)


def test_pbsd_colocate_live_teacher(model_dir, tokenizer, dataset, tmp_path):
    trainer, probe, recorder = pbsd_trainer(model_dir, tokenizer, dataset, tmp_path, teacher_model_kind="live")
    trainer.train()
    check_pbsd_run(trainer, probe, recorder, tokenizer)


def test_pbsd_colocate_base_teacher_lora(model_dir, tokenizer, dataset, tmp_path):
    # The paper's setup: a LoRA student whose teacher is the adapter-disabled base model. vLLM holds one set of
    # weights, the merged student's, so teacher samples come from them (`teacher_samples_from="live"`) while the
    # teacher's log-probs stay the base model's.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer, probe, recorder = pbsd_trainer(
        model_dir,
        tokenizer,
        dataset,
        tmp_path,
        teacher_model_kind="base",
        teacher_samples_from="live",
        peft_config=lora,
        learning_rate=5e-2,
    )
    trainer.train()
    check_pbsd_run(trainer, probe, recorder, tokenizer)
    # TRL merged the adapter for each sync and unmerged it after: the engine has the student's merged weights, the
    # trainer's base weights are untouched (the adapter-disabled model is still the initial model)
    assert (probe.engine[-1] - probe.base[-1]).abs().max().item() > MIN_CHANGE
    assert (probe.base[-1] - probe.base[0]).abs().max().item() < TOLERANCE


# ---- the exact base teacher through a teacher pool drawn with vLLM offline ---------------------------------------
POOL_K = 8  # samples per row: more than the G_T=4 a step takes, so the pool's K is its own number
# A stored teacher log-prob is a sum over <= 8 tokens of the fused kernel's float32 log-softmax (padded batch);
# the reference is a plain, unpadded float32 forward with a float64 log-softmax. Per token they differ by float32
# rounding of the logits (~1e-6 for these ~5-nat values); 1e-4 on the sum leaves a 10x margin over 8 tokens.
POOL_LOGP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vllm_pool(model_dir, tokenizer, dataset, tmp_path_factory):
    """The base teacher's pool for `dataset`, drawn with `build_teacher_pool(backend="vllm")` with the settings the
    training run uses; (pool folder, the engine probe of the build, the HF teacher)."""
    from transformers import AutoModelForCausalLM

    from pbsd_trl import PBSDConfig
    from pbsd_trl.pool import build_teacher_pool

    root = tmp_path_factory.mktemp("vllm-pool")
    pool_dir = str(root / "pool")
    args = PBSDConfig(**pool_run_args(root / "run", pool_dir))
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    probe = PoolEngineProbe(teacher)
    with probe.watching():
        build_teacher_pool(
            teacher,
            tokenizer,
            dataset,
            pool_dir,
            args,
            POOL_K,
            batch_size=64,  # 8 prompts x K per engine call: two calls for the 16 rows
            backend="vllm",
            model_name_or_path=model_dir,
            progress=False,
        )
    return pool_dir, probe, teacher


def pool_run_args(tmp_path, pool_dir, **kwargs):
    return common_args(
        tmp_path, teacher_prompt_template=TEMPLATE, teacher_model_kind="base", teacher_pool=pool_dir, **kwargs
    )


def test_pbsd_colocate_base_teacher_from_vllm_pool(model_dir, tokenizer, dataset, vllm_pool, tmp_path):
    from pbsd_trl.pool import load_teacher_pool, row_key

    pool_dir, engine_probe, teacher = vllm_pool
    pool, stamp = load_teacher_pool(pool_dir)
    # The stamp: a finished vLLM build of K samples per row, drawn with the run's sampling settings, in float32
    assert stamp["complete"] and stamp["backend"] == "vllm" and stamp["num_samples"] == POOL_K
    assert stamp["dtype"] == "torch.float32" and stamp["sampling"]["max_completion_length"] == 8
    assert stamp["sampling"]["temperature"] == 1.0
    # Every distinct row of the dataset, once, each with K samples of 1..8 tokens cut after the first EOS
    keys = [row_key(p, c) for p, c in zip(dataset["prompt"], dataset["privileged_context"], strict=True)]
    assert sorted(pool["key"]) == sorted(set(keys)) and stamp["rows"] == len(pool) == len(set(keys))
    eos = tokenizer.eos_token_id
    teacher_prompts = {}
    for record in pool:
        assert keys[record["row"]] == record["key"]
        assert len(record["completion_ids"]) == len(record["teacher_logps"]) == POOL_K
        for ids in record["completion_ids"]:
            assert 1 <= len(ids) <= 8 and eos not in ids[:-1]
        row = dataset[record["row"]]
        # The teacher prompt: the template around the user message, then the chat template (as the trainer builds it)
        (message,) = row["prompt"]
        text = TEMPLATE.format(prompt=message["content"], privileged_context=row["privileged_context"])
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        teacher_prompts[record["key"]] = list(ids["input_ids"])
        assert record["teacher_prompt_length"] == len(teacher_prompts[record["key"]])
    # The engine that drew the samples holds the HF teacher's float32 weights (prompt log-probs of prompt + sample)
    print(f"pool engine vs HF teacher, max |log-prob| gap per checked sample: {max(engine_probe.errors):.2e}")
    assert engine_probe.batches == 2 and len(engine_probe.errors) == len(pool)
    assert max(engine_probe.errors) < TOLERANCE
    # Each stored teacher log-prob is the HF teacher's log-prob of that sample given the teacher prompt
    gaps = []
    for record in pool:
        prompt = teacher_prompts[record["key"]]
        for ids, stored in zip(record["completion_ids"], record["teacher_logps"], strict=True):
            expected = reference_logps(teacher, prompt + list(ids))[-len(ids) :].sum().item()
            gaps.append(abs(stored - expected))
    print(f"stored vs reference teacher log-prob: max gap {max(gaps):.2e} over {len(gaps)} samples")
    assert max(gaps) < POOL_LOGP_TOLERANCE

    # Training: vLLM (colocated) draws the student's samples, the pool the exact base teacher's
    trainer, probe, recorder = pbsd_trainer(
        model_dir, tokenizer, dataset, tmp_path, teacher_model_kind="base", teacher_pool=pool_dir
    )
    stored = {r["key"]: list(zip(map(tuple, r["completion_ids"]), r["teacher_logps"], strict=True)) for r in pool}
    served = []
    draw = trainer._teacher_pool.draw

    def recording_draw(keys, positions, groups):
        ids, logps = draw(keys, positions, groups)
        served.extend(zip(keys, map(tuple, ids), logps, strict=True))
        return ids, logps

    trainer._teacher_pool.draw = recording_draw
    trainer.train()
    assert trainer.state.global_step == STEPS
    logs = [entry for entry in trainer.state.log_history if "pbsd/margin" in entry]
    assert len(logs) == STEPS and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    # vLLM generated the student's samples only: one call per step, no teacher prompt among them
    assert len(recorder.calls) == STEPS
    for call in recorder.calls:
        assert not any("Reference solution" in tokenizer.decode(p) for p in call["prompt_ids"])
        assert len(call["completion_ids"]) == 8
    # ...and every teacher row of every step came from the pool: G_T=4 per prompt, 2 prompts per step, each sample and
    # its log-prob as stored for that prompt, the first visit of a prompt taking its first G_T samples
    assert len(served) == STEPS * 8
    for key, ids, logp in served:
        assert (ids, logp) in stored[key]
    assert {key: [(i, lp) for k, i, lp in served if k == key][:4] for key, _, _ in served} == {
        key: stored[key][:4] for key, _, _ in served
    }
    check_weight_syncs(trainer, probe)
    check_sampled_logps(recorder)


def test_vllm_trainer_refuses_a_pool_it_cannot_use(model_dir, tokenizer, dataset, vllm_pool, tmp_path):
    from pbsd_trl.pool import TeacherPoolError

    pool_dir = vllm_pool[0]
    # Drawn with other sampling settings: refused at construction, naming the field
    with pytest.raises(TeacherPoolError, match=r"sampling\.temperature: pool 1\.0, this run 0\.7"):
        pbsd_trainer(
            model_dir, tokenizer, dataset, tmp_path, teacher_model_kind="base", teacher_pool=pool_dir, temperature=0.7
        )
    # With vLLM the base teacher cannot be sampled online, so rows the pool lacks are refused too (without vLLM they
    # would be sampled online, tests/test_pool.py)
    more = make_math_dataset("train", n=18, seed=0)
    with pytest.raises(TeacherPoolError, match=r"no samples for 2 of the 18 rows of train_dataset \(first: row 16\)"):
        pbsd_trainer(model_dir, tokenizer, more, tmp_path, teacher_model_kind="base", teacher_pool=pool_dir)


def test_evaluation_with_vllm_samples_what_hf_samples(model_dir, tokenizer, dataset):
    """`evaluate_avg_at_k(use_vllm=True)` feeds the engine the prompt ids HF `generate` gets (`pbsd_trl.sampling`):
    greedy completions of the float32 engine and of the HF model agree (a near-tie may flip one of them)."""
    from transformers import AutoModelForCausalLM

    from pbsd_trl.recipes.evaluate import evaluate_avg_at_k
    from pbsd_trl.sampling import load_vllm

    def recorder(calls):
        def reward(completion_ids, **kwargs):
            calls.append([list(ids) for ids in completion_ids])
            return [0.0] * len(completion_ids)

        return reward

    settings = dict(k=2, greedy=True, num_problems=4, max_new_tokens=8, progress_bar=False)
    hf_calls, vllm_calls = [], []
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = evaluate_avg_at_k(model, tokenizer, dataset, recorder(hf_calls), **settings)
    with cpu_engine_patches():
        llm = load_vllm(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, gpu_memory_utilization=0.1)
        engine = evaluate_avg_at_k(
            model_dir, tokenizer, dataset, recorder(vllm_calls), use_vllm=True, llm=llm, **settings
        )
    del llm
    assert engine["n_problems"] == hf["n_problems"] == 4 and engine["k"] == 2
    assert 0 < engine["mean_completion_tokens"] <= 8
    hf_greedy, engine_greedy = hf_calls[0], vllm_calls[0]  # the greedy completions are scored first
    assert len(engine_greedy) == len(hf_greedy) == 4
    assert sum(a == b for a, b in zip(hf_greedy, engine_greedy, strict=True)) >= 3, (hf_greedy, engine_greedy)

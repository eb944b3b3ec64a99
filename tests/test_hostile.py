"""Hostile input: every bad setting, row, tokenizer and checkpoint fails with an error naming it, before any update.

Each test asserts the error type, that the message names the problem (field, dataset row, file) and, where a model
exists, that no parameter changed. The two-process case (a reward function failing on one rank) is at the end.
"""

import json
import os
import sys

import pytest
import torch
from datasets import Dataset, IterableDataset
from testing_utils import TEMPLATE

from pbsd_trl import PBSDConfig, PBSDTrainer
from pbsd_trl.checkpoint import CheckpointError
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model
from pbsd_trl.rewards.validation import check_reward_outputs


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF, NAN = float("inf"), float("nan")


def contains_answer(completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


@pytest.fixture(scope="module")
def rows():
    return make_math_dataset("train", n=8, seed=0).to_list()


def make_args(output_dir, **kwargs):
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=1, learning_rate=1e-2, logging_steps=1, report_to=[], bf16=False, use_cpu=True,
        save_strategy="no", teacher_prompt_template=TEMPLATE, seed=0,
    )  # fmt: skip
    defaults.update(kwargs)
    return PBSDConfig(**defaults)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before, model):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("pbsd_beta", INF, ValueError),
        ("pbsd_beta", -INF, ValueError),
        ("pbsd_beta", NAN, ValueError),
        ("pbsd_beta", 1e30, ValueError),
        ("pbsd_beta", True, TypeError),
        ("teacher_update_rate", NAN, ValueError),
        ("teacher_update_rate", INF, ValueError),
        ("label_smoothing", NAN, ValueError),
        ("label_smoothing", -INF, ValueError),
        ("learning_rate", NAN, ValueError),
        ("learning_rate", INF, ValueError),
        ("learning_rate", -1.0, ValueError),
        ("temperature", 0.0, ValueError),
        ("temperature", NAN, ValueError),
        ("top_p", 0.0, ValueError),
        ("weight_decay", INF, ValueError),
        ("max_grad_norm", NAN, ValueError),  # any NaN, also in a field PBSD does not name
        ("reward_weights", [1.0, NAN], ValueError),
        ("reward_weights", [INF], ValueError),
        ("num_teacher_generations", 4.0, TypeError),
        ("teacher_sync_steps", 1.5, TypeError),
        ("max_teacher_prompt_length", True, TypeError),
        ("length_normalize", "false", TypeError),
        ("allow_empty_privileged_context", "no", TypeError),
        ("use_fused_logprob_kernel", "yes", TypeError),
        ("privileged_context_column", "", TypeError),
        ("privileged_context_column", "prompt", ValueError),
    ],
)
def test_bad_setting_names_the_field(tmp_path, field, value, error):
    with pytest.raises(error, match=f"`{field}`"):
        make_args(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "stale",
    [
        dict(steps_per_generation=2),
        dict(num_iterations=2),
        dict(gradient_accumulation_steps=3, steps_per_generation=2),
    ],
)
def test_all_pairing_with_stale_partners_is_refused(tmp_path, stale):
    """An update between scoring the partner table and using it would make the pairwise gradient inexact."""
    with pytest.raises(ValueError, match="pairing='all'.*gradient_accumulation_steps") as err:
        make_args(tmp_path, pairing="all", num_teacher_generations=2, **stale)
    assert "steps_per_generation" in str(err.value) and "num_iterations" in str(err.value)


@pytest.mark.parametrize(
    "aligned",
    [
        dict(gradient_accumulation_steps=2),
        dict(gradient_accumulation_steps=4, steps_per_generation=2),
        dict(gradient_accumulation_steps=2, num_iterations=2, steps_per_generation=1),
    ],
)
def test_all_pairing_with_one_update_per_generation_is_accepted(tmp_path, aligned):
    args = make_args(tmp_path, pairing="all", num_teacher_generations=2, **aligned)
    assert args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) == 0


def test_teacher_budget_past_vllm_max_model_length(tmp_path):
    pytest.importorskip("vllm")
    with pytest.raises(ValueError, match="vllm_max_model_length"):
        make_args(
            tmp_path,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_max_model_length=64,
            max_teacher_prompt_length=60,
            teacher_samples_from="live",
        )


# ---- rows of map-style datasets, at construction -------------------------------------------------------------------
def _with(rows, index, **changes):
    rows = [dict(r) for r in rows]
    rows[index].update(changes)
    return rows


@pytest.mark.parametrize(
    "change, error, fragments",
    [
        (
            dict(prompt=[{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]),
            ValueError,
            ["Row 3", "must end with a user turn", "'assistant'"],
        ),
        (dict(prompt=""), ValueError, ["Row 3 has an empty prompt"]),
        (dict(prompt="   "), ValueError, ["Row 3 has an empty prompt"]),
        (dict(prompt=[]), ValueError, ["Row 3", "non-empty list of chat messages"]),
        (dict(prompt=[{"role": "user"}]), TypeError, ["Row 3", "message 0 of column 'prompt'", "content None"]),
    ],
)
def test_bad_prompt_shape_fails_at_construction(tmp_path, tokenizer, rows, change, error, fragments):
    """Found before the model is even wrapped, not when the row is sampled after updates."""
    # plain-text and conversational rows cannot share an Arrow column: make all prompts of the kind under test
    kind_rows = (
        rows if isinstance(change["prompt"], list) else [dict(r, prompt=r["prompt"][0]["content"]) for r in rows]
    )
    dataset = Dataset.from_list(_with(kind_rows, 3, **change))
    model = build_random_model(tokenizer)
    before = snapshot(model)
    with pytest.raises(error) as err:
        PBSDTrainer(
            model, contains_answer, args=make_args(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )
    for fragment in ["train_dataset", *fragments]:
        assert fragment in str(err.value), str(err.value)
    assert unchanged(before, model)


def test_missing_prompt_column_fails_at_construction(tmp_path, tokenizer, rows):
    dataset = Dataset.from_list(rows).rename_column("prompt", "question")
    with pytest.raises(ValueError, match="train_dataset has no prompt column 'prompt'"):
        PBSDTrainer(
            build_random_model(tokenizer),
            contains_answer,
            args=make_args(tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_bad_eval_row_names_the_eval_dataset(tmp_path, tokenizer, rows):
    eval_rows = _with(rows, 6, privileged_context="")
    with pytest.raises(ValueError, match=r"eval_dataset\['math'\]: Row 6 has an empty privileged context"):
        PBSDTrainer(
            build_random_model(tokenizer),
            contains_answer,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            eval_dataset={"math": Dataset.from_list(eval_rows)},
            processing_class=tokenizer,
        )


def test_budget_smaller_than_the_student_prompt_names_the_row(tmp_path, tokenizer, rows):
    """Before: the context was dropped entirely and the prompt still exceeded the budget ('cut to fit')."""
    long_prompt = [{"role": "user", "content": "9" * 40 + "+1="}]
    dataset = Dataset.from_list(_with(rows, 5, prompt=long_prompt))
    model = build_random_model(tokenizer)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        PBSDTrainer(
            model,
            contains_answer,
            args=make_args(tmp_path, max_teacher_prompt_length=40),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    message = str(err.value)
    assert "train_dataset: Row 5" in message and "even with an empty privileged context" in message, message
    assert "max_teacher_prompt_length=40" in message
    assert unchanged(before, model)


def test_budget_leaving_no_room_for_the_context_names_the_row(tmp_path, tokenizer, rows):
    """The prompt fits but not one token of context: the teacher would know no more than the student."""

    def count(prompt):
        return len(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )

    budget = max(count([{"role": "user", "content": r["prompt"][0]["content"] + " Reference solution: "}])
                 for r in rows)  # fmt: skip
    with pytest.raises(ValueError, match=r"train_dataset: Row \d+: max_teacher_prompt_length=\d+ leaves no room"):
        PBSDTrainer(
            build_random_model(tokenizer),
            contains_answer,
            args=make_args(tmp_path, max_teacher_prompt_length=budget),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    # accepted when empty contexts are allowed, and then every teacher prompt fits the budget
    trainer = PBSDTrainer(
        build_random_model(tokenizer),
        contains_answer,
        args=make_args(tmp_path, max_teacher_prompt_length=budget, allow_empty_privileged_context=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    prompts = [r["prompt"] for r in rows]
    teacher_prompts, truncated = trainer.teacher_prompts(prompts, rows)
    assert all(truncated) and max(count(p) for p in teacher_prompts) <= budget


def test_teacher_prompt_past_the_model_positions_is_reported_at_construction(tmp_path, tokenizer, rows):
    """A 100k-character context on a 1,024-position model: an error with the numbers, not a 13-minute step."""
    dataset = Dataset.from_list(_with(rows, 4, privileged_context="1+1=2;" * 16_000))
    model = build_random_model(tokenizer)
    before = snapshot(model)
    with pytest.raises(ValueError) as err:
        PBSDTrainer(
            model, contains_answer, args=make_args(tmp_path), train_dataset=dataset, processing_class=tokenizer
        )
    message = str(err.value)
    assert "train_dataset: Row 4" in message and "max_position_embeddings=1024" in message, message
    assert "max_completion_length=8" in message and "1016" in message  # 1024 - 8 tokens are left for the prompt
    assert "max_teacher_prompt_length" in message
    assert unchanged(before, model)
    # with a budget the context is cut instead, and construction succeeds
    PBSDTrainer(
        build_random_model(tokenizer),
        contains_answer,
        args=make_args(tmp_path, max_teacher_prompt_length=500),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def test_budget_past_the_model_positions_is_refused(tmp_path, tokenizer, rows):
    with pytest.raises(ValueError, match=r"`max_teacher_prompt_length` \(1020\) does not fit.*at most 1016"):
        PBSDTrainer(
            build_random_model(tokenizer),
            contains_answer,
            args=make_args(tmp_path, max_teacher_prompt_length=1020),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


def test_tokenizer_without_pad_or_eos_fails_at_construction(tmp_path, rows):
    tokenizer = build_char_tokenizer()
    model = build_random_model(tokenizer)
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        PBSDTrainer(
            model,
            contains_answer,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


# ---- rows of streaming datasets, when they arrive ------------------------------------------------------------------
def _stream(rows):
    def generate():
        yield from rows

    return IterableDataset.from_generator(generate)


@pytest.mark.parametrize(
    "bad_row, error, fragment",
    [
        (lambda r: dict(r, privileged_context=""), ValueError, "Row 2 has an empty privileged context"),
        # a key missing from one row: `datasets` may fill it with None; either way the row, not the dataset, is named
        (
            lambda r: {k: v for k, v in r.items() if k != "privileged_context"},
            (KeyError, ValueError),
            "Row 2 has (no privileged-context column|an empty privileged context \\(column) 'privileged_context'",
        ),
        (
            lambda r: {k: v for k, v in r.items() if k != "prompt"},
            (KeyError, TypeError),
            "Row 2(: column 'prompt' must hold| has no 'prompt')",
        ),
        (lambda r: dict(r, prompt=[{"role": "assistant", "content": "x"}]), ValueError, "Row 2: a conversational"),
        (lambda r: dict(r, privileged_context="7" * 5000), ValueError, "Row 2: its teacher prompt is"),
    ],
)
def test_bad_streaming_row_names_its_dataset_index(tmp_path, tokenizer, rows, bad_row, error, fragment):
    """Dataset row 2 sits at positions 8-11 of the first generation batch (3 prompts × 4): the error says 'Row 2'."""
    stream_rows = [dict(r) for r in rows[:6]]
    stream_rows[2] = bad_row(stream_rows[2])
    model = build_random_model(tokenizer)
    args = make_args(tmp_path, per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = PBSDTrainer(
        model, contains_answer, args=args, train_dataset=_stream(stream_rows), processing_class=tokenizer
    )
    before = snapshot(trainer.model)
    with pytest.raises(error, match=fragment):
        trainer.train()
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)


def test_streaming_rows_train_and_reward_functions_see_the_row_index(tmp_path, tokenizer, rows):
    seen = []

    def reward(completions, pbsd_row_index, **kwargs):
        seen.extend(pbsd_row_index)
        return [0.0] * len(completions)

    args = make_args(tmp_path, per_device_train_batch_size=8, shuffle_dataset=False)
    stream, eval_stream = _stream(rows), _stream(rows[:2])
    trainer = PBSDTrainer(
        build_random_model(tokenizer),
        reward,
        args=args,
        train_dataset=stream,
        eval_dataset={"a": eval_stream},
        processing_class=tokenizer,
    )
    # the row index is added in the data loaders: the trainer holds the user's datasets, as GRPOTrainer does
    assert trainer.train_dataset is stream and trainer.eval_dataset["a"] is eval_stream
    trainer.train()
    assert trainer.state.global_step == 1
    assert sorted(set(seen)) == [0, 1]  # the first generation batch: dataset rows 0 and 1, 4 samples each
    assert trainer.train_dataset is stream


# ---- rewards ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [INF, -INF])
def test_infinite_reward_names_the_function_and_index(value):
    with pytest.raises(ValueError, match=r"reward function 'r' returned -?inf at index 1; rewards must be finite"):
        check_reward_outputs("r", [0.0, value, None], 3)
    assert check_reward_outputs("r", [0.0, NAN, None], 3)[2] is None  # NaN and None still mean "no reward"


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One step of a full-model EMA run, saved: model.safetensors, optimizer.pt, pbsd_teacher_state.pt, …"""
    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from common import build_trainer, make_model_dir

    base = tmp_path_factory.mktemp("hostile_checkpoint")
    model_dir = make_model_dir(str(base / "model"), tied=False)
    trainer = build_trainer(
        model_dir, str(base / "run"), 8, "ema", peft=False, max_steps=1, save_strategy="steps", save_steps=1
    )
    trainer.train()
    return model_dir, str(base / "run" / "checkpoint-1")


def _copy(checkpoint, tmp_path):
    import shutil

    target = str(tmp_path / "checkpoint-1")
    shutil.copytree(checkpoint, target)
    return target


def _resume(model_dir, tmp_path, folder, error, kind="ema", peft=False):
    from common import build_trainer

    trainer = build_trainer(model_dir, str(tmp_path / "resumed"), 8, kind, peft=peft, max_steps=2)
    before = snapshot(trainer.model)
    with pytest.raises(error) as err:
        trainer.train(resume_from_checkpoint=folder)
    assert trainer.state.global_step == 0 and unchanged(before, trainer.model)
    return str(err.value)


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pbsd_teacher_state.pt", "model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_truncated_checkpoint_file_is_named(checkpoint, tmp_path, name):
    model_dir, source = checkpoint
    folder = _copy(source, tmp_path)
    _truncate(os.path.join(folder, name))
    message = _resume(model_dir, tmp_path, folder, CheckpointError)
    assert os.path.join(folder, name) in message and "corrupt or truncated" in message, message
    assert "earlier checkpoint" in message


@pytest.mark.slow
def test_checkpoint_of_another_teacher_kind_is_refused(checkpoint, tmp_path):
    model_dir, source = checkpoint
    message = _resume(model_dir, tmp_path, source, CheckpointError, kind="base")
    assert "pbsd_checkpoint.json" in message and "teacher_model_kind='ema'" in message and "'base'" in message, message
    assert "drop the checkpoint's EMA teacher" in message


@pytest.mark.slow
def test_checkpoint_of_a_full_model_resumed_with_peft_is_refused(checkpoint, tmp_path):
    model_dir, source = checkpoint
    message = _resume(model_dir, tmp_path, source, CheckpointError, peft=True)
    assert "pbsd_checkpoint.json" in message and "full model weights" in message and "PEFT" in message, message


@pytest.mark.slow
def test_checkpoint_without_info_file_is_judged_by_its_files(checkpoint, tmp_path):
    """Older checkpoints have no pbsd_checkpoint.json: the EMA state file and the weights files tell."""
    model_dir, source = checkpoint
    folder = _copy(source, tmp_path)
    os.remove(os.path.join(folder, "pbsd_checkpoint.json"))
    assert "drop the checkpoint's EMA teacher" in _resume(model_dir, tmp_path, folder, CheckpointError, kind="base")
    assert "full model weights" in _resume(model_dir, tmp_path, folder, CheckpointError, peft=True)


@pytest.mark.slow
def test_teacher_state_of_another_model_names_the_file(checkpoint, tmp_path):
    model_dir, source = checkpoint
    folder = _copy(source, tmp_path)
    path = os.path.join(folder, "pbsd_teacher_state.pt")
    state = torch.load(path, weights_only=True)
    state["teacher.0"] = torch.zeros(3, 3)
    torch.save(state, path)
    message = _resume(model_dir, tmp_path, folder, ValueError)
    assert path in message and "EMA teacher tensor 0 has shape (3, 3)" in message, message
    state.pop("teacher.0")
    torch.save(state, path)
    assert "does not hold this model's EMA teacher" in _resume(model_dir, tmp_path, folder, ValueError)


@pytest.mark.slow
def test_intact_checkpoint_still_resumes(checkpoint, tmp_path):
    from common import build_trainer

    model_dir, source = checkpoint
    with open(os.path.join(source, "pbsd_checkpoint.json")) as f:
        info = json.load(f)
    assert info == {"teacher_model_kind": "ema", "peft": False}
    trainer = build_trainer(model_dir, str(tmp_path / "resumed"), 8, "ema", peft=False, max_steps=2)
    trainer.train(resume_from_checkpoint=source)
    assert trainer.state.global_step == 2


# ---- a reward function failing on one of two processes -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_reward_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """Rank 1's reward function raises; both ranks must raise the same named error, promptly, before any update."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
    from common import make_model_dir
    from launch import accelerate_launch, failure_report

    model_dir = make_model_dir(str(tmp_path / "model"), tied=False)
    rc, output, _ = accelerate_launch(
        "examples/accelerate_configs/multi_gpu.yaml", "run_reward_failure.py", "--model-dir", model_dir,
        "--out", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert rc == 0, failure_report(output)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["type"] == "RuntimeError", report
        assert "reward function 'exploding_reward' raised ValueError: boom on rank 1" in report["message"], report
        assert "on process 1 of 2" in report["message"], report
        assert report["params_unchanged"] and report["global_step"] == 0, report
    assert reports[0]["message"] == reports[1]["message"]
    # no rank waited for a collective timeout (gloo's default is 30 minutes)
    assert max(r["seconds_to_error"] for r in reports) < 120, reports

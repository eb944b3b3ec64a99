"""The checks `PBSDTrainer` runs on its datasets and tokenizer (`pbsd_trl/trainer_checks.py`, with the row checks of
`pbsd_trl/teacher/prompts.py` it applies): every bad row of a map-style dataset and every bad tokenizer fails at
construction with an error naming it, and every bad row of a streaming dataset when it arrives, before any update.

Each test asserts the error type, that the message names the problem (dataset, row, column) and, where a model exists,
that no parameter changed. One definition of an empty privileged context holds at construction and in streaming.
"""

import pytest
from datasets import Dataset, IterableDataset
from testing_utils import (
    INVISIBLE_CONTEXTS,
    TEMPLATE,
    contains_answer,
    params_snapshot,
    params_unchanged,
    tiny_pbsd_config,
)

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model


@pytest.fixture(scope="module")
def rows():
    return make_math_dataset("train", n=8, seed=0).to_list()


def make_args(output_dir, **kwargs):
    return tiny_pbsd_config(output_dir, **{"teacher_prompt_template": TEMPLATE, "max_steps": 1, **kwargs})


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
def test_bad_prompt_shape_fails_at_construction(tmp_path, tokenizer, rows, change, error, fragments, tiny_trainer):
    """Found before the model is even wrapped, not when the row is sampled after updates."""
    # plain-text and conversational rows cannot share an Arrow column: make all prompts of the kind under test
    kind_rows = (
        rows if isinstance(change["prompt"], list) else [dict(r, prompt=r["prompt"][0]["content"]) for r in rows]
    )
    dataset = Dataset.from_list(_with(kind_rows, 3, **change))
    model = build_random_model(tokenizer)
    before = params_snapshot(model)
    with pytest.raises(error) as err:
        tiny_trainer(dataset, args=make_args(tmp_path), model=model)
    for fragment in ["train_dataset", *fragments]:
        assert fragment in str(err.value), str(err.value)
    assert params_unchanged(before, model)


def test_missing_prompt_column_fails_at_construction(tmp_path, tokenizer, rows, tiny_trainer):
    dataset = Dataset.from_list(rows).rename_column("prompt", "question")
    with pytest.raises(ValueError, match="train_dataset has no prompt column 'prompt'"):
        tiny_trainer(dataset, args=make_args(tmp_path))


def test_bad_eval_row_names_the_eval_dataset(tmp_path, tokenizer, rows, tiny_trainer):
    eval_rows = _with(rows, 6, privileged_context="")
    with pytest.raises(ValueError, match=r"eval_dataset\['math'\]: Row 6 has an empty privileged context"):
        tiny_trainer(
            Dataset.from_list(rows), args=make_args(tmp_path), eval_dataset={"math": Dataset.from_list(eval_rows)}
        )


def test_budget_smaller_than_the_student_prompt_names_the_row(tmp_path, tokenizer, rows, tiny_trainer):
    """Before: the context was dropped entirely and the prompt still exceeded the budget ('cut to fit')."""
    long_prompt = [{"role": "user", "content": "9" * 40 + "+1="}]
    dataset = Dataset.from_list(_with(rows, 5, prompt=long_prompt))
    model = build_random_model(tokenizer)
    before = params_snapshot(model)
    with pytest.raises(ValueError) as err:
        tiny_trainer(dataset, args=make_args(tmp_path, max_teacher_prompt_length=40), model=model)
    message = str(err.value)
    assert "train_dataset: Row 5" in message and "even with an empty privileged context" in message, message
    assert "max_teacher_prompt_length=40" in message
    assert params_unchanged(before, model)


def test_budget_leaving_no_room_for_the_context_names_the_row(tmp_path, tokenizer, rows, tiny_trainer):
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
        tiny_trainer(Dataset.from_list(rows), args=make_args(tmp_path, max_teacher_prompt_length=budget))
    # accepted when empty contexts are allowed, and then every teacher prompt fits the budget
    trainer = tiny_trainer(
        Dataset.from_list(rows),
        args=make_args(tmp_path, max_teacher_prompt_length=budget, allow_empty_privileged_context=True),
    )
    prompts = [r["prompt"] for r in rows]
    teacher_prompts, truncated = trainer.teacher_prompts(prompts, rows)
    assert all(truncated) and max(count(p) for p in teacher_prompts) <= budget


def test_teacher_prompt_past_the_model_positions_is_reported_at_construction(tmp_path, tokenizer, rows, tiny_trainer):
    """A 100k-character context on a 1,024-position model: an error with the numbers, not a 13-minute step."""
    dataset = Dataset.from_list(_with(rows, 4, privileged_context="1+1=2;" * 16_000))
    model = build_random_model(tokenizer)
    before = params_snapshot(model)
    with pytest.raises(ValueError) as err:
        tiny_trainer(dataset, args=make_args(tmp_path), model=model)
    message = str(err.value)
    assert "train_dataset: Row 4" in message and "max_position_embeddings=1024" in message, message
    assert "max_completion_length=8" in message and "1016" in message  # 1024 - 8 tokens are left for the prompt
    assert "max_teacher_prompt_length" in message
    assert params_unchanged(before, model)
    # with a budget the context is cut instead, and construction succeeds
    tiny_trainer(dataset, args=make_args(tmp_path, max_teacher_prompt_length=500))


def test_budget_past_the_model_positions_is_refused(tmp_path, tokenizer, rows, tiny_trainer):
    with pytest.raises(ValueError, match=r"`max_teacher_prompt_length` \(1020\) does not fit.*at most 1016"):
        tiny_trainer(Dataset.from_list(rows), args=make_args(tmp_path, max_teacher_prompt_length=1020))


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
def test_bad_streaming_row_names_its_dataset_index(tmp_path, tokenizer, rows, bad_row, error, fragment, tiny_trainer):
    """Dataset row 2 sits at positions 8-11 of the first generation batch (3 prompts × 4): the error says 'Row 2'."""
    stream_rows = [dict(r) for r in rows[:6]]
    stream_rows[2] = bad_row(stream_rows[2])
    model = build_random_model(tokenizer)
    args = make_args(tmp_path, per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = tiny_trainer(_stream(stream_rows), args=args, model=model)
    before = params_snapshot(trainer.model)
    with pytest.raises(error, match=fragment):
        trainer.train()
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)


def test_streaming_rows_train_and_reward_functions_see_the_row_index(tmp_path, tokenizer, rows, tiny_trainer):
    seen = []

    def reward(completions, pbsd_row_index, **kwargs):
        seen.extend(pbsd_row_index)
        return [0.0] * len(completions)

    args = make_args(tmp_path, per_device_train_batch_size=8, shuffle_dataset=False)
    stream, eval_stream = _stream(rows), _stream(rows[:2])
    trainer = tiny_trainer(stream, reward, args=args, eval_dataset={"a": eval_stream})
    # the row index is added in the data loaders: the trainer holds the user's datasets, as GRPOTrainer does
    assert trainer.train_dataset is stream and trainer.eval_dataset["a"] is eval_stream
    trainer.train()
    assert trainer.state.global_step == 1
    assert sorted(set(seen)) == [0, 1]  # the first generation batch: dataset rows 0 and 1, 4 samples each
    assert trainer.train_dataset is stream


# ---- one definition of an empty context, at construction and in streaming -----------------------------------------
@pytest.mark.parametrize("context", INVISIBLE_CONTEXTS)
def test_invisible_context_is_empty_at_construction_and_in_streaming(tmp_path, tokenizer, context, tiny_trainer):
    rows = make_math_dataset("train", n=6, seed=0).to_list()
    rows[2]["privileged_context"] = context
    with pytest.raises(ValueError, match="train_dataset: Row 2 has an empty privileged context"):
        tiny_trainer(Dataset.from_list(rows), args=make_args(tmp_path / "out"))
    args = make_args(tmp_path / "out", per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = tiny_trainer(_stream(rows), args=args)
    before = params_snapshot(trainer.model)
    with pytest.raises(ValueError, match="Row 2 has an empty privileged context"):
        trainer.train()
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)


def test_context_with_a_visible_character_among_invisible_ones_is_kept(tmp_path, tokenizer, tiny_trainer):
    rows = make_math_dataset("train", n=2, seed=0).to_list()
    rows[0]["privileged_context"] = "\u200b\x1b[1m7\x1b[0m"
    trainer = tiny_trainer(Dataset.from_list(rows), args=make_args(tmp_path / "out"))
    assert trainer.teacher_prompts.contexts(rows) == [r["privileged_context"] for r in rows]


# ---- unencodable strings in streamed rows --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "column, value, fragment",
    [
        ("privileged_context", "12+30=\udc80", "Row 2: column 'privileged_context' holds '\\\\udc80' at character 6"),
        ("prompt", [{"role": "user", "content": "What is \ud800?"}], "Row 2: message 0 of column 'prompt' holds"),
    ],
)
def test_streamed_row_with_a_lone_surrogate_names_row_and_column(
    tmp_path, tokenizer, column, value, fragment, tiny_trainer
):
    rows = make_math_dataset("train", n=6, seed=0).to_list()
    rows[2][column] = value
    args = make_args(tmp_path / "out", per_device_train_batch_size=12, shuffle_dataset=False)
    trainer = tiny_trainer(_stream(rows), args=args)
    before = params_snapshot(trainer.model)
    with pytest.raises(ValueError, match=fragment) as err:
        trainer.train()
    assert "no UTF-8 form" in str(err.value)
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)

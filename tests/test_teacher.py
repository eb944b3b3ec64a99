"""The teacher collator: teacher prompts, context validation, and the never-cut-the-student-prompt rule."""

import pytest
from testing_utils import TEMPLATE

from pbsd_trl.recipes.tiny import build_char_tokenizer
from pbsd_trl.teacher.prompts import (
    ROW_INDEX_COLUMN,
    TeacherPromptBuilder,
    check_privileged_context,
    compose_teacher_prompt,
)


def test_plain_text_prompt():
    assert compose_teacher_prompt("2+2=", "#### 4", TEMPLATE) == "2+2= Reference solution: #### 4"


def test_conversational_prompt_changes_only_the_last_user_turn():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2="}]},
    ]
    teacher = compose_teacher_prompt(prompt, "#### 4", TEMPLATE)
    assert teacher[:3] == prompt[:3]
    assert teacher[3] == {"role": "user", "content": "2+2= Reference solution: #### 4"}
    assert prompt[3]["content"][0]["text"] == "2+"  # the student prompt is untouched


def test_conversational_prompt_must_end_with_user():
    with pytest.raises(ValueError, match="must end with a user turn"):
        compose_teacher_prompt([{"role": "assistant", "content": "x"}], "c", TEMPLATE)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_context_is_an_error_naming_row_and_column(value):
    with pytest.raises(ValueError, match="Row 3 has an empty privileged context \\(column 'solution'"):
        check_privileged_context(value, "solution", 3, allow_empty=False)


def test_empty_context_allowed_when_asked():
    assert check_privileged_context(None, "c", 0, allow_empty=True) == ""


@pytest.mark.parametrize("value", [["step 1", "step 2"], 42, {"a": 1}])
def test_non_string_context_is_a_type_error(value):
    with pytest.raises(TypeError, match="Column 'privileged_context' must hold strings, but row 1 holds"):
        check_privileged_context(value, "privileged_context", 1, allow_empty=False)


def test_missing_column_names_the_column():
    builder = TeacherPromptBuilder(TEMPLATE, "solution")
    with pytest.raises(KeyError, match="no privileged-context column 'solution'"):
        builder(["1+1="], [{"prompt": "1+1=", "answer": "2"}])


@pytest.mark.parametrize("conversational", [False, True])
def test_long_context_never_truncates_the_student_prompt(conversational):
    tokenizer = build_char_tokenizer()

    def count_tokens(prompts):
        if conversational:
            return [
                len(
                    tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                        "input_ids"
                    ]
                )
                for p in prompts
            ]
        return [len(tokenizer(p)["input_ids"]) for p in prompts]

    builder = TeacherPromptBuilder(
        TEMPLATE,
        "privileged_context",
        max_length=85,
        count_tokens=count_tokens,
        encode=lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
        decode=tokenizer.decode,
    )
    question = "Q" * 50  # the prompt alone takes most of the budget
    prompt = [{"role": "user", "content": question}] if conversational else question
    rows = [{"privileged_context": "S" * 5000}, {"privileged_context": "short"}]
    teacher_prompts, truncated = builder([prompt, prompt], rows)
    assert truncated == [True, False]
    text = teacher_prompts[0][-1]["content"] if conversational else teacher_prompts[0]
    assert text.startswith(question + " Reference solution: ")
    kept = text[len(question + " Reference solution: ") :]
    assert 0 < len(kept) < 5000 and set(kept) == {"S"}
    assert count_tokens([teacher_prompts[0]])[0] <= 85  # the longest prefix that fits ...
    longer = compose_teacher_prompt(prompt, "S" * (len(kept) + 1), TEMPLATE)
    assert count_tokens([longer])[0] > 85  # ... and not one token less


def _budget_builder(max_length, allow_empty=False):
    tokenizer = build_char_tokenizer()
    return TeacherPromptBuilder(
        TEMPLATE,
        "c",
        allow_empty=allow_empty,
        max_length=max_length,
        count_tokens=lambda prompts: [len(tokenizer(p)["input_ids"]) for p in prompts],
        encode=lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
        decode=tokenizer.decode,
    )


def test_budget_that_cannot_hold_the_student_prompt_names_the_row():
    """Never cut the student prompt, and never pretend the context was "cut to fit" when the prompt alone is too long."""
    builder = _budget_builder(max_length=30)
    rows = [{"c": "x" * 10_000}, {"c": "x" * 10_000, ROW_INDEX_COLUMN: 7}]
    with pytest.raises(
        ValueError,
        match=r"Row 7: its teacher prompt takes 42 tokens even with an empty privileged "
        r"context, more than max_teacher_prompt_length=30",
    ):
        builder(["1", "a long student prompt"], rows)


def test_budget_that_leaves_no_context_is_an_empty_context():
    prompt = "a long student prompt"
    bare = len(prompt + " Reference solution: ")
    with pytest.raises(
        ValueError,
        match=f"Row 0 of the generation batch: max_teacher_prompt_length={bare} leaves no room for its privileged",
    ):
        _budget_builder(max_length=bare)([prompt], [{"c": "x" * 100}])
    (teacher_prompt,), truncated = _budget_builder(max_length=bare, allow_empty=True)([prompt], [{"c": "x" * 100}])
    assert truncated == [True] and teacher_prompt == prompt + " Reference solution: "
    (teacher_prompt,), _ = _budget_builder(max_length=bare + 1)([prompt], [{"c": "x" * 100}])
    assert teacher_prompt == prompt + " Reference solution: x"


def test_key_missing_from_one_row_names_that_row():
    builder = TeacherPromptBuilder(TEMPLATE, "solution")
    rows = [{"solution": "s", ROW_INDEX_COLUMN: 40}, {"answer": "2", ROW_INDEX_COLUMN: 41}]
    with pytest.raises(KeyError, match="Row 41 has no privileged-context column 'solution'"):
        builder(["1+1=", "1+2="], rows)


def test_teacher_prompt_past_the_position_limit_names_the_row_and_numbers():
    tokenizer = build_char_tokenizer()
    builder = TeacherPromptBuilder(
        TEMPLATE,
        "c",
        count_tokens=lambda ps: [len(tokenizer(p)["input_ids"]) for p in ps],
        position_limit=(50, "the model's 64 positions"),
    )
    builder(["q"], [{"c": "x" * 20}])  # fits
    with pytest.raises(
        ValueError,
        match="Row 3: its teacher prompt is 122 tokens, more than the 50 that fit in the model's 64 positions",
    ):
        builder(["q"], [{"c": "x" * 100}], indices=[3])


@pytest.mark.parametrize("conversational", [False, True])
def test_rows_cleared_without_tokenizing_really_fit(conversational):
    """`surely_fit` lets construction skip tokenizing rows far below the limits: it must never clear one that is over."""
    tokenizer = build_char_tokenizer()

    def count_tokens(prompts):
        if conversational:
            return [
                len(
                    tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)[
                        "input_ids"
                    ]
                )
                for p in prompts
            ]
        return [len(tokenizer(p)["input_ids"]) for p in prompts]

    builder = TeacherPromptBuilder(TEMPLATE, "c", count_tokens=count_tokens, position_limit=(60, "60 positions"))
    prompts, contexts = [], []
    for n in range(0, 60, 3):
        text = "q" * (1 + n // 2)
        prompts.append(
            [{"role": "system", "content": "s"}, {"role": "user", "content": text}] if conversational else text
        )
        contexts.append("x" * n)
    cleared = builder.surely_fit(prompts, contexts)
    exact = count_tokens([compose_teacher_prompt(p, c, TEMPLATE) for p, c in zip(prompts, contexts, strict=False)])
    assert any(cleared) and not all(cleared)
    assert all(length <= 60 for length, ok in zip(exact, cleared, strict=False) if ok)
    assert any(length > 60 for length in exact)

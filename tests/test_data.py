import json
import random
import re

import pytest

from pbsd_trl.recipes.data.math_task import (
    DIFFICULTIES,
    MATH_TEACHER_TEMPLATE,
    OPERATION_CODES,
    eval_problems,
    make_math_dataset,
    math_completion,
    math_hint,
    math_solution,
    parse_final_answer,
    problem_text,
    sample_problem,
    valid_operations,
)
from pbsd_trl.recipes.data.tool_task import (
    TOOL_TEACHER_TEMPLATE,
    TOOLS,
    make_tool_dataset,
    sample_tool_example,
    tool_call,
    tool_completion,
)
from pbsd_trl.recipes.tiny import sft
from pbsd_trl.rewards import parse_tool_calls, tool_call_reward


def _texts(dataset):
    return [p[0]["content"] if isinstance(p, list) else p for p in dataset["prompt"]]


# ------------------------------------------------------------------ math


def test_math_solution_examples():
    assert math_solution(347, "+", 589) == "7+9+0=16>6;4+8+1=13>36;3+5+1=9>936;#### 936"
    assert math_solution(523, "-", 187) == "13-7-0=6>6;12-8-1=3>36;5-1-1=3>336;#### 336"
    assert math_solution(347, "*", 6) == "7*6+0=42>2;4*6+4=28>82;3*6+2=20>082;2>2082;#### 2082"
    assert math_solution(947, "+", 589).endswith(";1>1536;#### 1536")
    assert math_solution(100, "-", 99).endswith("#### 1")
    with pytest.raises(ValueError):
        math_solution(3, "-", 5)
    with pytest.raises(ValueError):
        math_solution(3, "*", 12)


def test_math_prompt_completion_and_hint():
    assert problem_text(347, "+", 589) == "347$589=" and problem_text(523, "-", 187) == "523@187="
    assert problem_text(347, "*", 6) == "347&6="
    assert math_completion(347, "+", 589) == "347+589: 7+9+0=16>6;4+8+1=13>36;3+5+1=9>936;#### 936"
    # the hint is the method and the first step, never the answer
    assert math_hint(347, "+", 589) == "347+589 from the right; first step 7+9+0=16>6"
    assert math_hint(523, "-", 187) == "523-187 from the right; first step 13-7-0=6>6"
    assert math_hint(347, "*", 6) == "347*6 from the right; first step 7*6+0=42>2"
    assert valid_operations(347, 589) == ("+",) and valid_operations(589, 347) == ("+", "-")
    assert valid_operations(347, 6) == ("+", "-", "*")


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_math_solutions_are_correct(difficulty):
    rng = random.Random(0)
    lo, hi = DIFFICULTIES[difficulty]
    for _ in range(3000):
        a, op, b = sample_problem(rng, difficulty)
        assert lo <= len(str(a)) <= hi
        assert 2 <= b <= 9 or op != "*" and lo <= len(str(b)) <= hi
        assert op in valid_operations(a, b) and (op == "*" or a >= b)  # the operands do not tell + from -
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert expected >= 0
        solution = math_solution(a, op, b)
        assert parse_final_answer(solution) == str(expected)
        assert solution.count("####") == 1


def test_math_dataset_schema_and_determinism():
    ds = make_math_dataset("train", n=50, seed=3)
    assert ds.column_names == ["prompt", "privileged_context", "answer"]
    for row in ds:
        text = row["prompt"][0]["content"]
        assert row["prompt"][0]["role"] == "user" and text.endswith("=")
        assert not set("+-*") & set(text) and len(set(OPERATION_CODES.values()) & set(text)) == 1
        # the hint holds the method and the first step, not the answer nor the solution
        assert "####" not in row["privileged_context"] and parse_final_answer(row["privileged_context"]) is None
        assert row["privileged_context"].count(";") == 1 and row["privileged_context"].count(">") == 1
    assert ds.to_list() == make_math_dataset("train", n=50, seed=3).to_list()
    assert _texts(ds) != _texts(make_math_dataset("train", n=50, seed=4))

    plain = make_math_dataset("train", n=50, seed=3, conversational=False)
    assert plain["prompt"] == _texts(ds)
    teacher = MATH_TEACHER_TEMPLATE.format(
        prompt=plain[0]["prompt"], privileged_context=plain[0]["privileged_context"]
    )
    assert teacher.startswith(plain[0]["prompt"]) and teacher.endswith(plain[0]["privileged_context"])


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_math_splits_are_disjoint(difficulty):
    eval_ds = make_math_dataset("eval", difficulty=difficulty)
    eval_texts = _texts(eval_ds)
    assert len(eval_ds) == 200 and len(set(eval_texts)) == 200
    assert eval_ds.to_list() == make_math_dataset("eval", seed=123, difficulty=difficulty).to_list()
    train_texts = set(_texts(make_math_dataset("train", n=5000, seed=0, difficulty=difficulty)))
    assert not train_texts & set(eval_texts)
    assert make_math_dataset("eval", n=10, difficulty=difficulty)["prompt"] == eval_ds["prompt"][:10]
    assert len(eval_problems(difficulty)) == 200
    with pytest.raises(ValueError):
        make_math_dataset("eval", n=201)


def test_parse_final_answer():
    assert parse_final_answer("1+2+0=3>3;#### 3") == "3"
    assert parse_final_answer("#### 12 then #### 13") == "12"
    assert parse_final_answer("no answer") is None


# ------------------------------------------------------------------ tool use


def test_tool_dataset_schema_and_gold_calls():
    ds = make_tool_dataset("train", n=500, seed=0)
    assert ds.column_names == ["prompt", "privileged_context", "golden_answer"]
    for row in ds:
        prompt = row["prompt"][0]["content"]
        assert len(prompt) <= 110 and "\nQ: " in prompt
        (call,) = row["golden_answer"]
        assert call["Action"] in TOOLS and f"{call['Action']}: " in prompt
        arguments = json.loads(call["Action_Input"])
        assert tuple(arguments) == TOOLS[call["Action"]]["signature"]
        assert not any(f'"{name}"' in prompt for name in arguments)  # the argument names are privileged
        completion = tool_completion(row["golden_answer"])
        assert len(completion) <= 64
        # the privileged context: the tool's documentation and a similar call, never the golden call itself
        context = row["privileged_context"]
        assert context.startswith(f"Doc: {call['Action']}(") and f"Action: {call['Action']}\n" in context
        assert call["Action_Input"] not in context
        assert tool_call_matches(completion, row["golden_answer"])
        teacher = TOOL_TEACHER_TEMPLATE.format(prompt=prompt, privileged_context=row["privileged_context"])
        assert teacher.startswith(prompt)
    assert {row["golden_answer"][0]["Action"] for row in ds} == set(TOOLS)


def test_tool_signatures_and_decoys():
    for tool, spec in TOOLS.items():
        signatures = [spec["signature"], *spec["decoys"]]
        assert len(set(signatures)) == 3 and len({len(s) for s in signatures}) == 1, tool
    example = sample_tool_example(random.Random(0))
    assert example["golden_answer"] == [tool_call(example["tool"], example["values"])]


@pytest.mark.parametrize("task", ["math", "tool_use"])
def test_warm_start_student_is_uninformed_and_teacher_informed(task):
    """The warm start's student rows answer with a guess of what only the context says (the operation, the argument
    names), uniformly; its teacher rows with the right answer."""
    rows = sft._task_sampler(task, random.Random(0), "medium")(600)
    right = sum(student == teacher for _, _, student, teacher in rows) / len(rows)
    expected = 11 / 27 if task == "math" else 1 / 3  # math: 4/9 of the problems allow 2 operations, 5/9 allow 3
    assert abs(right - expected) < 0.07, right
    for student_prompt, teacher_prompt, student, teacher in rows:
        assert teacher_prompt.startswith(student_prompt) and len(teacher_prompt) > len(student_prompt)
        if task == "math":
            same_operands = re.sub(r"[-+*]", "?", student.split(":")[0]) == re.sub(
                r"[-+*]", "?", teacher.split(":")[0]
            )
            assert same_operands, (student, teacher)
            assert parse_final_answer(teacher) is not None and parse_final_answer(student) is not None
        else:
            assert student.split("\n")[0] == teacher.split("\n")[0]  # the right tool, maybe other argument names


def test_tool_splits_determinism_and_disjointness():
    ds = make_tool_dataset("train", n=100, seed=1)
    assert ds.to_list() == make_tool_dataset("train", n=100, seed=1).to_list()
    assert _texts(ds) != _texts(make_tool_dataset("train", n=100, seed=2))
    eval_ds = make_tool_dataset("eval")
    assert len(eval_ds) == 200 and len(set(_texts(eval_ds))) == 200
    assert eval_ds.to_list() == make_tool_dataset("eval", seed=7).to_list()
    train_texts = set(_texts(make_tool_dataset("train", n=3000, seed=0)))
    assert not train_texts & set(_texts(eval_ds))
    assert make_tool_dataset("eval", n=5, conversational=False)["prompt"] == _texts(eval_ds)[:5]


def tool_call_matches(text, golden_answer):
    return tool_call_reward(completions=[text], golden_answer=[golden_answer]) == [1.0]


def test_tool_call_matching():
    gold = [{"Action": "fx", "Action_Input": '{"amt":20,"from":"USD","to":"EUR"}'}]
    assert tool_call_matches('Action: fx\nAction Input: {"amt": 20, "to": "EUR", "from": "USD"}', gold)
    assert not tool_call_matches('Action: fx\nAction Input: {"amt":20,"from":"USD","to":"GBP"}', gold)
    assert not tool_call_matches('Action: stock\nAction Input: {"amt":20,"from":"USD","to":"EUR"}', gold)
    assert not tool_call_matches('Action: fx\nAction Input: {"amt":20,"from":"USD"', gold)
    assert parse_tool_calls("Action: fx\nAction Input: {bad}") is None  # malformed: no usable call


# ------------------------------------------------------------------ both


@pytest.mark.parametrize("task", ["math", "tool_use"])
def test_every_right_completion_fits_the_task_completion_budget(task):
    # A budget shorter than a right completion truncates it to reward 0 for every method: the task's ceiling drops
    # silently (math at 56 tokens lost 17.5 % of its held-out problems this way).
    from pbsd_trl.recipes.data.tasks import TASKS
    from pbsd_trl.recipes.tiny.model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    if task == "math":
        # the built-in dataset's difficulty ("medium"); other difficulties set their own `--max_completion_length`
        rng = random.Random(0)
        completions = [math_completion(*p) for p in [*eval_problems(), *(sample_problem(rng) for _ in range(5000))]]
    else:
        completions = [
            tool_completion(row["golden_answer"])
            for split in ("train", "eval")
            for row in make_tool_dataset(split, n=200 if split == "eval" else 3000, seed=0)
        ]
    prompt = [{"role": "user", "content": "x"}]

    def num_tokens(conversation, **kwargs):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    prefix = num_tokens(prompt, add_generation_prompt=True)
    lengths = [num_tokens([*prompt, {"role": "assistant", "content": c}]) - prefix for c in completions]
    budget = TASKS[task].max_completion_length
    assert max(lengths) <= budget, (task, max(lengths), budget)
    assert max(lengths) >= budget - 8  # and the budget is not far beyond them (generation cost)

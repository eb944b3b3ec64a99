import json
import random

import pytest

from pbsd_trl.data.math_task import (
    DIFFICULTIES,
    MATH_TEACHER_TEMPLATE,
    make_math_dataset,
    math_solution,
    parse_final_answer,
    sample_problem,
)
from pbsd_trl.data.tool_task import (
    TOOL_TEACHER_TEMPLATE,
    TOOLS,
    make_tool_dataset,
    tool_completion,
)
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


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_math_solutions_are_correct(difficulty):
    rng = random.Random(0)
    lo, hi = DIFFICULTIES[difficulty]
    for _ in range(3000):
        a, op, b = sample_problem(rng, difficulty)
        assert lo <= len(str(a)) <= hi
        assert op == "*" and 2 <= b <= 9 or lo <= len(str(b)) <= hi
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert expected >= 0
        solution = math_solution(a, op, b)
        assert parse_final_answer(solution) == str(expected)
        assert solution.count("####") == 1


def test_math_dataset_schema_and_determinism():
    ds = make_math_dataset("train", n=50, seed=3)
    assert ds.column_names == ["prompt", "privileged_context", "answer"]
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("=")
    assert parse_final_answer(row["privileged_context"]) == row["answer"]
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
        assert len(prompt) <= 150
        assert "Action: <tool>\nAction Input: <json>" in prompt and "\nQ: " in prompt
        (call,) = row["golden_answer"]
        assert call["Action"] in TOOLS and f"{call['Action']}: " in prompt
        assert isinstance(json.loads(call["Action_Input"]), dict)
        completion = tool_completion(row["golden_answer"])
        assert len(completion) <= 64
        assert completion in row["privileged_context"]  # the demonstration
        assert tool_call_matches(completion, row["golden_answer"])
        teacher = TOOL_TEACHER_TEMPLATE.format(prompt=prompt, privileged_context=row["privileged_context"])
        assert teacher.startswith(prompt)
    assert {row["golden_answer"][0]["Action"] for row in ds} == set(TOOLS)


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

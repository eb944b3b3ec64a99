"""Avg@k evaluation: hand-computable cases with a scripted generator, the teacher prompt, the CLI."""

import asyncio
import json
import math

import pytest
import torch

from pbsd_trl.recipes.evaluate import evaluate_avg_at_k, evaluate_student_and_teacher, score_completions
from pbsd_trl.recipes.tiny import build_random_model
from pbsd_trl.rewards import math_accuracy_reward
from pbsd_trl.scripts.evaluate import main


class ScriptedModel(torch.nn.Module):
    """A stand-in for a causal LM: `generate` returns scripted completions and records the prompts it saw.

    The `j`-th row of a call whose decoded prompt contains key `q` (evaluation repeats each prompt's row once per
    sample) gets `script[q][j]` (greedy: `greedy[q]`).
    """

    def __init__(self, tokenizer, script, greedy=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.script = script
        self.greedy = greedy or {}
        self.generation_config = type("GC", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.calls = []

    def _key(self, text):
        matches = [key for key in self.script if key in text]
        assert len(matches) == 1, (text, matches)
        return matches[0]

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, **kwargs):
        self.calls.append(
            {"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(), "do_sample": do_sample}
        )
        rows, seen = [], {}
        for ids in input_ids:
            key = self._key(self.tokenizer.decode(ids, skip_special_tokens=False))
            j = seen[key] = seen.get(key, -1) + 1
            out = self.script[key][j] if do_sample else self.greedy[key]
            completion = self.tokenizer(out, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(ids.tolist() + completion)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def rows(*items):
    return [
        {"prompt": [{"role": "user", "content": q}], "privileged_context": f"sol of {q}", "answer": a}
        for q, a in items
    ]


def test_avg_pass_and_per_problem_are_hand_computable(tokenizer):
    # k=4: problem A right 0/4, B right 2/4, C right 4/4 (prompts of different lengths, to exercise the length sort)
    script = {
        "A=": ["#### 1", "#### 2", "#### 3", "#### 4"],
        "BBBBB=": ["#### 7", "#### 8", "#### 7", "no answer"],
        "CC=": ["#### 5"] * 4,
    }
    model = ScriptedModel(tokenizer, script, greedy={"A=": "#### 9", "BBBBB=": "#### 7", "CC=": "#### 0"})
    data = rows(("BBBBB=", "7"), ("A=", "9"), ("CC=", "5"))
    report = evaluate_avg_at_k(
        model, tokenizer, data, math_accuracy_reward, k=4, greedy=True, progress_bar=False, batch_size=2
    )
    assert report["per_problem"] == [0.5, 0.0, 1.0]  # dataset order, not generation order
    assert report["avg_at_k"] == pytest.approx(0.5)
    assert report["pass_at_k"] == pytest.approx(2 / 3)
    assert report["greedy_accuracy"] == pytest.approx(2 / 3)  # A and B right, C wrong
    assert report["n_problems"] == 3 and report["k"] == 4 and report["prompt"] == "student"
    assert report["seconds"] >= 0 and report["n_unscored"] == 0
    json.dumps(report)  # serializable
    # batching: 2 problems then 1 (x k rows) for the sampled pass, same for greedy; left padding to a multiple of 16
    sampled = [c for c in model.calls if c["do_sample"]]
    assert [c["input_ids"].shape[0] for c in sampled] == [2 * 4, 1 * 4]
    for call in model.calls:
        assert call["input_ids"].shape[1] % 16 == 0
        mask = call["attention_mask"]
        assert (mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        assert (call["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    # the chat template was applied (generation prompt at the end)
    text = tokenizer.decode(model.calls[0]["input_ids"][0], skip_special_tokens=False)
    assert text.replace("<|pad|>", "").endswith("<|assistant|>")


def test_teacher_prompt_uses_template_but_reward_judges_the_student_question(tokenizer):
    script = {"Q1=": ["#### 3", "#### 4"], "Q2=": ["#### 6", "#### 6"]}
    model = ScriptedModel(tokenizer, script)
    seen_prompts = []

    def reward(prompts, completions, answer, **kwargs):
        seen_prompts.extend(prompts)
        return math_accuracy_reward(prompts=prompts, completions=completions, answer=answer)

    data = rows(("Q1=", "3"), ("Q2=", "6"))
    report = evaluate_avg_at_k(
        model,
        tokenizer,
        data,
        reward,
        k=2,
        with_privileged_context=True,
        teacher_prompt_template="{prompt} REF: {privileged_context}",
        progress_bar=False,
    )
    assert report["prompt"] == "teacher"
    assert report["per_problem"] == [0.5, 1.0]
    decoded = {tokenizer.decode(ids, skip_special_tokens=True) for call in model.calls for ids in call["input_ids"]}
    assert sorted(decoded) == ["Q1= REF: sol of Q1=", "Q2= REF: sol of Q2="]
    assert all(p[-1]["content"] in ("Q1=", "Q2=") for p in seen_prompts)


def test_student_and_teacher_reports(tokenizer):
    # the student sees "Q1=" alone and answers wrong; with the privileged context the teacher answers right
    model = ScriptedModel(tokenizer, {"REF:": ["#### 3", "#### 3"], "|>Q1=<": ["#### 4", "#### 4"]})
    data = rows(("Q1=", "3"))
    kwargs = dict(teacher_prompt_template="{prompt} REF: {privileged_context}", progress_bar=False)
    reports = evaluate_student_and_teacher(model, tokenizer, data, math_accuracy_reward, k=2, **kwargs)
    assert reports["student"]["prompt"] == "student" and reports["student"]["avg_at_k"] == 0.0
    assert reports["teacher"]["prompt"] == "teacher" and reports["teacher"]["avg_at_k"] == 1.0
    assert set(
        evaluate_student_and_teacher(model, tokenizer, data, math_accuracy_reward, k=2, teacher=False, **kwargs)
    ) == {"student"}


def test_plain_text_prompts_and_completions(tokenizer):
    script = {"x1": ["#### 1"], "x2": ["#### 0"]}
    model = ScriptedModel(tokenizer, script)
    captured = {}

    def reward(prompts, completions, **kwargs):
        captured["completions"] = completions
        return [1.0 if c == "#### 1" else 0.0 for c in completions]

    data = [{"prompt": "x1", "privileged_context": "c"}, {"prompt": "x2", "privileged_context": "c"}]
    report = evaluate_avg_at_k(model, tokenizer, data, reward, k=1, progress_bar=False)
    assert captured["completions"] == ["#### 1", "#### 0"]  # plain strings for plain prompts, EOS stripped
    assert report["avg_at_k"] == 0.5 and report["pass_at_k"] == 0.5


def test_score_completions_weights_none_and_async():
    def a(prompts, completions, **kwargs):
        return [1.0, None, 0.0]

    async def b(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5, None, None]

    values = score_completions([a, b], ["p"] * 3, ["c"] * 3, None, {}, reward_weights=[1.0, 2.0])
    assert values[0] == 2.0 and math.isnan(values[1]) and values[2] == 0.0
    with pytest.raises(ValueError, match="returned 1 values for 3"):
        score_completions(lambda prompts, completions, **kw: [1.0], ["p"] * 3, ["c"] * 3, None, {})


def test_real_model_sampling_is_seeded_and_restores_rng(tokenizer):
    model = build_random_model(tokenizer, size="test", seed=0)
    data = rows(("12+3=", "15"), ("4*5=", "20"), ("9-2=", "7"))
    state = torch.random.get_rng_state()
    kwargs = dict(k=3, max_new_tokens=8, progress_bar=False, seed=123)
    r1 = evaluate_avg_at_k(model, tokenizer, data, math_accuracy_reward, **kwargs)
    r2 = evaluate_avg_at_k(model, tokenizer, data, math_accuracy_reward, **kwargs)
    assert torch.equal(state, torch.random.get_rng_state())
    assert r1["sample_completions"] == r2["sample_completions"]
    assert r1["avg_at_k"] == 0.0 and 0 < r1["mean_completion_tokens"] <= 8


def test_cli_writes_report(tmp_path, tiny_model_dir):
    data = tmp_path / "eval.jsonl"
    with open(data, "w") as f:
        for q, s, a in [("1+1=", "1+1+0=2>2;#### 2", "2"), ("2+5=", "2+5+0=7>7;#### 7", "7")]:
            f.write(json.dumps({"question": q, "solution": s, "final": a}) + "\n")
    out = tmp_path / "report.json"
    report = main(
        [
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_name",
            str(data),
            "--prompt_column",
            "question",
            "--solution_column",
            "solution",
            "--answer_column",
            "final",
            "--k",
            "2",
            "--reward",
            "math",
            "--max_new_tokens",
            "8",
            "--with_privileged_context",
            "--greedy",
            "--output",
            str(out),
            "--no_progress_bar",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["n_problems"] == 2 and saved["k"] == 2 and saved["prompt"] == "teacher"
    assert set(saved) >= {"avg_at_k", "pass_at_k", "greedy_accuracy", "per_problem", "seconds"}
    assert report["avg_at_k"] == saved["avg_at_k"]


def test_cli_builtin_tool_use_dataset(tiny_model_dir):
    report = main(
        [
            "--model_name_or_path",
            tiny_model_dir,
            "--dataset_name",
            "builtin:tool_use",
            "--reward",
            "tool_use",
            "--k",
            "2",
            "--num_problems",
            "3",
            "--max_new_tokens",
            "4",
            "--no_progress_bar",
        ]
    )
    assert report["n_problems"] == 3 and report["avg_at_k"] == 0.0

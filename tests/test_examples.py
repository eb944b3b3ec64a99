"""The example scripts: argument handling, dataset errors, the end-to-end run, interrupt-safe checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from testing_utils import load_example

from pbsd_trl.callbacks import SignalCheckpointCallback
from pbsd_trl.recipes.data.loading import DatasetColumnError, load_prompt_dataset
from pbsd_trl.recipes.data.math_task import math_completion, parse_final_answer, problem_text, train_problems
from pbsd_trl.recipes.data.tasks import TASKS
from pbsd_trl.recipes.data.tool_task import make_tool_dataset
from pbsd_trl.recipes.example_args import parse_args
from pbsd_trl.recipes.models import load_model_and_tokenizer
from pbsd_trl.recipes.report import plot_training_curves, results_table


ROOT = Path(__file__).resolve().parents[1]
math_example, tool_use_example = load_example("math"), load_example("tool_use")

# Small, fast training settings for the tiny random test model
FAST = [
    "--per_device_train_batch_size",
    "8",
    "--num_generations",
    "4",
    "--max_completion_length",
    "12",
    "--logging_steps",
    "1",
    "--save_steps",
    "100",
    "--eval_k",
    "2",
    "--eval_batch_size",
    "8",
]


@pytest.fixture(scope="module")
def math_jsonl(tmp_path_factory):
    """Built-in problems written in another schema: plain-text `problem`, `solution` (a full reference solution),
    `result` columns."""
    path = tmp_path_factory.mktemp("data") / "math.jsonl"
    with open(path, "w") as f:
        for a, op, b in train_problems(random.Random("math-train-0"), 40):
            solution = math_completion(a, op, b)  # a reference solution (not the built-in hint), ending in `#### N`
            row = {"problem": problem_text(a, op, b), "solution": solution, "result": parse_final_answer(solution)}
            f.write(json.dumps(row) + "\n")
    return str(path)


MATH_COLUMNS = ["--prompt_column", "problem", "--solution_column", "solution", "--answer_column", "result"]


# ---- datasets ---------------------------------------------------------------------------------------------------


def test_column_mapping_turns_plain_text_into_a_conversation(math_jsonl):
    ds = load_prompt_dataset(
        math_jsonl, task="math", prompt_column="problem", solution_column="solution", answer_column="result"
    )
    assert set(ds.column_names) == {"prompt", "privileged_context", "answer"}
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert row["privileged_context"].endswith(f"#### {row['answer']}")


def test_math_without_answer_column_uses_the_solution(math_jsonl):
    ds = load_prompt_dataset(math_jsonl, task="math", prompt_column="problem", solution_column="solution")
    assert "solution" in ds.column_names and "answer" not in ds.column_names
    from pbsd_trl.rewards import math_accuracy_reward

    row = ds[0]
    answer = row["privileged_context"].split("#### ")[-1]
    assert math_accuracy_reward(
        prompts=[row["prompt"]], completions=[f"#### {answer}"], solution=[row["solution"]]
    ) == [1.0]


@pytest.mark.parametrize(
    "flag, kwargs",
    [
        ("--prompt_column", {"prompt_column": "question"}),
        ("--solution_column", {"prompt_column": "problem", "solution_column": "reference"}),
        ("--answer_column", {"prompt_column": "problem", "solution_column": "solution", "answer_column": "gold"}),
    ],
)
def test_missing_column_names_file_and_column(math_jsonl, flag, kwargs):
    with pytest.raises(DatasetColumnError) as err:
        load_prompt_dataset(math_jsonl, task="math", **kwargs)
    column = list(kwargs.values())[-1]
    assert math_jsonl in str(err.value) and f"'{column}'" in str(err.value) and flag in str(err.value)


def test_missing_reward_column_names_file_and_column(tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"prompt": "Q: weather?", "privileged_context": "Doc: ..."}) + "\n")
    with pytest.raises(DatasetColumnError, match=r"tools\.jsonl has no column 'golden_answer'"):
        load_prompt_dataset(str(path), task="tool_use")


@pytest.mark.parametrize("suffix, content", [(".jsonl", "{not json\n"), (".parquet", "not parquet"), (".csv", "")])
def test_unparsable_file_names_the_file(tmp_path, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_prompt_dataset(str(path), task="math")
    assert str(path) in str(err.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"), task="math")
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match="data.txt"):
        load_prompt_dataset(str(odd), task="math")


def test_example_fails_on_a_missing_column_before_loading_a_model(math_jsonl, tmp_path):
    argv = [
        "--model_name_or_path",
        str(tmp_path / "does-not-exist"),
        "--dataset_name",
        math_jsonl,
        "--prompt_column",
        "question",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(DatasetColumnError, match="'question'") as err:
        math_example.main(argv)
    assert math_jsonl in str(err.value)
    assert not (tmp_path / "out").exists()


def test_builtin_datasets():
    train = load_prompt_dataset("builtin:tool_use", builtin_split="train", num_rows=5)
    assert len(train) == 5 and {"prompt", "privileged_context", "golden_answer"} <= set(train.column_names)
    assert len(load_prompt_dataset("builtin:math", builtin_split="eval")) == 200


# ---- arguments --------------------------------------------------------------------------------------------------


def test_defaults_apply_only_where_unset(tmp_path):
    script, config, model = parse_args(TASKS["math"], math_example.DEFAULTS, [])
    assert config.max_steps == 80 and config.learning_rate == 1e-4 and config.max_completion_length == 64
    assert config.pad_to_multiple_of == 16 and config.num_generations == 8 and config.per_device_train_batch_size == 64
    assert config.teacher_prompt_template == TASKS["math"].teacher_prompt_template
    assert model.model_name_or_path is None and script.dataset_name is None
    assert model.lora_r == 64 and model.lora_alpha == 128 and "gate_proj" in model.lora_target_modules

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 3.0e-4\nmax_steps: 7\npbsd_beta: 0.5\nuse_peft: true\n")
    _, config, model = parse_args(TASKS["math"], math_example.DEFAULTS, ["--config", str(recipe), "--max_steps", "9"])
    assert config.learning_rate == 3e-4 and config.pbsd_beta == 0.5 and model.use_peft
    assert config.max_steps == 9  # command line beats the config file
    assert config.max_completion_length == 64  # untouched default of the task

    _, config, _ = parse_args(TASKS["tool_use"], tool_use_example.DEFAULTS, ["--learning_rate", "2e-5"])
    assert config.learning_rate == 2e-5 and config.max_completion_length == 64


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    import torch

    example = tool_use_example if "tool" in recipe.name else math_example
    cpu = [] if torch.cuda.is_available() else ["--bf16", "false", "--use_cpu", "true"]  # GPU recipes, parsed on CPU
    parse_args(example.TASK, example.DEFAULTS, ["--config", str(recipe), *cpu])


# ---- report -----------------------------------------------------------------------------------------------------


def test_results_table_and_plot(tmp_path):
    before = {"student": {"avg_at_k": 0.25, "pass_at_k": 0.5}, "teacher": {"avg_at_k": 0.9, "pass_at_k": 1.0}}
    after = {"student": {"avg_at_k": 0.5, "pass_at_k": 0.75}, "teacher": {"avg_at_k": 0.95, "pass_at_k": 1.0}}
    table = results_table(before, after, 8)
    assert "| student Avg@8 | 0.250 | 0.500 | +0.250 |" in table
    history = [
        {
            "step": s,
            "pbsd/student_reward": s / 10,
            "pbsd/teacher_reward": 0.9,
            "pbsd/preference_accuracy": 0.6,
            "pbsd/margin": 0.1 * s,
            "loss": 0.5,
        }
        for s in range(1, 6)
    ] + [{"step": 5, "train_runtime": 1.0}]
    png = plot_training_curves(history, tmp_path / "curves.png")
    pytest.importorskip("matplotlib")
    assert png is not None and png.stat().st_size > 1000
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert curves["pbsd/margin"]["step"] == [1, 2, 3, 4, 5]


# ---- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_math_script_end_to_end_offline(tiny_model_dir, math_jsonl, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "math.py"),
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        math_jsonl,
        *MATH_COLUMNS,
        "--max_steps",
        "2",
        "--eval_num_problems",
        "4",
        "--output_dir",
        str(out),
        *FAST,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 2 and not results["interrupted"]
    for when in ("before", "after"):
        for who in ("student", "teacher"):
            assert results[when][who]["n_problems"] == 4 and results[when][who]["k"] == 2
    assert "| student Avg@2 |" in proc.stdout and "| student Avg@2 |" in (out / "results.md").read_text()
    assert (out / "training_curves.png").is_file() or results["training_curves"] is None
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("pbsd/margin" in entry for entry in history)


@pytest.mark.slow
def test_tool_use_example_runs_in_process(tiny_model_dir, tmp_path):
    path = tmp_path / "tools.jsonl"
    with open(path, "w") as f:
        for row in make_tool_dataset("train", n=20, conversational=False):
            f.write(
                json.dumps({"q": row["prompt"], "doc": row["privileged_context"], "calls": row["golden_answer"]})
                + "\n"
            )
    argv = [
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        str(path),
        "--prompt_column",
        "q",
        "--solution_column",
        "doc",
        "--answer_column",
        "calls",
        "--max_steps",
        "1",
        "--eval_num_problems",
        "3",
        "--output_dir",
        str(tmp_path / "out"),
        *FAST,
    ]
    results = tool_use_example.main(argv)
    assert results["after"]["student"]["n_problems"] == 3 and results["global_step"] == 1


class _SignalAtStep(SignalCheckpointCallback):
    """Sends itself a real SIGTERM during step 1 (after the handlers are installed)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and not self.stop_requested:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().on_step_end(args, state, control, **kwargs)


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tiny_model_dir, math_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "--model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        math_jsonl,
        *MATH_COLUMNS,
        "--max_steps",
        "3",
        "--eval_num_problems",
        "0",
        "--output_dir",
        str(out),
        "--plot",
        "false",
        *FAST,
    ]
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(math_example, "SignalCheckpointCallback", _SignalAtStep)
    results = math_example.main(argv)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert results["interrupted"] and results["global_step"] == 1
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert (checkpoint / "tokenizer.json").is_file()  # the checkpoint is usable as a model directory

    monkeypatch.setattr(math_example, "SignalCheckpointCallback", SignalCheckpointCallback)
    results = math_example.main([*argv, "--resume_from_checkpoint", str(checkpoint)])
    assert not results["interrupted"] and results["global_step"] == 3
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]  # step 1 comes from the checkpoint


def test_signal_callback_sets_save_and_stop():
    from transformers import TrainerControl, TrainerState

    callback = SignalCheckpointCallback()
    control, state = TrainerControl(), TrainerState()
    state.global_step = 4
    callback.on_step_end(None, state, control)
    assert not control.should_save and not control.should_training_stop
    callback.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        assert callback.stop_requested and callback.received == signal.SIGINT
    finally:
        callback.uninstall()
    callback.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop and callback.stopped_at_step == 4


# ---- model loading -------------------------------------------------------------------


def test_tiny_tokenizer_keeps_spaces(tiny_model_dir):
    # AutoTokenizer alone resolves it to Qwen2Tokenizer, which drops spaces; the examples load it as saved
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    assert tokenizer.decode(tokenizer("a b", add_special_tokens=False)["input_ids"]) == "a b"
    assert tokenizer.padding_side == "left" and tokenizer.chat_template


@pytest.mark.parametrize("script", ["math.py", "tool_use.py"])
def test_scripts_start_as_scripts(script, tmp_path):
    # examples/math.py shadows the standard library's `math` for every script of examples/: both must guard against it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--pbsd_beta" in proc.stdout and "--prompt_column" in proc.stdout

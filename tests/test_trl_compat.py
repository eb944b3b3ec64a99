"""The TRL-compat runner's machinery: offline hub stand-ins, and both runs on a small suite written in TRL's style."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


COMPAT = Path(__file__).parent / "trl_compat"
sys.path.insert(0, str(COMPAT))
import stand_ins  # noqa: E402


MOE = "trl-internal-testing/tiny-Qwen3MoeForCausalLM"
GEMMA = "trl-internal-testing/tiny-Gemma2ForCausalLM"


def test_hub_ids_and_zen():
    source = f'model="{MOE}", reward="trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5"'
    assert stand_ins.hub_ids(source) == ["trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5", MOE]
    zen = stand_ins.zen("conversational_prompt_only")
    assert zen["train"].num_rows == 17 and zen["test"].num_rows == 2
    assert zen["train"][0]["prompt"][0]["content"].startswith("Beautiful is")
    with pytest.raises(FileNotFoundError, match="No offline stand-in for .*zen config 'unknown'"):
        stand_ins.zen("unknown")


def test_stand_ins_load_offline_by_hub_id(tmp_path):
    built = stand_ins.write_hub_cache(
        [MOE, GEMMA, "trl-internal-testing/tiny-Qwen2_5_VLForConditionalGeneration"], tmp_path
    )
    assert built == {MOE: True, GEMMA: True, "trl-internal-testing/tiny-Qwen2_5_VLForConditionalGeneration": False}
    code = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        moe = AutoModelForCausalLM.from_pretrained("{MOE}")
        gemma = AutoModelForCausalLM.from_pretrained("{GEMMA}")
        tokenizer = AutoTokenizer.from_pretrained("{MOE}")
        assert type(moe).__name__ == "Qwen3MoeForCausalLM" and moe.config.num_experts == 4
        assert gemma.config.final_logit_softcapping == 30.0
        assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
        print("ok")
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


MINI_SUITE = """
import pytest
from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_train_moe(tmp_path):
    dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=8, max_steps=1, report_to="none", logging_steps=1)
    trainer = GRPOTrainer(model="trl-internal-testing/tiny-Qwen3MoeForCausalLM", reward_funcs=reward_len, args=args,
                          train_dataset=dataset)
    trainer.train()
    assert trainer.state.log_history[0]["aux_loss"] > 0


def test_train_beta_non_zero(tmp_path):
    dataset = load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")
    args = GRPOConfig(output_dir=str(tmp_path), beta=0.1, per_device_train_batch_size=3, num_generations=3,
                      max_completion_length=8, max_steps=1, report_to="none")
    GRPOTrainer(model="trl-internal-testing/tiny-Qwen3MoeForCausalLM", reward_funcs=reward_len, args=args,
                train_dataset=dataset).train()
"""


@pytest.mark.slow
def test_runner_reports_both_trainers_and_the_difference(tmp_path):
    trl_src = tmp_path / "trl"
    (trl_src / "tests").mkdir(parents=True)
    (trl_src / "tests" / "test_grpo_trainer.py").write_text(MINI_SUITE)
    out = subprocess.run(
        [
            sys.executable,
            str(COMPAT / "run_trl_grpo_tests.py"),
            "--trl-src",
            str(trl_src),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (tmp_path / "work" / "summary.txt").read_text()
    assert "grpo: 2 passed, 0 failed" in summary, out.stdout[-3000:]
    assert "pbsd: 1 passed, 1 failed" in summary
    assert "passing with GRPO, not with PBSD: 1" in summary and "test_train_beta_non_zero" in summary
    assert "`beta` is GRPO's KL coefficient" in summary


def _junit(path, cases):
    body = "".join(
        f'<testcase classname="tests.test_grpo_trainer.TestGRPOTrainer" name="{name}">'
        + (
            '<failure message="ValueError: `beta` must be 0"/>'
            if outcome == "failed"
            else "<skipped/>"
            if outcome == "skipped"
            else ""
        )
        + "</testcase>"
        for name, outcome in cases.items()
    )
    body += '<testcase classname="" time="0.003"/>'  # what pytest writes for the test a Ctrl-C interrupted
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_compare_reports_of_separate_and_interrupted_runs(tmp_path):
    # GRPO ran 4 tests; the PBSD run was interrupted after 3: the 4th is "not run", not a regression
    grpo = _junit(
        tmp_path / "grpo.xml",
        {"test_a": "passed", "test_beta": "passed", "test_gpu": "skipped", "test_late": "passed"},
    )
    pbsd = _junit(tmp_path / "pbsd.xml", {"test_a": "passed", "test_beta": "failed", "test_gpu": "skipped"})
    out = subprocess.run(
        [sys.executable, str(COMPAT / "run_trl_grpo_tests.py"), "--compare", str(grpo), str(pbsd)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stdout.splitlines()
    assert "grpo: 3 passed, 0 failed, 1 skipped" in lines, out.stdout + out.stderr
    assert "pbsd: 1 passed, 1 failed, 1 skipped" in lines
    assert "passing with GRPO, not with PBSD: 1" in lines
    assert any("TestGRPOTrainer::test_beta" in line and "`beta` must be 0" in line for line in lines)
    assert not any("test_late  ->" in line for line in lines)
    assert "passing with GRPO, not run with PBSD: 1" in lines

"""Resuming PBSD from a checkpoint reproduces the uninterrupted run: losses, student parameters, EMA teacher.

4 steps with a checkpoint every 2; a fresh trainer resumed from checkpoint-2 must reproduce steps 3-4 (GRPO does not
checkpoint its generation buffer, so it regenerates: generation is deterministic here, tests/distributed/common.py),
end with the same parameters, and with the same EMA teacher (restored from `pbsd_teacher_state.pt`; a fresh
trainer would otherwise restart the EMA from the initial weights). One process in-process, plus a ZeRO-3 launch.
"""

import json
import os
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))


def _check(results: dict, specs: list[str]) -> None:
    for spec in specs:
        r = results[spec]
        full = dict(zip(r["full"]["step"], r["full"]["loss"], strict=True))
        resumed = dict(zip(r["resumed"]["step"], r["resumed"]["loss"], strict=True))
        assert sorted(full) == [1, 2, 3, 4] and {3, 4} <= set(resumed), (spec, r)
        for step in (3, 4):
            assert abs(resumed[step] - full[step]) <= 1e-5 * abs(full[step]), (spec, step, full, resumed)
        assert r["param_max_abs_diff"] <= 1e-6, (spec, r["param_max_abs_diff"])
        if spec.endswith(":ema"):
            assert r["teacher_num_tensors"], spec
            assert r["teacher_max_abs_diff"] <= 1e-6, (spec, r["teacher_max_abs_diff"])


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["lora:ema", "full:ema", "full:base"])
def test_resume_reproduces_uninterrupted_run(spec, tmp_path):
    from common import make_model_dir
    from run_resume import run

    model_dir = make_model_dir(str(tmp_path / "model"), tied=False)
    results = run(model_dir, str(tmp_path), [spec])
    _check(results, [spec])
    if spec.endswith(":ema"):
        assert os.path.exists(tmp_path / f"full-{spec.replace(':', '-')}" / "checkpoint-2" / "pbsd_teacher_state.pt")


@pytest.mark.slow
def test_resume_without_teacher_state_fails_clearly(tmp_path):
    from common import build_trainer, make_model_dir

    model_dir = make_model_dir(str(tmp_path / "model"))
    out = tmp_path / "run"
    trainer = build_trainer(
        model_dir, str(out), 8, "ema", peft=False, max_steps=2, save_strategy="steps", save_steps=2
    )
    trainer.train()
    os.remove(out / "checkpoint-2" / "pbsd_teacher_state.pt")
    trainer = build_trainer(model_dir, str(out), 8, "ema", peft=False, max_steps=4, save_strategy="no")
    with pytest.raises(FileNotFoundError, match="pbsd_teacher_state.pt"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_under_zero3_two_processes(tmp_path):
    from common import make_model_dir
    from launch import accelerate_launch, failure_report

    model_dir = make_model_dir(str(tmp_path / "model"), tied=False)
    out = tmp_path / "resume.json"
    specs = ["lora:ema", "full:ema"]
    rc, output, _ = accelerate_launch(
        "tests/distributed/zero3_strict.yaml", "run_resume.py", "--model-dir", model_dir, "--out", str(out),
        "--configs", *specs,
    )  # fmt: skip
    assert rc == 0, failure_report(output)
    results = json.loads(out.read_text())
    assert all(results[s]["world"] == 2 for s in specs)
    _check(results, specs)

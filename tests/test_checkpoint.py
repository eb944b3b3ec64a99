"""Resuming PBSD from a checkpoint reproduces the uninterrupted run: losses, student parameters, EMA teacher.

4 steps with a checkpoint every 2; a fresh trainer resumed from checkpoint-2 must reproduce steps 3-4 (GRPO does not
checkpoint its generation buffer, so it regenerates: generation is deterministic here, tests/distributed/common.py),
end with the same parameters, and with the same EMA teacher (restored from `pbsd_teacher_state.pt`; a fresh
trainer would otherwise restart the EMA from the initial weights). One process in-process, plus a ZeRO-3 launch.

A damaged or mismatched checkpoint (a truncated file, another teacher kind, full weights resumed with PEFT, an EMA
teacher of another model) is refused with an error naming the file, before any update (`pbsd_trl/checkpoint.py`).
"""

import json
import os
import sys

import pytest
import torch
from testing_utils import params_snapshot, params_unchanged

from pbsd_trl.checkpoint import CheckpointError


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


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One step of a full-model EMA run, saved: model.safetensors, optimizer.pt, pbsd_teacher_state.pt, …"""
    from common import build_trainer, make_model_dir

    base = tmp_path_factory.mktemp("checkpoint")
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
    before = params_snapshot(trainer.model)
    with pytest.raises(error) as err:
        trainer.train(resume_from_checkpoint=folder)
    assert trainer.state.global_step == 0 and params_unchanged(before, trainer.model)
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

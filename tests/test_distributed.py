"""Two-process PBSD training (CPU, gloo) under DDP, DeepSpeed ZeRO-2 and ZeRO-3 against a one-process reference.

Each launch trains several configurations in one go (LoRA and full-model students, `base` and `ema` teachers) with
generation replaced by a deterministic function of the prompt (tests/distributed/common.py), so that the one-process
run (per-device batch = global batch) and the two-process runs (half each) see the same data; the per-step losses
must then agree within 1e-4 relative. A step's loss depends on the previous steps' synchronized updates, the teacher
weights (the EMA teacher changes by half each step) and the global pair count, so gradient reduction, parameter
gathering, EMA updates under ZeRO-3 and the loss normalization are all covered.

ZeRO-3 runs twice: with examples/accelerate_configs/zero3.yaml on the tied-embedding model, and with
tests/distributed/zero3_strict.yaml (no persistent parameters) on a model with its own `lm_head`, so that every
parameter, the head included, is really partitioned and released between uses.
"""

import json
import os
import subprocess
import sys
import time

import pytest


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "distributed")
sys.path.insert(0, SCRIPTS)

from launch import LAUNCH_TIMEOUT, accelerate_launch, failure_report, launch_env  # noqa: E402


CONFIGS = ["lora:base", "lora:ema", "full:base", "full:ema", "full:ema:all", "full:base:union"]
BACKENDS = {
    # name: (accelerate config, model variant suffix of the specs)
    "ddp": ("examples/accelerate_configs/multi_gpu.yaml", ""),
    "zero2": ("examples/accelerate_configs/zero2.yaml", ""),
    "zero3": ("examples/accelerate_configs/zero3.yaml", ":tied"),
    "zero3_strict": ("tests/distributed/zero3_strict.yaml", ""),
}
RTOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from common import make_model_dir

    base = tmp_path_factory.mktemp("pbsd_models")
    return {
        "": make_model_dir(str(base / "untied"), tied=False),
        ":tied": make_model_dir(str(base / "tied"), tied=True),
    }


def _model_args(model_dirs):
    return ["--model-dir", model_dirs[""], "--tied-model-dir", model_dirs[":tied"]]


@pytest.fixture(scope="module")
def reference(model_dirs, tmp_path_factory):
    """One process, per-device batch = global batch, every configuration on both models."""
    out = tmp_path_factory.mktemp("pbsd_reference") / "reference.json"
    specs = [c + v for v in ("", ":tied") for c in CONFIGS]
    cmd = [sys.executable, os.path.join(SCRIPTS, "run_pbsd.py"), *_model_args(model_dirs), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--configs", *specs], cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def _assert_close(name, got, want, rtol=RTOL):
    """Each step's value within `rtol` of the one-process value, relative to the larger of that value and the
    series' largest: a mean that happens to cross zero at one step (a margin of 1.6e-4 between steps of -1e-3 and
    4e-3) is a cancellation, whose relative error says nothing about the two runs' agreement."""
    assert len(got) == len(want), f"{name}: {got} vs {want}"
    assert all(v is not None for v in want), f"{name}: missing one-process value ({want})"
    scale = max(abs(w) for w in want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert g is not None, f"{name} step {step}: missing value ({got} vs {want})"
        assert abs(g - w) <= rtol * max(abs(w), scale, 1e-8), (
            f"{name} step {step}: {g!r} vs one-process {w!r} ({got} vs {want})"
        )


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_match_one_process(backend, model_dirs, reference, tmp_path):
    config_file, variant = BACKENDS[backend]
    specs = [c + variant for c in CONFIGS]
    out = tmp_path / "result.json"
    rc, output, seconds = accelerate_launch(
        config_file, "run_pbsd.py", *_model_args(model_dirs), "--out", str(out), "--configs", *specs
    )
    assert rc == 0, failure_report(output)
    result = json.loads(out.read_text())
    for spec in specs:
        got, want = result[spec], reference[spec]
        assert got["world"] == 2 and want["world"] == 1
        assert got["step"] == want["step"] == [1, 2, 3], got["step"]
        _assert_close(f"{backend} {spec} loss", got["loss"], want["loss"])
        # Metrics are reduced over processes: they match the one-process values too
        _assert_close(f"{backend} {spec} pbsd/margin", got["pbsd/margin"], want["pbsd/margin"], rtol=1e-3)
        _assert_close(f"{backend} {spec} teacher reward", got["pbsd/teacher_reward"], want["pbsd/teacher_reward"])
        if ":ema" in spec:
            _assert_close(f"{backend} {spec} EMA teacher", [got["teacher_state_sum"]], [want["teacher_state_sum"]])
        if backend.startswith("zero3"):
            assert got["zero3_partitioned"], f"{spec}: the student is not ZeRO-3 partitioned"
        if backend == "zero3_strict":
            assert got["lm_head_released"], f"{spec}: lm_head stayed gathered, the strict config is not in effect"
    # The losses must move, or the comparison would not see a wrong update
    for spec in specs:
        losses = reference[spec]["loss"]
        assert max(losses) - min(losses) > 20 * RTOL * abs(losses[0]), (spec, losses)
    print(f"{backend}: launch took {seconds:.1f}s")


@pytest.mark.parametrize("backend", ["ddp", "zero3_strict"])
def test_reward_error_on_one_rank_fails_the_job(backend, model_dirs, tmp_path):
    """A reward function raising on rank 1 only must bring the whole job down with its error, not hang rank 0."""
    config_file, _ = BACKENDS[backend]
    start = time.time()
    try:
        rc, output, _ = accelerate_launch(
            config_file,
            "run_pbsd.py",
            *_model_args(model_dirs),
            "--out", str(tmp_path / "never.json"),
            "--configs", "lora:base",
            "--fail-rank", "1",
            timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the job hung for {time.time() - start:.0f}s after a reward error on rank 1:\n{err.output}")
    assert rc != 0, output[-4000:]
    assert "reward function 'exploding_reward' raised ValueError: boom on rank 1" in output, output[-6000:]
    assert not (tmp_path / "never.json").exists()

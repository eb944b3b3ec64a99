"""PBSD inside a long-lived Python process (a Jupyter kernel): import without side effects, a `train()` interrupted by
Ctrl-C leaves the trainer usable, and a second trainer on the same model does not inherit the first one's heads."""

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from testing_utils import contains_answer, manual_sequence_logps, tiny_pbsd_config
from transformers import TrainerCallback

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.data.math_task import make_math_dataset
from pbsd_trl.recipes.tiny import build_random_model
from pbsd_trl.teacher.weights import TeacherEMACallback


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset():
    return make_math_dataset("train", n=16, seed=0)


def make_args(tmp_path, **kwargs):
    return tiny_pbsd_config(tmp_path, **{"disable_tqdm": True, **kwargs})


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


# ---- import has no side effects ---------------------------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import importlib, json, logging, os, pkgutil, random, signal, sys, threading, warnings
    import numpy as np, torch, transformers, datasets, accelerate, peft, trl
    from trl import GRPOConfig, GRPOTrainer  # the baseline: what a GRPO user has already imported

    def snapshot():
        loggers = {"": logging.root, **{n: l for n, l in logging.root.manager.loggerDict.items() if isinstance(l, logging.Logger)}}
        return {
            "signal handlers": {str(int(s)): repr(signal.getsignal(s)) for s in signal.valid_signals()
                                if s not in (signal.SIGKILL, signal.SIGSTOP)},
            "torch threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
            "torch flags": [str(torch.get_default_dtype()), torch.is_grad_enabled(),
                            torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision()],
            "rng": [repr(random.getstate()), torch.random.get_rng_state().tolist(), np.random.get_state()[1].tolist()],
            "environment": dict(os.environ),
            "hooks": [repr(sys.excepthook), repr(sys.displayhook), repr(threading.excepthook)],
            "warning filters": [repr(f) for f in warnings.filters],
            "logging": {"disable": logging.root.manager.disable, **{
                name: [lg.level, [repr(h) for h in lg.handlers], lg.propagate, lg.disabled] for name, lg in loggers.items()
            }},
            "hf": [transformers.logging.get_verbosity(), datasets.logging.get_verbosity(),
                   transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()],
        }

    before = snapshot()
    import pbsd_trl
    modules = [m.name for m in pkgutil.walk_packages(pbsd_trl.__path__, "pbsd_trl.")]
    for name in modules:
        importlib.import_module(name)
    after = snapshot()
    # A library's module-level `logging.getLogger(__name__)` adds a logger at NOTSET without handlers: not a change
    for name in set(after["logging"]) - set(before["logging"]):
        if after["logging"][name] == [logging.NOTSET, [], True, False]:
            del after["logging"][name]
    changes = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
    heavy = [m for m in ("matplotlib", "deepspeed", "vllm", "math_verify") if m in sys.modules]

    # plot_training_curves must not switch matplotlib's backend (a notebook's inline backend would stop showing plots)
    import matplotlib
    from pbsd_trl.recipes.report import plot_training_curves
    backend = matplotlib.get_backend()
    log = [{"step": s, "pbsd/margin": -1.0 + 0.1 * s, "pbsd/student_reward": 0.1 * s} for s in range(1, 6)]
    png = plot_training_curves(log, sys.argv[1], metrics=("pbsd/margin", "pbsd/student_reward"))
    print(json.dumps({"modules": modules, "changes": changes, "heavy imports": heavy, "backend before": backend,
                      "backend after": matplotlib.get_backend(), "pyplot imported": "matplotlib.pyplot" in sys.modules,
                      "png": str(png)}))
    """
)


@pytest.fixture(scope="module")
def import_probe(tmp_path_factory):
    png = tmp_path_factory.mktemp("plot") / "curves.png"
    env = {**__import__("os").environ, "MPLBACKEND": "svg", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(png)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_module_changes_no_global_state(import_probe):
    assert "pbsd_trl.trainer" in import_probe["modules"] and "pbsd_trl.recipes.report" in import_probe["modules"]
    assert import_probe["changes"] == {}, json.dumps(import_probe["changes"], indent=1)[:3000]
    # Heavy optional dependencies load when used, not on import (deepspeed's import, for one, logs and probes devices)
    assert import_probe["heavy imports"] == []


def test_plotting_keeps_the_matplotlib_backend(import_probe):
    assert Path(import_probe["png"]).is_file()
    assert import_probe["backend before"].lower() == "svg"
    assert import_probe["backend after"].lower() == "svg" and not import_probe["pyplot imported"]


# ---- a second trainer on the same model ---------------------------------------------------------------------------


def forward_patch_depth(model) -> int:
    """How many forward wrappers (TRL's fused head, pbsd-trl's head) sit between `model.forward` and the class's."""
    depth, forward = 0, model.__dict__.get("forward")
    while forward is not None and getattr(forward, "__func__", None) is not type(model).forward:
        cells = dict(zip(forward.__func__.__code__.co_freevars, forward.__func__.__closure__ or (), strict=False))
        forward = cells["original_forward"].cell_contents
        depth += 1
    return depth


@pytest.mark.parametrize("second_fused", [True, False])
def test_second_trainer_on_the_same_model_patches_it_afresh(tmp_path, tokenizer, dataset, second_fused):
    model = build_random_model(tokenizer, seed=3)
    first = PBSDTrainer(
        model,
        contains_answer,
        args=make_args(tmp_path / "a", temperature=0.5, teacher_model_kind="ema"),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    depth = forward_patch_depth(model)
    assert depth == 2  # TRL's fused head, then pbsd-trl's
    teacher_before = [p.detach().clone() for p in first.teacher.model.parameters()]

    second = PBSDTrainer(
        model,
        contains_answer,
        args=make_args(tmp_path / "b", temperature=1.0, use_fused_logprob_kernel=second_fused),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert forward_patch_depth(model) == (2 if second_fused else 1)  # not stacked on the first trainer's heads

    # The second trainer scores at its own temperature (1.0, not the first trainer's 0.5)
    second.model.train()
    inputs = second._generate_and_score_completions([dict(dataset[i]) for i in range(2) for _ in range(4)])
    with torch.no_grad():
        scored = second._sequence_logps(
            second.model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
        )
        expected = manual_sequence_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            1.0,
        )
        at_first_temperature = manual_sequence_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            inputs["completion_mask"],
            0.5,
        )
    torch.testing.assert_close(scored.double(), expected, atol=1e-4, rtol=1e-4)
    assert (expected - at_first_temperature).abs().max() > 1e-2  # the temperature matters, so the check has teeth

    # Callbacks are per trainer: the first one's EMA teacher does not follow the second one's training
    assert sum(isinstance(c, TeacherEMACallback) for c in first.callback_handler.callbacks) == 1
    assert not any(isinstance(c, TeacherEMACallback) for c in second.callback_handler.callbacks)
    second.train()
    assert second.state.global_step == 3
    for before, after in zip(teacher_before, first.teacher.model.parameters(), strict=True):
        assert torch.equal(before, after)


# ---- train() after an interrupted train() -------------------------------------------------------------------------


class _InterruptAtStepEnd(TrainerCallback):
    def __init__(self):
        self.fired = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt


class _RecordRun(TrainerCallback):
    """What the trainer holds when a run starts, and the run's logs."""

    def __init__(self, trainer):
        self.trainer, self.leftover, self.logs = trainer, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.leftover = {
            "metrics": {k: len(v) for m in trainer._metrics.values() for k, v in m.items() if v},
            "buffered": trainer._buffered_inputs is not None,
            "pair table": bool(trainer._pair_table),
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _interrupt_once(trainer, method: str, after_call: bool):
    """Make `trainer.<method>` raise KeyboardInterrupt once: on its first call, or on the teacher's call of the first
    step (its second call) right after it returns, when the most state is in flight."""
    original = getattr(trainer, method)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if not after_call and len(calls) == 1:
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if after_call and len(calls) == 2:
            raise KeyboardInterrupt
        return result

    setattr(trainer, method, wrapper)


@pytest.mark.parametrize("where", ["step_end", "teacher_generation", "teacher_scoring", "teacher_reward"])
@pytest.mark.parametrize("setup", ["full_base", "lora_ema"])
def test_train_after_an_interrupted_train(tmp_path, tokenizer, dataset, where, setup):
    model = build_random_model(tokenizer, seed=5)
    kind, peft_config = ("base", None) if setup == "full_base" else ("ema", lora())
    calls = []

    def reward(completions, answer, **kwargs):
        calls.append(1)
        if where == "teacher_reward" and len(calls) == 2:  # the teacher's reward call of step 1
            raise KeyboardInterrupt
        return contains_answer(completions, answer)

    trainer = PBSDTrainer(
        model,
        reward,
        args=make_args(tmp_path, teacher_model_kind=kind),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if where == "step_end":
        trainer.add_callback(_InterruptAtStepEnd())
    elif where == "teacher_generation":
        _interrupt_once(trainer, "_generate", after_call=True)
    elif where == "teacher_scoring":
        _interrupt_once(trainer, "_teacher_sequence_logps", after_call=False)
    trainable = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    student_wrapped = trainer.model_wrapped

    with pytest.raises(KeyboardInterrupt):
        trainer.train()

    # Nothing of the teacher is left switched on
    assert {n: p.requires_grad for n, p in trainer.model.named_parameters()} == trainable
    assert trainer.model_wrapped is student_wrapped
    if peft_config is not None:
        assert trainer.model.active_adapter == "default"
        with torch.no_grad():  # the adapter is enabled again: perturbing it changes the output
            ids = torch.tensor([[5, 6, 7, 8]])
            lora_b = next(p for n, p in trainer.model.named_parameters() if "lora_B.default" in n)
            reference = trainer.model(input_ids=ids).logits
            lora_b.add_(1.0)
            changed = trainer.model(input_ids=ids).logits
            lora_b.sub_(1.0)
        assert (changed - reference).abs().max() > 1e-3

    record = _RecordRun(trainer)
    trainer.add_callback(record)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()  # a second train() in the same kernel
    assert trainer.state.global_step == 3 and math.isfinite(result.training_loss)
    assert record.leftover == {"metrics": {}, "buffered": False, "pair table": False}
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)
    steps = [log for log in record.logs if "pbsd/margin" in log]
    assert len(steps) == 3 and all(math.isfinite(log["pbsd/margin"]) for log in steps)
    # Token counts restart with the run: step 1 of this run counts one step of teacher tokens, not two runs' worth
    # (about 1/3 of the three steps' count; with the interrupted run's tokens carried over it would be about 1/2)
    assert steps[0]["pbsd/teacher_num_tokens"] < 0.42 * steps[-1]["pbsd/teacher_num_tokens"]


def test_math_worker_survives_an_interrupted_request(monkeypatch):
    """Ctrl-C while a verification is in flight: the next request must not read the interrupted one's reply."""
    pytest.importorskip("math_verify")
    from pbsd_trl.rewards.verifier import VerifierWorker

    worker = VerifierWorker()
    try:
        assert worker.verify("x + 1", "1 + x", True, 20.0, None) == "equal"
        original = worker._read_line
        calls = []

        def interrupted(deadline):
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return original(deadline)

        monkeypatch.setattr(worker, "_read_line", interrupted)
        with pytest.raises(KeyboardInterrupt):
            worker.verify("2*x", "x + x", True, 20.0, None)  # "equal" left unread
        assert worker.verify("x + 2", "1 + x", True, 20.0, None) == "different"
    finally:
        worker.close()


# ---- signal handlers are the caller's again after an example run ------------------------------------------------


@pytest.mark.slow
def test_run_example_restores_signal_handlers_when_training_raises(tmp_path, tokenizer, monkeypatch):
    from testing_utils import load_example

    example = load_example("math")
    model_dir = tmp_path / "model"
    build_random_model(tokenizer, size="test", seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    class _FailAtStepEnd(example.SignalCheckpointCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("a failing step")

    monkeypatch.setattr(example, "SignalCheckpointCallback", _FailAtStepEnd)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    argv = [
        "--model_name_or_path",
        str(model_dir),
        "--max_steps",
        "2",
        "--eval_num_problems",
        "0",
        "--train_size",
        "16",
        "--output_dir",
        str(tmp_path / "out"),
        "--plot",
        "false",
        "--per_device_train_batch_size",
        "8",
        "--num_generations",
        "4",
        "--max_completion_length",
        "8",
        "--save_strategy",
        "no",
    ]
    with pytest.raises(RuntimeError, match="a failing step"):
        example.main(argv)
    assert {s: signal.getsignal(s) for s in previous} == previous

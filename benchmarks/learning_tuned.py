# Copyright 2026 The pbsd-trl authors. Licensed under the Apache License, Version 2.0.
"""
Tuned learning benchmark: GRPO vs OPSD-style KL vs SDFT vs PBSD (the paper's role-labelled loss and three
reward-aware variants) on both built-in tasks, each method tuned with the same budget of configurations, compared at
equal generated tokens, equal training time and equal optimizer steps.

Protocol (issue 15):

1. **Splits.** The 200 fixed held-out problems of a task are split into a validation half (rows 0-99) and a test
   half (rows 100-199); the two are asserted disjoint (by prompt text) and both are disjoint from every training
   problem (the task's generators exclude held-out prompts from training data).
2. **Equal tuning budget.** Every method gets the same number of configurations, `learning_rate x its own main
   knob` (`KNOBS` below, per task where the knob's useful range differs between the tasks, written into the
   report). Each PBSD variant (`PBSD_METHODS`) is a method of its own with its own grid. Each configuration runs
   once (seed 0) and is scored by Avg@8 on the validation half; per budget, the best one is selected.
3. **Test.** Each selected configuration runs with `--seeds` (3) and is scored on the test half; the report gives
   mean ± std, Welch's two-sided p-value and the beyond-seed-spread verdict (|Δ mean| > std_a + std_b) of every
   PBSD method vs every non-PBSD peer (and of each reward-aware variant vs the paper's PBSD).
4. **Three budgets**, all read off the same runs (constant learning rate, evaluations draw from a forked RNG, so a
   run stopped at a budget is the prefix of a longer one):
   - `tokens`: generated completion tokens, student samples plus, for PBSD, teacher samples (G_T per prompt);
   - `time`: training seconds, evaluations excluded, measured as the process's CPU time with one torch thread
     (`--clock cpu`, the default: equal to wall time on a quiet machine and insensitive to other processes on a
     shared one; `--clock wall` uses wall time);
   - `steps`: optimizer steps.
   A budget's point is the first optimizer step at which the run's counter reaches the budget.
5. **PBSD ablations** on top of the paper's PBSD configuration selected at the `time` budget (the headline), 3 test
   seeds each, reported beside the headline and never used for selection. Two of them are the loss's diagnostic
   arms (`pbsd_loss_type`): the report says per task whether PBSD is within seed spread of each.
6. **Stability**: the first test seed of every selected configuration runs on to `--stability_factor` (3) x the
   token budget; the report gives its best point and its end.
7. **PBSD with its teacher-sample pool** at the `time` budget (PBSD's fastest exact mode with the fixed base
   teacher): the time-selected configuration again, each test seed, with a pool of K = G_T base-teacher samples for
   the rows of as many steps as that seed's online run reached at the time budget (rows beyond fall back to online
   teacher samples), drawn inside the run so that its build counts as training time. The time verdicts use whichever
   PBSD execution reached more optimizer steps in the budget (a speed, not a score, decides).
8. **Long horizon**: each method's `time`-selected configuration trains for max(`--long_steps`, `--long_factor` x
   the optimizer steps its first test seed took to the token budget) on `--long_seeds`, evaluated on test every
   1/`--long_eval_points` of the run; the report gives best, end and end − best per method.
9. **Cache**: every finished run is stored as `<output_dir>/learning_runs/<task>/<key>.json`, `key` a hash of the
   run's full specification (task, method, configuration, seed, split, stopping and evaluation schedule, shared
   settings, base model). A rerun with the same arguments skips the stored runs, so a killed benchmark loses at most
   the run in progress; `--max_minutes` stops launching runs after that long and writes a report marked partial.
   `--plan` prints the runs and their estimated time (from the per-step costs measured by the stored runs, else
   from the costs in `DEFAULT_COSTS`) and exits.

Usage:
    python benchmarks/learning_tuned.py --plan                       # the runs and the time estimate
    python benchmarks/learning_tuned.py                              # full run (resumes from the cache)
    python benchmarks/learning_tuned.py --max_minutes 170            # one session's worth, then a partial report
    python benchmarks/learning_tuned.py --quick --output_dir /tmp/x  # smoke run on test-size models (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench_utils import budgeted_run_settings, display_path, quiet_training_logs, smoke_base_model  # noqa: E402
from learning import machine_description, mean_std, verdict, welch  # noqa: E402


PROTOCOL_VERSION = 1  # part of every run key: bump when a change makes stored runs incomparable
TASK_NAMES = ("math", "tool_use")
HEADLINE_PBSD = "PBSD"  # the paper's loss: the ablations, the teacher pool and the diagnostic arms build on it
PBSD_METHODS = (HEADLINE_PBSD, "PBSD-soft", "PBSD-reward", "PBSD-tilted")
METHODS = ("GRPO", "OPSD", "SDFT", *PBSD_METHODS)
BUDGETS = ("tokens", "time", "steps")
HEADLINE_BUDGET = "time"
BUDGET_LABELS = {"tokens": "equal generated tokens", "time": "equal training time", "steps": "equal optimizer steps"}


def is_pbsd(method: str) -> bool:
    """PBSDTrainer methods: teacher samples every step, PBSD's costs and the PBSD side of the verdicts."""
    return method in PBSD_METHODS


# Every method: learning rate x its own main knob, the same number of configurations each.
LEARNING_RATES = (1e-4, 3e-4)
# β scales the margin β·Δρ of sequence log-ratio differences, whose size differs per task: the β at which the
# median |margin| starts near 1 (the logistic loss's working range) is ≈0.03-0.07 on math and 0.3-0.5 on tool use.
# One grid for both tasks would leave the loss saturated on one of them or flat on the other, so β is per task.
PBSD_BETAS = {"math": (0.05, 0.1), "tool_use": (0.3, 0.5)}
KNOBS = {
    "GRPO": ("loss_type", ("dapo", "grpo")),  # TRL's default (token-level) vs the original sequence-level loss
    "OPSD": ("distillation_alpha", (0.0, 0.5)),  # forward KL (OPSD's scripts) vs JSD (OPSD's first release)
    "SDFT": ("distillation_alpha", (0.5, 1.0)),  # TRL's SDFT default vs reverse KL
    # β for every PBSD variant: it decides whether the loss saturates on a task, which a variant's own temperature
    # τ does not (τ only sets how strongly a reward difference is targeted), so τ stays fixed at 0.5
    **dict.fromkeys(PBSD_METHODS, ("pbsd_beta", PBSD_BETAS)),
}
# τ in reward units (rewards in [0, 1]): a correct-vs-wrong pair targets p = σ(1/0.5) = 0.88 with soft labels, and a
# correct teacher sample weighs e² ≈ 7.4 times a wrong one with tilted weights
REWARD_TEMPERATURE = 0.5
# Settings every configuration of a method shares (not tuned).
METHOD_FIXED = {
    "GRPO": {},
    "OPSD": {"distillation_mode": "full_logits", "teacher_model_kind": "base"},
    "SDFT": {"teacher_model_kind": "base"},  # TRL's SDFT loss defaults: topk_logits, top-100, IS clip 2
    "PBSD": {"teacher_model_kind": "base", "pair_labels": "role"},
    "PBSD-soft": {
        "teacher_model_kind": "base",
        "pairing": "union",
        "pair_labels": "soft",
        "reward_temperature": REWARD_TEMPERATURE,
    },
    "PBSD-reward": {"teacher_model_kind": "base", "pairing": "union", "pair_labels": "reward", "tie_policy": "drop"},
    "PBSD-tilted": {
        "teacher_model_kind": "base",
        "pair_labels": "role",
        "teacher_weighting": "tilted",
        "reward_temperature": REWARD_TEMPERATURE,
    },
}
# PBSD ablations, applied on top of the headline PBSD configuration. `pbsd_beta_scale` multiplies its β.
ABLATIONS = {
    "G_T=2, pairing=all": {"num_teacher_generations": 2, "pairing": "all"},
    "reward labels, ties dropped": {"pair_labels": "reward", "tie_policy": "drop"},
    "length-normalized (β x 40)": {"length_normalize": True, "pbsd_beta_scale": 40.0},
    "reward labels, ties dropped, G_T=2 all": {
        "pair_labels": "reward",
        "tie_policy": "drop",
        "num_teacher_generations": 2,
        "pairing": "all",
    },
    "SFT on teacher samples only": {"pbsd_loss_type": "teacher_sft"},
    "student-sample weight constant": {"pbsd_loss_type": "constant_student_weight"},
    # the objective optimized directly (KL-regularized policy gradient, teacher as reference): tells the objective
    # from its estimators
    "KL-regularized policy gradient": {
        "pbsd_loss_type": "kl_regularized_pg",
        "pairing": "union",
        "num_teacher_generations": 1,
    },
}
# The loss's diagnostic arms among the ablations, and what PBSD within seed spread of the arm means
DIAGNOSTIC_ARMS = {
    "SFT on teacher samples only": "PBSD-role behaves as SFT on teacher samples here",
    "student-sample weight constant": "PBSD-role's per-pair student weight σ(−m) makes no difference here",
    "KL-regularized policy gradient": "PBSD-role learns as well as the objective optimized directly here",
}
DESCRIPTIONS = {
    "GRPO": "`trl.GRPOTrainer`, accuracy reward, `beta=0`",
    "OPSD": "`trl.experimental.sdft.SDFTTrainer` as OPSD-style KL self-distillation: the task's privileged teacher "
    "prompt, base (frozen initial) teacher, `distillation_mode=full_logits` over the whole vocabulary",
    "SDFT": "`SDFTTrainer` with SDFT's loss defaults (`topk_logits`, top-100, IS clip 2), base teacher, the task's "
    "teacher prompt",
    "PBSD": "`pbsd_trl.PBSDTrainer`, `pair_labels=role` (paper, Eq. 10), base teacher, G_S = G_T = 8, matched pairs",
    "PBSD-soft": "`PBSDTrainer`, every two samples of a prompt paired (`pairing=union`), soft reward labels "
    f"σ(Δr/τ), τ = {REWARD_TEMPERATURE}: the reward-tilted teacher as optimum",
    "PBSD-reward": "`PBSDTrainer`, `pairing=union`, hard reward labels 1[r_a > r_b], every tie dropped",
    "PBSD-tilted": "`PBSDTrainer`, role labels with each teacher sample's pairs weighted by "
    f"G_T·softmax(r/τ) over the prompt's teacher samples, τ = {REWARD_TEMPERATURE}",
}
COLORS = {
    "base": "gray",
    "GRPO": "tab:blue",
    "OPSD": "tab:orange",
    "SDFT": "tab:purple",
    "PBSD": "tab:green",
    "PBSD-soft": "tab:olive",
    "PBSD-reward": "tab:red",
    "PBSD-tilted": "tab:cyan",
}
# CPU seconds per optimizer step and generated tokens per step measured by `benchmarks/learning.py` (2026-11-22,
# math, 8x8 samples, one thread); evaluation seconds per 100 problems x 8 samples. Used by `--plan` until stored
# runs measure them on this machine. tool_use: assumed equal until measured.
DEFAULT_COSTS = {
    "GRPO": {"seconds_per_step": 1.30, "tokens_per_step": 2660},
    "OPSD": {"seconds_per_step": 1.49, "tokens_per_step": 2670},
    "SDFT": {"seconds_per_step": 1.57, "tokens_per_step": 2660},
    "PBSD": {"seconds_per_step": 3.81, "tokens_per_step": 5300},
    "eval_seconds_per_100": 11.0,
    "run_overhead_seconds": 6.0,
}


# ----------------------------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------------------------


def config_name(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def knob_values(method: str, task: str, knobs=None) -> tuple[str, tuple]:
    """`method`'s tuned knob and its values on `task` (a knob's values are one tuple, or one per task)."""
    knob, values = (knobs or KNOBS)[method]
    return knob, tuple(values[task] if isinstance(values, dict) else values)


def tuning_grid(method: str, task: str, learning_rates=LEARNING_RATES, knobs=None) -> list[dict]:
    """The configurations of `method` on `task`: every learning rate x every value of its knob, in a fixed order."""
    knob, values = knob_values(method, task, knobs)
    return [{"learning_rate": lr, knob: value} for lr in learning_rates for value in values]


def ablation_config(headline: dict, overrides: dict) -> dict:
    config = dict(headline)
    overrides = dict(overrides)
    scale = overrides.pop("pbsd_beta_scale", None)
    config.update(overrides)
    if scale is not None:
        config["pbsd_beta"] = round(headline.get("pbsd_beta", 0.1) * scale, 6)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def eval_splits(task: str, num_val: int, num_test: int):
    """Validation rows `[0, num_val)` and test rows `[100, 100 + num_test)` of the task's 200 held-out problems.

    Raises `AssertionError` if a prompt appears in both (the held-out problems are distinct by construction, so this
    guards against a change of the generators).
    """
    from pbsd_trl.recipes.data.tasks import TASKS

    if not (1 <= num_val <= 100 and 1 <= num_test <= 100):
        raise ValueError(f"Each split holds at most 100 problems; got num_val={num_val}, num_test={num_test}.")
    full = TASKS[task].make_dataset("eval", 200, 0)
    val = full.select(range(num_val))
    test = full.select(range(100, 100 + num_test))
    check_disjoint(val, test)
    return val, test


def check_disjoint(val, test) -> None:
    overlap = {prompt_text(p) for p in val["prompt"]} & {prompt_text(p) for p in test["prompt"]}
    assert not overlap, f"validation and test splits share {len(overlap)} prompts, e.g. {sorted(overlap)[:3]}"


# ----------------------------------------------------------------------------------------------------------------
# Run keys and cache
# ----------------------------------------------------------------------------------------------------------------


def run_key(spec: dict) -> str:
    """Stable hash of a run's full specification (dict key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model_path: str) -> str:
    """`<task>-<sha256 of the weights, 12 hex>`: the same weights get the same run keys wherever they are stored
    (the shipped copy in the package or a cache build)."""
    manifest = Path(model_path) / "pbsd_trl_base.json"
    task = json.loads(manifest.read_text()).get("task", "model") if manifest.is_file() else "model"
    digest = hashlib.sha256((Path(model_path) / "model.safetensors").read_bytes()).hexdigest()[:12]
    return f"{task}-{digest}"


class RunCache:
    """One JSON file per finished run, written atomically, so that an interrupted benchmark resumes."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, spec: dict) -> Path:
        return self.root / spec["task"] / f"{run_key(spec)}.json"

    def get(self, spec: dict) -> dict | None:
        path = self.path(spec)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("spec") != json.loads(json.dumps(spec, default=str)):
            raise RuntimeError(f"{path}: stored specification differs from the requested one (hash collision?).")
        return record

    def put(self, spec: dict, record: dict) -> Path:
        path = self.path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**record, "spec": spec}, indent=1, default=str))
        os.replace(tmp, path)
        return path


# ----------------------------------------------------------------------------------------------------------------
# Budget accounting and evaluation schedule
# ----------------------------------------------------------------------------------------------------------------


class Clock:
    """Training time without evaluations: process CPU time (`cpu`) or wall time (`wall`)."""

    def __init__(self, kind: str = "cpu"):
        if kind not in ("cpu", "wall"):
            raise ValueError(f"clock must be 'cpu' or 'wall', got {kind!r}")
        self.kind = kind
        self._now = time.process_time if kind == "cpu" else time.perf_counter

    def now(self) -> float:
        return self._now()


class BudgetCounter:
    """Counts tokens, training time and steps from the trainers' logs; evaluates at budget points, on a token grid
    and on a step grid; the trainer callback of [`make_budget_callback`]."""

    def __init__(
        self,
        *,
        teacher_per_step: int,
        student_per_step: int,
        budgets: dict,
        stop: dict,
        eval_every_tokens: float | None,
        evaluate,
        clock: Clock,
        bar=None,
        history_keys=(),
        eval_every_steps: int | None = None,
    ):
        self.teacher_per_step, self.student_per_step = teacher_per_step, student_per_step
        self.budgets, self.stop, self.evaluate, self.clock, self.bar = budgets, stop, evaluate, clock, bar
        self.eval_every_tokens, self.eval_every_steps = eval_every_tokens, eval_every_steps
        self.tokens = self.student_tokens = self.teacher_tokens = 0.0
        self.eval_seconds = 0.0  # on `clock`
        self.eval_wall = 0.0
        self.start = clock.now()
        self.start_wall = time.perf_counter()
        self.points: list[dict] = []
        self.marks: dict[str, int] = {}
        self.next_eval = eval_every_tokens if eval_every_tokens else math.inf
        self.history_keys = tuple(history_keys)
        self.history: dict[str, list] = {k: [] for k in ("step", *history_keys)}

    def train_seconds(self):
        return self.clock.now() - self.start - self.eval_seconds

    def _count(self, step: int, logs: dict) -> None:
        student = logs["completions/mean_length"] * self.student_per_step
        teacher = 0.0
        if self.teacher_per_step:
            if "pbsd/teacher_completions/mean_length" not in logs:
                raise RuntimeError(f"no teacher completion lengths logged at step {step}")
            teacher = logs["pbsd/teacher_completions/mean_length"] * self.teacher_per_step
        self.student_tokens += student
        self.teacher_tokens += teacher
        self.tokens += student + teacher
        self.history["step"].append(step)
        for key in self.history_keys:
            self.history[key].append(logs.get(key))

    def _evaluate(self, model, step: int, train_seconds: float, due: list[str]) -> None:
        t0, w0 = self.clock.now(), time.perf_counter()
        report = self.evaluate(model)
        self.eval_seconds += self.clock.now() - t0
        self.eval_wall += time.perf_counter() - w0
        for b in due:
            self.marks[b] = len(self.points)
        self.points.append(
            {
                "step": step,
                "tokens": self.tokens,
                "student_tokens": self.student_tokens,
                "teacher_tokens": self.teacher_tokens,
                "train_seconds": train_seconds,
                "wall_seconds": time.perf_counter() - self.start_wall - self.eval_wall,
                "avg_at_8": report["avg_at_k"],
                "pass_at_8": report["pass_at_k"],
                "mean_completion_tokens": report["mean_completion_tokens"],
                "marks": due,
            }
        )
        while self.next_eval <= self.tokens + 1e-6:
            self.next_eval += self.eval_every_tokens

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        logs = logs or {}
        if "completions/mean_length" not in logs:
            return control
        self._count(state.global_step, logs)
        counters = {"tokens": self.tokens, "time": self.train_seconds(), "steps": state.global_step}
        due = [b for b, v in self.budgets.items() if b not in self.marks and counters[b] >= v - 1e-9]
        on_grid = self.tokens >= self.next_eval - 1e-6
        on_grid |= bool(self.eval_every_steps) and state.global_step % (self.eval_every_steps or 1) == 0
        if due or on_grid:
            self._evaluate(model, state.global_step, counters["time"], due)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                tok=f"{self.tokens / 1e3:.0f}k",
                s=f"{counters['time']:.0f}",
                avg8=f"{self.points[-1]['avg_at_8']:.3f}" if self.points else "-",
                refresh=False,
            )
        if all(counters[b] >= v - 1e-9 for b, v in self.stop.items()):
            control.should_training_stop = True
        return control


def make_budget_callback(**kwargs):
    """A `transformers.TrainerCallback` [`BudgetCounter`] (keyword arguments: its constructor's).

    `budgets`: `{"tokens": .., "time": .., "steps": ..}`: a point is evaluated (and marked with the budget's name) at
    the first step whose counter reaches each. `stop`: training stops once every counter has reached its value.
    `eval_every_tokens` / `eval_every_steps`: also evaluate on that grid.
    """
    from transformers import TrainerCallback

    return type("BudgetCallback", (BudgetCounter, TrainerCallback), {})(**kwargs)


HISTORY_KEYS = (
    "reward",
    "loss",
    "pbsd/margin",
    "pbsd/preference_accuracy",
    "pbsd/identical_frac",
    "pbsd/tie_frac",
    "pbsd/weight_reward_corr",
    "pbsd/log_ratio_teacher_samples",
    "pbsd/log_ratio_student_samples",
    "pbsd/student_reward",
    "pbsd/teacher_reward",
    "pbsd/kl_student_teacher",
)


# ----------------------------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------------------------


def trainer_args(task: str, method: str, config: dict, settings: dict, seed: int, output_dir: str):
    """The TRL / pbsd-trl config object of `method` with `config` (learning rate and method fields) on `task`."""
    from pbsd_trl.recipes.data.tasks import TASKS

    spec = TASKS[task]
    config = dict(config)
    common = budgeted_run_settings(
        output_dir,
        seed,
        settings["prompts_per_step"],
        settings["num_generations"],
        settings["max_completion_length"],
        config.pop("learning_rate"),
    )
    fields = {**METHOD_FIXED[method], **config}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if method in ("OPSD", "SDFT"):
            from trl.experimental.sdft import SDFTConfig

            return SDFTConfig(**common, teacher_prompt_template=spec.teacher_prompt_template, **fields)
        if method == "GRPO":
            from trl import GRPOConfig

            return GRPOConfig(**common, pad_to_multiple_of=16, **fields)
        if is_pbsd(method):
            from pbsd_trl import PBSDConfig

            return PBSDConfig(
                **common, pad_to_multiple_of=16, teacher_prompt_template=spec.teacher_prompt_template, **fields
            )
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


def build_trainer(
    task: str,
    method: str,
    config: dict,
    settings: dict,
    seed: int,
    model,
    tokenizer,
    train_dataset,
    output_dir: str,
    callbacks,
):
    """The real TRL / pbsd-trl trainer of `method` with `config` on `task` ([`trainer_args`])."""
    from pbsd_trl.recipes.data.tasks import TASKS

    args = trainer_args(task, method, config, settings, seed, output_dir)
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        if method in ("OPSD", "SDFT"):
            from trl.experimental.sdft import SDFTTrainer

            return SDFTTrainer(**kwargs)
        from trl import GRPOTrainer

        from pbsd_trl import PBSDTrainer

        trainer_class = PBSDTrainer if is_pbsd(method) else GRPOTrainer
        return trainer_class(reward_funcs=list(TASKS[task].reward_funcs), **kwargs)


def teacher_samples_per_step(method: str, config: dict, settings: dict) -> int:
    """Teacher completions generated per step: PBSD's G_T per prompt (G_S when unset), 0 for the other methods."""
    if not is_pbsd(method):
        return 0
    g_t = config.get("num_teacher_generations") or settings["num_generations"]
    return settings["prompts_per_step"] * g_t


# ----------------------------------------------------------------------------------------------------------------
# Context: models, data, evaluation
# ----------------------------------------------------------------------------------------------------------------


def task_settings(args, task: str) -> dict:
    """The settings every run of `task` shares (part of every run key)."""
    from pbsd_trl.recipes.data.tasks import TASKS

    return {
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length or TASKS[task].max_completion_length,
        "train_size": args.train_size,
        "eval_problems": args.eval_problems,
        "k": 8,
        "clock": args.clock,
    }


class TaskContext:
    def __init__(self, task: str, args):
        from pbsd_trl.recipes.data.tasks import TASKS
        from pbsd_trl.recipes.models import load_model_and_tokenizer
        from pbsd_trl.recipes.tiny import get_base_model

        self.task = task
        self.spec = TASKS[task]
        self.args = args
        if args.quick:  # a few warm-start steps of a test-size model: the smoke run must not build the real one
            self.model_path = smoke_base_model(task, args.output_dir)
        else:
            self.model_path = get_base_model(task)
        self.model_id = model_identity(self.model_path)
        self.load = lambda: load_model_and_tokenizer(self.model_path)
        self.val, self.test = eval_splits(task, args.eval_problems, args.eval_problems)
        self.rewards = list(self.spec.reward_funcs)
        self.settings = task_settings(args, task)

    def train_dataset(self, seed: int):
        return self.spec.make_dataset("train", self.settings["train_size"], seed)

    def evaluate(self, model, tokenizer, split: str, seed: int, with_privileged_context: bool = False) -> dict:
        from pbsd_trl.recipes.evaluate import evaluate_avg_at_k

        dataset = self.val if split == "val" else self.test
        return evaluate_avg_at_k(
            model,
            tokenizer,
            dataset,
            self.rewards,
            k=self.settings["k"],
            max_new_tokens=self.settings["max_completion_length"],
            temperature=1.0,
            seed=(20_000 if split == "val" else 10_000) + seed,
            with_privileged_context=with_privileged_context,
            teacher_prompt_template=self.spec.teacher_prompt_template,
            batch_size=32,
            progress_bar=False,
        )


def train_spec(
    ctx: TaskContext,
    method: str,
    config: dict,
    seed: int,
    split: str,
    budgets: dict,
    stop: dict,
    eval_every_tokens: float | None,
    eval_every_steps: int | None = None,
) -> dict:
    # `eval_every_steps` enters the key only where it is set: the stored runs without it keep their keys
    return {
        **({"eval_every_steps": eval_every_steps} if eval_every_steps else {}),
        "protocol": PROTOCOL_VERSION,
        "kind": "train",
        "task": ctx.task,
        "method": method,
        "config": config,
        "fixed": METHOD_FIXED[method],
        "seed": seed,
        "split": split,
        "budgets": budgets,
        "stop": stop,
        "eval_every_tokens": eval_every_tokens,
        "settings": ctx.settings,
        "model": ctx.model_id,
    }


def base_spec(ctx: TaskContext, seed: int, split: str, teacher: bool = False) -> dict:
    return {
        "protocol": PROTOCOL_VERSION,
        "kind": "teacher" if teacher else "base",
        "task": ctx.task,
        "seed": seed,
        "split": split,
        "settings": ctx.settings,
        "model": ctx.model_id,
    }


def execute_base(ctx: TaskContext, spec: dict) -> dict:
    model, tokenizer = ctx.load()
    report = ctx.evaluate(
        model, tokenizer, spec["split"], spec["seed"], with_privileged_context=spec["kind"] == "teacher"
    )
    return {"avg_at_8": report["avg_at_k"], "pass_at_8": report["pass_at_k"], "seconds": report["seconds"]}


def draw_teacher_pool(trainer, train_dataset, steps: int, folder: str, clock) -> tuple[str, float]:
    """The base teacher's pool for the rows of the run's first `steps` optimizer steps (the example scripts' default
    pool, `use_default_pool`), attached to `trainer`: its folder and build time."""
    from pbsd_trl.pool.reader import use_default_pool

    start = clock.now()
    max_steps = trainer.args.max_steps
    trainer.args.max_steps = steps  # the rows `rows_visited` covers; the budget callback still stops the run
    try:
        path = use_default_pool(trainer, train_dataset, pool_root=folder, say=lambda _message: None)
    finally:
        trainer.args.max_steps = max_steps
    if path is None:
        raise RuntimeError("the teacher pool does not apply to this run")
    return path, clock.now() - start


def pool_summary(path: str, steps: int, seconds: float) -> dict:
    from pbsd_trl.pool.build import load_teacher_pool

    pool, _ = load_teacher_pool(path)
    tokens = sum(len(c) for row in pool["completion_ids"] for c in row)
    return {"rows_of_steps": steps, "rows": len(pool), "tokens": tokens, "seconds": seconds}


def execute_train(ctx: TaskContext, spec: dict, desc: str) -> dict:
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, set_seed

    method, config, seed = spec["method"], spec["config"], spec["seed"]
    pooled = spec.get("teacher_pool")
    set_seed(seed)
    model, tokenizer = ctx.load()
    clock = Clock(ctx.settings["clock"])
    with tqdm(desc=desc, unit="step", dynamic_ncols=True, mininterval=5, leave=False) as bar:
        callback = make_budget_callback(
            # pool samples are not generated in the steps (their tokens are the pool's, counted once below)
            teacher_per_step=0 if pooled else teacher_samples_per_step(method, config, ctx.settings),
            student_per_step=ctx.settings["prompts_per_step"] * ctx.settings["num_generations"],
            budgets=spec["budgets"],
            stop=spec["stop"],
            eval_every_tokens=spec["eval_every_tokens"],
            eval_every_steps=spec.get("eval_every_steps"),
            evaluate=lambda m: ctx.evaluate(m, tokenizer, spec["split"], seed),
            clock=clock,
            bar=bar,
            history_keys=HISTORY_KEYS,
        )
        with tempfile.TemporaryDirectory(prefix=f"learning-{method}-") as tmp:
            train_dataset = ctx.train_dataset(seed)
            trainer = build_trainer(
                ctx.task, method, config, ctx.settings, seed, model, tokenizer, train_dataset, tmp, [callback]
            )
            trainer.remove_callback(PrinterCallback)
            # after the callback's clock started: the build is part of the run's training time
            pool = draw_teacher_pool(trainer, train_dataset, pooled["rows_of_steps"], tmp, clock) if pooled else None
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
            if pool:  # read back after training, outside the budget
                path, seconds = pool
                pool = pool_summary(path, pooled["rows_of_steps"], seconds)
    missing = [b for b in spec["budgets"] if b not in callback.marks]
    if missing:
        raise RuntimeError(f"{desc}: training stopped before the budget(s) {missing} were reached")
    return {
        "steps": trainer.state.global_step,
        "tokens": callback.tokens,
        "student_tokens": callback.student_tokens,
        "teacher_tokens": callback.teacher_tokens,
        "train_seconds": callback.train_seconds(),
        "wall_seconds": wall,
        "eval_seconds": callback.eval_wall,
        "points": callback.points,
        "marks": callback.marks,
        "history": callback.history,
        "load_average": _loadavg(),
        **({"teacher_pool": pool} if pool else {}),
    }


def run_machine() -> str:
    """What a stored run was measured on (its CPU seconds are comparable only with runs on the same machine type)."""
    import platform

    import torch

    desc = machine_description()
    cpu = desc.get("Model name") or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def machines_of_runs(cache_dir, tasks) -> dict:
    """Stored runs of `tasks` per machine (runs stored before machines were recorded count as `not recorded`)."""
    counts: dict[str, int] = {}
    for task in tasks:
        for path in sorted((Path(cache_dir) / task).glob("*.json")):
            machine = json.loads(path.read_text()).get("machine", "not recorded")
            counts[machine] = counts.get(machine, 0) + 1
    return counts


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Plan, estimate, execution
# ----------------------------------------------------------------------------------------------------------------


def budgets_of(args) -> dict:
    return {"tokens": float(args.budget_tokens), "time": float(args.budget_seconds), "steps": int(args.budget_steps)}


def tuning_specs(ctx, args) -> list[tuple[str, dict]]:
    budgets = budgets_of(args)
    out = []
    for method in args.methods:
        for config in tuning_grid(method, ctx.task, args.learning_rates):
            out.append(("tune", train_spec(ctx, method, config, args.seeds[0], "val", budgets, budgets, None)))
    return out


def test_spec(ctx, args, method, config, seed) -> dict:
    budgets = budgets_of(args)
    stop = dict(budgets)
    if seed == args.seeds[0]:
        stop["tokens"] = budgets["tokens"] * args.stability_factor
    return train_spec(ctx, method, config, seed, "test", budgets, stop, budgets["tokens"] / args.eval_points)


def ablation_specs(ctx, args, headline: dict) -> list[tuple[str, dict]]:
    budgets = budgets_of(args)
    out = []
    for name in args.ablations:
        config = ablation_config(headline, ABLATIONS[name])
        for seed in args.seeds:
            spec = train_spec(
                ctx, HEADLINE_PBSD, config, seed, "test", budgets, budgets, budgets["tokens"] / args.eval_points
            )
            out.append((f"ablation:{name}", spec))
    return out


def pooled_specs(ctx, args, config: dict, online_runs: list[dict]) -> list[dict]:
    """PBSD's time-selected `config` with a teacher pool, one run per online test run: time budget only, the pool
    covering the rows of the steps that online run reached at the time budget."""
    budget = {"time": args.budget_seconds}
    out = []
    for run in online_runs:
        mark = run.get("marks", {}).get("time")
        if mark is None:
            continue
        spec = train_spec(ctx, HEADLINE_PBSD, config, run["seed"], "test", budget, budget, None)
        spec["teacher_pool"] = {"rows_of_steps": run["points"][mark]["step"]}
        out.append(spec)
    return out


def long_steps(args, steps_at_tokens: int) -> int:
    """Optimizer steps of a long-horizon run: max(`--long_steps`, `--long_factor` x the token budget's steps)."""
    return max(int(args.long_steps), math.ceil(args.long_factor * steps_at_tokens))


def long_spec(ctx, args, method: str, config: dict, seed: int, steps_at_tokens: int) -> dict:
    """A long-horizon test run: stops at [`long_steps`] optimizer steps, evaluated every 1/`--long_eval_points` of
    them and at the end (the `steps` mark)."""
    n = long_steps(args, steps_at_tokens)
    every = max(1, math.ceil(n / args.long_eval_points))
    return train_spec(ctx, method, config, seed, "test", {"steps": n}, {"steps": n}, None, eval_every_steps=every)


def tokens_budget_steps(task_out: dict, method: str, seed: int) -> int | None:
    """Optimizer steps the `seed` test run of `method`'s headline-selected configuration took to the token budget
    (None until that run is stored): what a long-horizon run's length is a multiple of."""
    _, runs = test_result(task_out, method, HEADLINE_BUDGET)
    for run in runs:
        mark = run.get("marks", {}).get("tokens")
        if run["seed"] == seed and mark is not None:
            return int(run["points"][mark]["step"])
    return None


def budget_value(record: dict, budget: str) -> float | None:
    index = record.get("marks", {}).get(budget)
    return None if index is None else record["points"][index]["avg_at_8"]


def select(records: list[tuple[dict, dict]], budget: str) -> tuple[dict, float]:
    """Configuration with the best validation Avg@8 at `budget` (the first in grid order on a tie)."""
    best, best_value = None, -math.inf
    for spec, record in records:
        value = budget_value(record, budget)
        if value is not None and value > best_value:
            best, best_value = spec["config"], value
    if best is None:
        raise ValueError(f"no finished validation run reached the {budget} budget")
    return best, best_value


def measured_costs(cache_root: Path) -> dict:
    """Median CPU seconds per step, tokens per step and eval seconds per 100 problems of the stored runs."""
    per = {}
    for path in Path(cache_root).glob("*/*.json"):
        record = json.loads(path.read_text())
        spec = record["spec"]
        if spec.get("kind") != "train" or not record.get("steps") or spec.get("teacher_pool"):
            continue  # pooled runs count no teacher tokens per step and include a pool build
        if spec["config"].get("num_teacher_generations"):
            continue  # fewer teacher samples: cheaper steps than the G_T = G_S that `estimate_seconds` scales from
        entry = per.setdefault((spec["task"], spec["method"]), {"sps": [], "tps": [], "eval": []})
        entry["sps"].append(record["train_seconds"] / record["steps"])
        entry["tps"].append(record["tokens"] / record["steps"])
        if record["points"]:
            entry["eval"].append(
                record["eval_seconds"] / len(record["points"]) * 100 / spec["settings"]["eval_problems"]
            )
    return {
        key: {
            "seconds_per_step": statistics.median(v["sps"]),
            "tokens_per_step": statistics.median(v["tps"]),
            "eval_seconds_per_100": statistics.median(v["eval"]) if v["eval"] else None,
            "runs": len(v["sps"]),
        }
        for key, v in per.items()
    }


# `pairing="all"` / `"union"` add one no-grad scoring pass of every sample (the partner terms): assumed +10 % per
# step over matched PBSD until stored runs of the variant measure it
PARTNER_PASS_COST = 1.10


def step_costs(task: str, method: str, config: dict, costs: dict) -> tuple[float, float, float | None, str]:
    """(seconds per step, tokens per step, eval seconds per 100 problems or None, source) of a run: measured by the
    stored runs of (`task`, `method`), else for a PBSD variant by those of PBSD, else `DEFAULT_COSTS`."""
    measured = costs.get((task, method))
    source = "measured"
    scale = 1.0
    if measured is None and is_pbsd(method):
        measured = costs.get((task, HEADLINE_PBSD))
        source = "PBSD's"
        pairing = config.get("pairing", METHOD_FIXED[method].get("pairing", "matched"))
        scale = PARTNER_PASS_COST if pairing != "matched" else 1.0
    if measured is None:
        measured, source = DEFAULT_COSTS[HEADLINE_PBSD if is_pbsd(method) else method], "default"
    tps = measured["tokens_per_step"]
    if is_pbsd(method):  # measured with G_T = G_S = 8: the teacher's half of the tokens scales with G_T
        tps *= (8 + (config.get("num_teacher_generations") or 8)) / 16
    return measured["seconds_per_step"] * scale, tps, measured.get("eval_seconds_per_100"), source


def estimate_seconds(spec: dict, costs: dict) -> float:
    sps, tps, eval_s, _ = step_costs(spec["task"], spec["method"], spec["config"], costs)
    stop = spec["stop"]
    steps = max(
        math.ceil(stop.get("tokens", 0) / tps),
        math.ceil(stop.get("time", 0) / sps),
        stop.get("steps", 0),
    )
    n_evals = len(spec["budgets"]) + (
        stop.get("tokens", 0) / spec["eval_every_tokens"] if spec["eval_every_tokens"] else 0
    )
    if spec.get("eval_every_steps"):
        n_evals += steps / spec["eval_every_steps"]
    eval_s = eval_s or DEFAULT_COSTS["eval_seconds_per_100"]
    return (
        steps * sps
        + n_evals * eval_s * spec["settings"]["eval_problems"] / 100
        + DEFAULT_COSTS["run_overhead_seconds"]
    )


class Runner:
    def __init__(self, args, cache: RunCache):
        self.args = args
        self.cache = cache
        self.start = time.perf_counter()
        self.executed = 0
        self.skipped_for_time = 0
        self.errors: list[str] = []

    def out_of_time(self) -> bool:
        return self.args.max_minutes is not None and (time.perf_counter() - self.start) / 60 >= self.args.max_minutes

    def get(self, ctx, spec: dict, desc: str) -> dict | None:
        record = self.cache.get(spec)
        if record is not None:
            return record
        if self.out_of_time():
            self.skipped_for_time += 1
            return None
        t0 = time.perf_counter()
        try:
            result = execute_train(ctx, spec, desc) if spec["kind"] == "train" else execute_base(ctx, spec)
        except Exception as err:  # record, keep going with the other runs; errors are not cached
            import traceback

            traceback.print_exc()
            self.errors.append(f"{desc}: {type(err).__name__}: {err}")
            return None
        self.executed += 1
        result["machine"] = run_machine()
        self.cache.put(spec, result)
        print(
            f"[learning_tuned] {desc}: done in {time.perf_counter() - t0:.0f} s"
            + (f", {result['steps']} steps" if "steps" in result else "")
            + f"; elapsed {(time.perf_counter() - self.start) / 60:.1f} min",
            flush=True,
        )
        return result


def base_model_quality(model_path: str) -> dict:
    """The quality a shipped base model records in its manifest (`pbsd_trl.recipes.tiny.shipped.base_model_quality`);
    empty for a model without one (the smoke models of `--quick`)."""
    manifest = Path(model_path) / "pbsd_trl_base.json"
    return json.loads(manifest.read_text()).get("quality", {}) if manifest.is_file() else {}


def run_task(ctx: TaskContext, args, runner: Runner, progress) -> dict:
    """The whole protocol on one task; returns what the report needs (missing runs are absent, not invented)."""
    out = {
        "task": ctx.task,
        "model_path": display_path(ctx.model_path),
        "model_quality": base_model_quality(ctx.model_path),
        "settings": ctx.settings,
        "base": [],
        "tuning": {},
        "selected": {},
        "test": {},
        "ablations": {},
        "headline_pbsd": None,
        "pooled": None,
        "long": {},
    }
    for seed in args.seeds:
        rec = runner.get(ctx, base_spec(ctx, seed, "test"), f"{ctx.task} base seed {seed}")
        if rec:
            out["base"].append({"seed": seed, **rec})
    out["teacher"] = runner.get(ctx, base_spec(ctx, args.seeds[0], "test", teacher=True), f"{ctx.task} teacher view")
    run_tuning_stage(ctx, args, runner, progress, out)
    run_test_stage(ctx, args, runner, progress, out)
    if HEADLINE_PBSD in out["selected"] and args.pooled:
        run_pooled_stage(ctx, args, runner, progress, out)
    if HEADLINE_PBSD in out["selected"] and args.ablations:
        run_ablation_stage(ctx, args, runner, progress, out)
    if args.long_seeds:
        run_long_stage(ctx, args, runner, progress, out)
    return out


def run_tuning_stage(ctx, args, runner, progress, out: dict) -> None:
    """Every grid configuration on validation; a method's selection only over its complete grid."""
    tuned = {m: [] for m in args.methods}
    for _, spec in tuning_specs(ctx, args):
        desc = f"{ctx.task} tune {spec['method']} {config_name(spec['config'])}"
        rec = runner.get(ctx, spec, desc)
        progress.update(1)
        if rec:
            tuned[spec["method"]].append((spec, rec))
    for method, records in tuned.items():
        out["tuning"][method] = [
            {
                "config": s["config"],
                "val": {b: budget_value(r, b) for b in BUDGETS},
                "steps": r["steps"],
                "tokens": r["tokens"],
                "train_seconds": r["train_seconds"],
            }
            for s, r in records
        ]
        if len(records) < len(tuning_grid(method, ctx.task, args.learning_rates)):
            continue  # selection only over the complete grid: the equal tuning budget
        out["selected"][method] = {b: select(records, b) for b in BUDGETS}


def run_test_stage(ctx, args, runner, progress, out: dict) -> None:
    """Each method's configuration selected at each budget (each distinct one once) on the test seeds."""
    for method, per_budget in out["selected"].items():
        configs = []
        for b in BUDGETS:
            if per_budget[b][0] not in configs:
                configs.append(per_budget[b][0])
        for config in configs:
            runs = []
            for seed in args.seeds:
                spec = test_spec(ctx, args, method, config, seed)
                rec = runner.get(ctx, spec, f"{ctx.task} test {method} {config_name(config)} seed {seed}")
                progress.update(1)
                if rec:
                    runs.append({"seed": seed, **rec})
            out["test"].setdefault(method, []).append({"config": config, "runs": runs})


def run_pooled_stage(ctx, args, runner, progress, out: dict) -> None:
    config, online = test_result(out, HEADLINE_PBSD, "time")
    entry = out["pooled"] = {"config": config, "runs": []}
    for spec in pooled_specs(ctx, args, config, online):
        rec = runner.get(ctx, spec, f"{ctx.task} test PBSD {config_name(config)} pool seed {spec['seed']}")
        progress.update(1)
        if rec:
            entry["runs"].append({"seed": spec["seed"], **rec})


def run_ablation_stage(ctx, args, runner, progress, out: dict) -> None:
    headline = out["selected"][HEADLINE_PBSD][HEADLINE_BUDGET][0]
    out["headline_pbsd"] = headline
    for label, spec in ablation_specs(ctx, args, headline):
        name = label.split(":", 1)[1]
        rec = runner.get(ctx, spec, f"{ctx.task} ablation {name} seed {spec['seed']}")
        progress.update(1)
        entry = out["ablations"].setdefault(name, {"config": spec["config"], "runs": []})
        if rec:
            entry["runs"].append({"seed": spec["seed"], **rec})


def run_long_stage(ctx, args, runner, progress, out: dict) -> None:
    """Each method's headline-selected configuration for the long horizon on `--long_seeds` (a method waits for its
    first test seed, whose token-budget steps set the length)."""
    for method, per_budget in out["selected"].items():
        config = per_budget[HEADLINE_BUDGET][0]
        steps_at_tokens = tokens_budget_steps(out, method, args.seeds[0])
        entry = out["long"][method] = {"config": config, "steps": None, "runs": []}
        if steps_at_tokens is None:
            continue
        entry["steps"] = long_steps(args, steps_at_tokens)
        for seed in args.long_seeds:
            spec = long_spec(ctx, args, method, config, seed, steps_at_tokens)
            rec = runner.get(ctx, spec, f"{ctx.task} long {method} {config_name(config)} seed {seed}")
            progress.update(1)
            if rec:
                entry["runs"].append({"seed": seed, **rec})


def planned_run_count(args) -> int:
    tuning = sum(len(tuning_grid(m, t, args.learning_rates)) for m in args.methods for t in args.tasks)
    per_method = len(args.seeds) + len(args.long_seeds)  # at least one selected configuration per method
    headline = HEADLINE_PBSD in args.methods
    per_pbsd = len(args.ablations) * len(args.seeds) + (len(args.seeds) if args.pooled else 0)
    return tuning + len(args.tasks) * (len(args.methods) * per_method + (per_pbsd if headline else 0))


class _PlanContext:
    """Enough of a [`TaskContext`] to build specifications without loading a model."""

    def __init__(self, task: str, args):
        self.task = task
        self.model_id = f"{task}-(base model)"
        self.settings = task_settings(args, task)


def plan_task(args, task: str, costs: dict) -> tuple[list[str], float, float]:
    """The plan's table rows of `task` and its minimum and maximum estimated minutes."""
    ctx = _PlanContext(task, args)
    tune = [s for _, s in tuning_specs(ctx, args)]
    firsts = {m: tuning_grid(m, task, args.learning_rates)[0] for m in args.methods}
    test = [test_spec(ctx, args, m, firsts[m], s) for m in args.methods for s in args.seeds]
    has_pbsd = HEADLINE_PBSD in args.methods
    headline = firsts.get(HEADLINE_PBSD)
    abl = [s for _, s in ablation_specs(ctx, args, headline)] if has_pbsd else []
    online = [{"seed": s, "marks": {"time": 0}, "points": [{"step": 0}]} for s in args.seeds]
    pooled = pooled_specs(ctx, args, headline, online) if has_pbsd and args.pooled else []
    long, long_lengths = [], []
    for m in args.methods:
        tps = step_costs(task, m, firsts[m], costs)[1]
        steps_at_tokens = math.ceil(args.budget_tokens / tps)
        long_lengths.append(f"{m} {long_steps(args, steps_at_tokens)}")
        long += [long_spec(ctx, args, m, firsts[m], s, steps_at_tokens) for s in args.long_seeds]
    t_tune, t_test, t_abl, t_pool, t_long = (
        sum(estimate_seconds(s, costs) for s in group) / 60 for group in (tune, test, abl, pooled, long)
    )
    n_arms = len([a for a in args.ablations if a in DIAGNOSTIC_ARMS])
    rows = [
        f"| {task} | tuning (validation, seed {args.seeds[0]}; {len(args.methods)} methods) | {len(tune)} "
        f"| {t_tune:.0f} |",
        f"| {task} | test ({len(args.seeds)} seeds; 1-3 configurations per method) | {len(test)}-{3 * len(test)} "
        f"| {t_test:.0f}-{3 * t_test:.0f} |",
        f"| {task} | PBSD ablations ({n_arms} of them diagnostic arms) | {len(abl)} | {t_abl:.0f} |",
        f"| {task} | PBSD with a teacher pool (time budget) | {len(pooled)} | {t_pool:.0f} |",
        f"| {task} | long horizon (seeds {list(args.long_seeds)}; steps: {', '.join(long_lengths)}) | {len(long)} "
        f"| {t_long:.0f} |",
    ]
    fixed = t_tune + t_abl + t_pool + t_long
    return rows, fixed + t_test, fixed + 3 * t_test


def plan(args, cache_root: Path) -> str:
    """Text of the run plan with the time estimate: tuning, ablation and long-horizon runs exactly, test runs for
    one selected configuration per method (the minimum) and for three (the maximum: a different selection at every
    budget). Long-horizon lengths use the estimated steps to the token budget (the run uses the measured ones)."""
    costs = measured_costs(cache_root)
    lines = ["| task | stage | runs | estimated minutes |", "|---|---|---|---|"]
    total_min = total_max = 0.0
    for task in args.tasks:
        rows, t_min, t_max = plan_task(args, task, costs)
        lines += rows
        total_min, total_max = total_min + t_min, total_max + t_max
    lines.append(f"| all | | | {total_min:.0f}-{total_max:.0f} |")
    grids = [
        f"- {task}: " + "; ".join(f"{m} {grid_text(m, task, args.learning_rates)}" for m in args.methods)
        for task in args.tasks
    ]
    source = (
        ", ".join(
            f"{t}/{m}: {c['seconds_per_step']:.2f} s/step, {c['tokens_per_step']:.0f} tok/step ({c['runs']} runs)"
            for (t, m), c in sorted(costs.items())
        )
        or "none stored yet: DEFAULT_COSTS"
    )
    unmeasured = sorted({(t, m) for t in args.tasks for m in args.methods} - set(costs))
    sessions = math.ceil(total_max / 170)
    return "\n".join(lines) + (
        "\n\nGrids (learning_rate x knob):\n"
        + "\n".join(grids)
        + f"\n\nPer-step costs used: {source}."
        + (
            "\nNot measured yet (PBSD variants: PBSD's cost, x"
            f"{PARTNER_PASS_COST} with union/all pairing; others: DEFAULT_COSTS): "
            + ", ".join(f"{t}/{m}" for t, m in unmeasured)
            + "."
            if unmeasured
            else ""
        )
        + f"\nAt most {sessions} sessions of 170 minutes with `--max_minutes 170` (the cache resumes where a session "
        "stopped)."
    )


def grid_text(method: str, task: str, learning_rates) -> str:
    knob, values = knob_values(method, task)
    return f"learning_rate in {list(learning_rates)} x `{knob}` in {list(values)}"


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(m, s):
    return "–" if m is None or math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def test_values(runs: list[dict], budget: str) -> list[float]:
    return [v for v in (budget_value(r, budget) for r in runs) if v is not None]


def test_result(task_out: dict, method: str, budget: str) -> tuple[dict | None, list[dict]]:
    if method not in task_out["selected"]:
        return None, []
    config = task_out["selected"][method][budget][0]
    for entry in task_out["test"].get(method, []):
        if entry["config"] == config:
            return config, entry["runs"]
    return config, []


def _counter(runs, budget, key):
    values = [r["points"][r["marks"][budget]][key] for r in runs if budget in r.get("marks", {})]
    return statistics.fmean(values) if values else float("nan")


DIAGNOSTIC_WINDOW = 10  # optimizer steps averaged at the start and at the end of a run's headline budget
DIAGNOSTIC_KEYS = {  # logged key: (column, what it is)
    "reward": ("reward", "training reward (student samples)"),
    "pbsd/teacher_reward": ("teacher reward", "reward of the teacher samples"),
    "pbsd/log_ratio_student_samples": ("ρ student", "log-ratio of student samples, log π/π_T (nats)"),
    "pbsd/log_ratio_teacher_samples": ("ρ teacher", "log-ratio of teacher samples (nats)"),
    "pbsd/margin": ("margin", "β·(ρ of the preferred − ρ of the other sample)"),
    "pbsd/preference_accuracy": ("pref. acc.", "pairs ordered as their target says, of the informative pairs"),
    "pbsd/identical_frac": ("identical", "pairs of two equal sequences (margin 0, no gradient), of all pairs"),
    "pbsd/tie_frac": ("ties", "equal-reward pairs, of the pairs with both samples scored"),
    "pbsd/weight_reward_corr": (
        "w–r corr.",
        "Pearson correlation of a pair's gradient weight σ(−m) with the reward gap of its preferred sample",
    ),
}


def training_diagnostics(runs: list[dict], budget: str) -> dict:
    """Per logged metric: its mean over the first and over the last `DIAGNOSTIC_WINDOW` steps before `budget` (each
    half of the run when it is shorter than two windows), averaged over the runs."""
    out = {}
    for key in DIAGNOSTIC_KEYS:
        first, last = [], []
        for r in runs:
            history = r.get("history") or {}
            values, steps = history.get(key), history.get("step")
            mark = r.get("marks", {}).get(budget)
            if not values or not steps or mark is None:
                continue
            end = r["points"][mark]["step"]
            # NaN: a step without such pairs (no tie possible, no informative pair)
            upto = [v for st, v in zip(steps, values, strict=True) if st <= end and v is not None and v == v]
            window = min(DIAGNOSTIC_WINDOW, len(upto) // 2)  # two disjoint windows, halves of a short run
            if window >= 2:
                first.append(statistics.fmean(upto[:window]))
                last.append(statistics.fmean(upto[-window:]))
        if first:
            out[key] = (statistics.fmean(first), statistics.fmean(last), len(first))
    return out


def pooled_runs(task_out: dict) -> list[dict]:
    """PBSD's time-budget runs with the teacher pool ([] where none ran)."""
    return (task_out.get("pooled") or {}).get("runs") or []


def pbsd_time_execution(task_out: dict) -> tuple[str, list[dict]]:
    """PBSD's test runs at the time budget in its faster exact execution: online, or with the teacher pool where
    those runs (as many seeds) reached more optimizer steps in the budget on average."""
    _, online = test_result(task_out, HEADLINE_PBSD, "time")
    pooled = pooled_runs(task_out)
    if pooled and len(pooled) >= len(online) and _counter(pooled, "time", "step") > _counter(online, "time", "step"):
        return "teacher pool", pooled
    return "online", online


def verdict_peers(pbsd: str, methods) -> list[str]:
    """Whom a PBSD method is compared with: every non-PBSD method, and for a reward-aware variant also the paper's
    PBSD (the question the variant asks)."""
    peers = [m for m in methods if not is_pbsd(m)]
    return peers + ([HEADLINE_PBSD] if pbsd != HEADLINE_PBSD and HEADLINE_PBSD in methods else [])


def verdicts(task_out: dict, methods, budget: str, pbsd: str = HEADLINE_PBSD) -> dict:
    """The PBSD method `pbsd` vs each of its peers at `budget` ([`verdict_peers`]): (`beat`/`tied`/`lost` or
    `pending`, Δ mean, std sum, Welch p); the paper's PBSD at the time budget vs a non-PBSD peer in its faster
    execution ([`pbsd_time_execution`]), vs a variant online (as the variant ran)."""
    own = test_result(task_out, pbsd, budget)[1]
    if pbsd == HEADLINE_PBSD and budget == "time":
        own = pbsd_time_execution(task_out)[1]
    ours = test_values(own, budget)
    out = {}
    for m in verdict_peers(pbsd, methods):
        peer = test_values(test_result(task_out, m, budget)[1], budget)
        if len(ours) < 2 or len(peer) < 2:
            out[m] = ("pending", None, None, None)
        else:
            word, diff = verdict(ours, peer)
            out[m] = (word, diff, mean_std(ours)[1] + mean_std(peer)[1], welch(ours, peer)[1])
    return out


def within_seed_spread(a: list[float], b: list[float]) -> bool | None:
    """Whether two sets of seed scores are indistinguishable here: mean ± std intervals overlap or Welch p ≥ 0.05
    (None with fewer than 2 seeds on a side)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return verdict(a, b)[0] == "tied" or welch(a, b)[1] >= 0.05


def arm_judgements(task_out: dict) -> dict:
    """Per diagnostic arm that ran: {budget: (within seed spread or None, PBSD scores, arm scores)}, PBSD's runs
    online (as the arms ran)."""
    out = {}
    for name in DIAGNOSTIC_ARMS:
        entry = task_out.get("ablations", {}).get(name)
        if not entry:
            continue
        out[name] = {}
        for b in BUDGETS:
            ours = test_values(test_result(task_out, HEADLINE_PBSD, b)[1], b)
            arm = test_values(entry["runs"], b)
            out[name][b] = (within_seed_spread(ours, arm), ours, arm)
    return out


def long_summary(runs: list[dict]) -> dict | None:
    """Best, end and end − best test Avg@8 of long-horizon runs, each as (mean, std), and the mean best step."""
    runs = [r for r in runs if r.get("points")]
    if not runs:
        return None
    best = [max(p["avg_at_8"] for p in r["points"]) for r in runs]
    end = [r["points"][-1]["avg_at_8"] for r in runs]
    best_step = [max(r["points"], key=lambda p: p["avg_at_8"])["step"] for r in runs]
    return {
        "best": mean_std(best),
        "end": mean_std(end),
        "gap": mean_std([e - b for e, b in zip(end, best, strict=True)]),
        "best_step": statistics.fmean(best_step),
        "end_step": statistics.fmean(r["points"][-1]["step"] for r in runs),
        "n": len(runs),
    }


def write_report(path: Path, payload: dict, plots: dict) -> None:
    a = payload["config"]
    lines = report_head(payload) + task_table_lines(payload) + protocol_lines(payload) + verdict_summary_lines(payload)
    for task_out in payload["tasks"]:
        lines += task_lines(task_out, a, plots)
    if plots.get("summary"):
        name = plots["summary"].name
        lines += [
            "## Summary",
            "",
            f"![summary]({name})",
            "",
            f"`{name}`: test Avg@8 (mean ± std over seeds) of each method's {HEADLINE_BUDGET}-selected configuration "
            "against training seconds; solid: the test runs, dashed: the long-horizon runs.",
            "",
        ]
    if (path.parent / "learning_diagnosis.md").is_file():
        lines += [
            "## Diagnosis of the early reward dip",
            "",
            "Measured separately by `benchmarks/learning_diagnosis.py` (validation problems only): see "
            "[learning_diagnosis.md](learning_diagnosis.md).",
            "",
        ]
    if payload["errors"]:
        lines += ["## Errors", "", *[f"- {e}" for e in payload["errors"]], ""]
    lines += [
        "## Raw data",
        "",
        f"`{a['cache_dir']}/<task>/<key>.json`: one file per run (specification, every "
        "evaluation point, per-step training metrics).",
        "",
    ]
    path.write_text("\n".join(lines))


def report_head(payload: dict) -> list[str]:
    a = payload["config"]
    lines = [
        "# Tuned learning benchmark: GRPO vs OPSD vs SDFT vs PBSD at equal tokens, time and steps",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Started {payload['started']}; this invocation ran {payload['executed']} new runs in "
        f"{payload['total_seconds'] / 60:.1f} min (stored runs are reused from `{a['cache_dir']}`)."
        + (" **--quick smoke run on test-size models: the numbers mean nothing.**" if a["quick"] else ""),
        "",
    ]
    if payload["partial"]:
        lines += [f"**PARTIAL REPORT**: {payload['partial']} Rerun the same command to resume; missing cells say `–`."]
        lines.append("")
    return lines + [
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in payload["machine"].items()],
        "- stored runs by machine: "
        + "; ".join(f"{m}: {n}" for m, n in machines_of_runs(a["cache_dir"], a["tasks"]).items())
        + " (CPU seconds, hence the `time` budget, compare only within one machine type)",
        "",
    ]


def task_table_lines(payload: dict) -> list[str]:
    """Per task: what its base model's manifest records (test rows, 80 new tokens) and what this benchmark measured
    with its own completion budget, so a budget that cuts right completions shows as a gap between the two."""
    rows = []
    for task_out in payload["tasks"]:
        q, budget = task_out.get("model_quality", {}), task_out.get("settings", {}).get("max_completion_length", "–")
        base = mean_std([r["avg_at_8"] for r in task_out["base"]]) if task_out["base"] else None
        teacher = (task_out.get("teacher") or {}).get("avg_at_8")

        def fmt(value, spec=".3f"):
            return "–" if value is None else format(value, spec)

        rows.append(
            f"| {task_out['task']} | {fmt(q.get('teacher_avg_at_8_test'))} | {fmt(q.get('student_avg_at_8_test'))} | "
            f"{fmt(q.get('teacher_self_log_prob_test'), '.2f')} | {fmt(q.get('teacher_mean_completion_tokens'), '.1f')}"
            f" / {fmt(q.get('student_mean_completion_tokens'), '.1f')} | {budget} | {fmt(teacher)} | "
            f"{'–' if base is None else format(base[0], '.3f')} |"
        )
    return [
        "## The tasks",
        "",
        "Test Avg@8 of the teacher view (base model + privileged context) and the student view, the teacher's mean "
        "log-probability of its own samples (nats per sequence) and the mean completion length, as the base model's "
        "manifest records them (80 new tokens; [tasks.md](tasks.md)), then both views as this benchmark measured "
        "them with its completion budget.",
        "",
        "| task | teacher Avg@8 | student Avg@8 | teacher self-log-prob | completion tokens (teacher / student) | "
        "budget (tokens) | teacher Avg@8, budget | student Avg@8, budget |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def protocol_lines(payload: dict) -> list[str]:
    a = payload["config"]
    lines = [
        "## Protocol",
        "",
        f"- Tasks: {', '.join(a['tasks'])}. Splits: validation = held-out rows 0-{a['eval_problems'] - 1}, test = "
        f"rows 100-{99 + a['eval_problems']} (asserted disjoint); Avg@8 at temperature 1.",
        f"- Shared settings: {a['prompts_per_step']} prompts x {a['num_generations']} samples per step, constant "
        f"learning rate, AdamW, full fine-tuning of the built-in tiny base model, {a['train_size']} training "
        f"problems drawn with the run's seed.",
        f"- Budgets: tokens {a['budget_tokens']:,} generated completion tokens (PBSD's teacher samples count); "
        f"time {a['budget_seconds']:.0f} s of training ({a['clock']} clock, evaluations excluded); steps "
        f"{a['budget_steps']} optimizer steps.",
        f"- Tuning: {len(a['learning_rates'])} learning rates {list(a['learning_rates'])} x the method's knob, "
        f"selected on validation with seed {a['seeds'][0]}; test seeds {a['seeds']}; stability: seed "
        f"{a['seeds'][0]} to {a['stability_factor']}x the token budget.",
        f"- Long horizon: each method's {HEADLINE_BUDGET}-selected configuration for max({a['long_steps']}, "
        f"{a['long_factor']}x its first test seed's steps to the token budget) optimizer steps on seeds "
        f"{a['long_seeds']}, test Avg@8 every 1/{a['long_eval_points']} of the run.",
        "- Execution: every trainer generates with HF `generate` in the training loop; PBSD samples its teacher in "
        "every step, and at the time budget also runs with a teacher-sample pool (its fastest exact mode with the "
        "base teacher: K = G_T samples for the rows of as many steps as the online run of the seed reached, drawn "
        "inside the run, so the build is training time; later rows sample the teacher online). The time verdicts "
        "use whichever PBSD execution reached more optimizer steps; the `steps` and `train s` columns give each "
        "method's cost per step.",
        "- Verdict: `beat`/`lost` when |Δ mean| > std(PBSD) + std(peer) (sample std over seeds), else `tied`; "
        "Welch's two-sided p-value alongside (3 seeds each: low power). Every PBSD method is compared with every "
        "non-PBSD method, each reward-aware variant also with the paper's PBSD.",
        "",
        "Grids (every method the same number of configurations), per task:",
        "",
    ]
    for task in a["tasks"]:
        lines.append(f"- `{task}`:")
        for m in a["methods"]:
            lines.append(f"  - `{m}`: {grid_text(m, task, a['learning_rates'])}; fixed {METHOD_FIXED[m] or '{}'}")
    lines += ["", "Methods:", "", *[f"- `{m}`: {DESCRIPTIONS[m]}" for m in a["methods"]], ""]
    return lines


def verdict_summary_lines(payload: dict) -> list[str]:
    a = payload["config"]
    pbsd_methods = [m for m in a["methods"] if is_pbsd(m)]
    if not pbsd_methods or len(a["methods"]) < 2:
        return []
    lines = [
        "## Verdicts: each PBSD method vs each tuned peer (test, beyond seed spread)",
        "",
        "| task | PBSD method | " + " | ".join(BUDGET_LABELS[b] for b in BUDGETS) + " |",
        "|---|---|---|---|---|",
    ]
    for task_out in payload["tasks"]:
        for pbsd in pbsd_methods:
            cells = []
            for b in BUDGETS:
                per_peer = verdicts(task_out, a["methods"], b, pbsd)
                cells.append(
                    ", ".join(
                        f"vs {m} {word}" + ("" if diff is None else f" ({diff:+.3f}, p={pv:.3f})")
                        for m, (word, diff, _, pv) in per_peer.items()
                    )
                    or "–"
                )
            lines.append(f"| {task_out['task']} | {pbsd} | " + " | ".join(cells) + " |")
    return lines + [""]


def task_lines(task_out: dict, a: dict, plots: dict) -> list[str]:
    t = task_out["task"]
    lines = [f"## Task `{t}`", "", f"Base model `{task_out['model_path']}`."]
    if task_out["base"]:
        bm, bs = mean_std([b["avg_at_8"] for b in task_out["base"]])
        lines.append(f"Untrained base model on test: Avg@8 {_fmt(bm, bs)} (evaluation seeds).")
    if task_out.get("teacher"):
        lines.append(
            f"Teacher view (base model + privileged context) on test: Avg@8 {task_out['teacher']['avg_at_8']:.3f}."
        )
    lines += ["", "Grid on this task:", ""]
    lines += [f"- `{m}`: {grid_text(m, t, a['learning_rates'])}" for m in a["methods"]] + [""]
    for budget in BUDGETS:
        lines += budget_lines(task_out, a, budget)
    lines += validation_lines(task_out, a)
    lines += ablation_lines(task_out)
    lines += stability_lines(task_out, a)
    lines += long_lines(task_out, a, plots.get("long", {}).get(t))
    lines += diagnostics_lines(task_out, a)
    curves = plots.get("curves", {}).get(t)
    if curves:
        lines += [
            f"![{t} curves]({curves.name})",
            "",
            f"`{curves.name}`: test Avg@8 (mean ± std over seeds; x at 0: the untrained model) of each method's "
            "configuration selected for the budget of the panel, against that budget's counter; dashed: the "
            f"budget. Right: the stability run of the {HEADLINE_BUDGET}-selected configurations.",
            "",
        ]
    return lines


def budget_lines(task_out: dict, a: dict, budget: str) -> list[str]:
    """One budget's table of the selected configurations on test, its pool note and its verdicts."""
    t = task_out["task"]
    lines = [
        f"### {t}: {BUDGET_LABELS[budget]}",
        "",
        "| method | selected configuration | val Avg@8 | test Avg@8 (mean ± std) | per seed | tokens | steps "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in a["methods"]:
        config, runs = test_result(task_out, m, budget)
        if config is None:
            lines.append(f"| {m} | – (tuning incomplete) | – | – | – | – | – | – |")
            continue
        rows = [(m, runs)]
        if m == HEADLINE_PBSD and budget == "time" and pooled_runs(task_out):
            rows.append(("PBSD, teacher pool", pooled_runs(task_out)))
        for label, runs in rows:
            vals = test_values(runs, budget)
            mv, sv = mean_std(vals)
            lines.append(
                f"| {label} | {config_name(config)} | {task_out['selected'][m][budget][1]:.3f} | {_fmt(mv, sv)} "
                f"(n={len(vals)}) | {', '.join(f'{v:.3f}' for v in vals) or '–'} | "
                f"{_counter(runs, budget, 'tokens'):,.0f} | {_counter(runs, budget, 'step'):.0f} | "
                f"{_counter(runs, budget, 'train_seconds'):.0f} |"
            )
    pool_runs = pooled_runs(task_out) if budget == "time" else []
    if pool_runs:
        execution, _ = pbsd_time_execution(task_out)
        build = statistics.fmean(r["teacher_pool"]["seconds"] for r in pool_runs)
        pool_tokens = statistics.fmean(r["teacher_pool"]["tokens"] for r in pool_runs)
        lines += [
            "",
            f"`PBSD, teacher pool`: the pool's build ({build:.0f} s, {pool_tokens:,.0f} teacher tokens for the "
            f"rows of {statistics.fmean(r['teacher_pool']['rows_of_steps'] for r in pool_runs):.0f} steps, "
            "mean over seeds) is inside `train s`; `tokens` counts the student's. The verdicts of PBSD vs the "
            f"non-PBSD methods use PBSD **{execution}** (more optimizer steps in the budget).",
        ]
    lines += ["", "| PBSD method | vs | Δ mean | std sum | Welch p | verdict |", "|---|---|---|---|---|---|"]
    for pbsd in (m for m in a["methods"] if is_pbsd(m)):
        for m, (word, diff, std_sum, pv) in verdicts(task_out, a["methods"], budget, pbsd).items():
            if diff is None:
                lines.append(f"| {pbsd} | {m} | – | – | – | pending (fewer than 2 seeds) |")
            else:
                lines.append(f"| {pbsd} | {m} | {diff:+.3f} | {std_sum:.3f} | {pv:.3f} | {word} |")
    return lines + [""]


def validation_lines(task_out: dict, a: dict) -> list[str]:
    lines = [
        f"### {task_out['task']}: validation scores of every configuration (seed {a['seeds'][0]})",
        "",
        "| method | configuration | tokens budget | time budget | steps budget | steps run |",
        "|---|---|---|---|---|---|",
    ]
    for m, rows in task_out["tuning"].items():
        for row in rows:
            cells = " | ".join("–" if row["val"][b] is None else f"{row['val'][b]:.3f}" for b in BUDGETS)
            lines.append(f"| {m} | {config_name(row['config'])} | {cells} | {row['steps']} |")
    return lines + [""]


def ablation_lines(task_out: dict) -> list[str]:
    """The ablation table and, per diagnostic arm, whether PBSD is within seed spread of it."""
    if not task_out["ablations"]:
        return []
    t, head = task_out["task"], task_out["headline_pbsd"]
    lines = [
        f"### {t}: PBSD ablations (on the {HEADLINE_BUDGET}-budget PBSD configuration "
        f"{config_name(head)}; test, mean ± std)",
        "",
        "| variant | " + " | ".join(BUDGET_LABELS[b] for b in BUDGETS) + " | Welch p vs headline (time) |",
        "|---|---|---|---|---|",
    ]
    _, head_runs = test_result(task_out, HEADLINE_PBSD, HEADLINE_BUDGET)
    for name, entry in task_out["ablations"].items():
        cells = [
            f"{_fmt(*mean_std(vals))} (n={len(vals)})" if vals else "–"
            for vals in (test_values(entry["runs"], b) for b in BUDGETS)
        ]
        p = test_values(entry["runs"], HEADLINE_BUDGET)
        q = test_values(head_runs, HEADLINE_BUDGET)
        pv = f"{welch(p, q)[1]:.3f} ({verdict(p, q)[0]})" if len(p) > 1 and len(q) > 1 else "–"
        lines.append(f"| {name} | {' | '.join(cells)} | {pv} |")
    lines.append("")
    judgements = arm_judgements(task_out)
    if judgements:
        lines += [
            f"Diagnostic arms (PBSD-role = the paper's PBSD, online; within seed spread: mean ± std overlap or "
            f"Welch p ≥ 0.05; judged at the {HEADLINE_BUDGET} budget, the others in parentheses):",
            "",
        ]
    for name, per_budget in judgements.items():
        within, ours, arm = per_budget[HEADLINE_BUDGET]
        others = ", ".join(
            f"{b}: " + {True: "within", False: "outside", None: "pending"}[per_budget[b][0]]
            for b in BUDGETS
            if b != HEADLINE_BUDGET
        )
        scores = f"PBSD-role {_fmt(*mean_std(ours))} vs arm {_fmt(*mean_std(arm))}"
        if within is None:
            lines.append(f"- {name}: pending (fewer than 2 seeds) ({others}).")
        elif within:
            lines.append(f"- {name}: {scores}, within seed spread ({others}). **{DIAGNOSTIC_ARMS[name]}.**")
        else:
            lines.append(f"- {name}: {scores}, outside seed spread ({others}).")
    return lines + ([""] if judgements else [])


def stability_lines(task_out: dict, a: dict) -> list[str]:
    stab = []
    for m in a["methods"]:
        for entry in task_out["test"].get(m, []):
            long = [r for r in entry["runs"] if r["seed"] == a["seeds"][0]]
            if not long or not long[0]["points"]:
                continue
            pts = long[0]["points"]
            best = max(pts, key=lambda p: p["avg_at_8"])
            at_budget = budget_value(long[0], "tokens")
            stab.append(
                f"| {m} | {config_name(entry['config'])} | {at_budget:.3f} | {best['avg_at_8']:.3f} @ "
                f"{best['tokens']:,.0f} tok | {pts[-1]['avg_at_8']:.3f} @ {pts[-1]['tokens']:,.0f} tok | "
                f"{pts[-1]['avg_at_8'] - best['avg_at_8']:+.3f} |"
            )
    if not stab:
        return []
    return [
        f"### {task_out['task']}: stability (seed {a['seeds'][0]} to {a['stability_factor']}x the token budget)",
        "",
        "| method | configuration | at token budget | best | end | end − best |",
        "|---|---|---|---|---|---|",
        *stab,
        "",
    ]


def long_lines(task_out: dict, a: dict, png: Path | None) -> list[str]:
    rows = []
    for m in a["methods"]:
        entry = task_out.get("long", {}).get(m)
        if entry is None:
            continue
        s = long_summary(entry["runs"])
        if s is None:
            steps = entry["steps"] or "– (waits for its first test seed)"
            rows.append(f"| {m} | {config_name(entry['config'])} | {steps} | 0 | – | – | – | – |")
            continue
        rows.append(
            f"| {m} | {config_name(entry['config'])} | {entry['steps']} | {s['n']} | {_fmt(*s['best'])} | "
            f"{_fmt(*s['end'])} | {_fmt(*s['gap'])} | {s['best_step']:.0f} |"
        )
    if not rows:
        return []
    lines = [
        f"### {task_out['task']}: long horizon ({HEADLINE_BUDGET}-selected configurations, test Avg@8, mean ± std "
        "over seeds)",
        "",
        "| method | configuration | steps | seeds | best | end | end − best | best at step (mean) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if png:
        lines += [f"![{task_out['task']} long horizon]({png.name})", ""]
    return lines


def diagnostics_lines(task_out: dict, a: dict) -> list[str]:
    """Logged training metrics at the start and end of the headline test runs and of the long-horizon runs: one row
    per method, one `first → last` column per metric logged by some method."""
    groups = (
        (f"test runs of the {HEADLINE_BUDGET}-selected configurations, up to the {HEADLINE_BUDGET} budget", "test"),
        ("long-horizon runs, to their end", "long"),
    )
    lines = []
    for title, kind in groups:
        per_method = {}
        for m in a["methods"]:
            if kind == "test":
                runs, budget = test_result(task_out, m, HEADLINE_BUDGET)[1], HEADLINE_BUDGET
            else:
                runs, budget = (task_out.get("long", {}).get(m) or {}).get("runs", []), "steps"
            if diag := training_diagnostics(runs, budget):
                per_method[m] = diag
        keys = [k for k in DIAGNOSTIC_KEYS if any(k in d for d in per_method.values())]
        if not keys:
            continue
        lines += [
            f"### {task_out['task']}: training diagnostics ({title})",
            "",
            f"`first → last`: mean of the logged per-step metric over the first {DIAGNOSTIC_WINDOW} optimizer steps "
            f"and over the last {DIAGNOSTIC_WINDOW} (each half of the run where it is shorter than "
            f"{2 * DIAGNOSTIC_WINDOW} steps), averaged over seeds; steps where it is NaN (no such pair) skipped. "
            + "; ".join(f"{DIAGNOSTIC_KEYS[k][0]}: {DIAGNOSTIC_KEYS[k][1]}" for k in keys)
            + ".",
            "",
            "| method | seeds | " + " | ".join(DIAGNOSTIC_KEYS[k][0] for k in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for m, diag in per_method.items():
            cells = [f"{diag[k][0]:.3f} → {diag[k][1]:.3f}" if k in diag else "–" for k in keys]
            seeds = max(n for _, _, n in diag.values())
            lines.append(f"| {m} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _band(ax, curves: list[list[tuple]], color: str, label: str | None, ls: str = "-") -> None:
    """Mean ± std over `curves` (lists of (x, y), cut to the shortest) with x the mean over curves; `label` None:
    no legend entry."""
    import numpy as np

    n = min((len(c) for c in curves), default=0)
    if n == 0:
        return
    x = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
    y = np.array([[p[1] for p in c[:n]] for c in curves], dtype=float)
    mu, sd = y.mean(0), (y.std(0, ddof=1) if len(y) > 1 else np.zeros(n))
    ax.plot(x, mu, marker="o", ms=3, color=color, ls=ls, label=None if label is None else f"{label} (n={len(y)})")
    ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.15)


def _curves(runs: list[dict], key: str, base: dict) -> list[list[tuple]]:
    """(point[key], test Avg@8) of each run, from (0, the untrained model's score for the run's seed)."""
    return [[(0.0, base.get(r["seed"], math.nan))] + [(p[key], p["avg_at_8"]) for p in r["points"]] for r in runs]


def plot(payload: dict, out_dir: Path, stem: str) -> dict:
    """The PNGs: `{"curves": {task: path}, "long": {task: path}, "summary": path}` ({} without matplotlib)."""
    from bench_utils import pyplot

    plt = pyplot()
    if plt is None:
        return {}
    out = {"curves": {}, "long": {}}
    for task_out in payload["tasks"]:
        t = task_out["task"]
        out["curves"][t] = _save(plt, plot_task_curves(plt, task_out, payload), out_dir / f"{stem}_{t}.png")
        if any(e["runs"] for e in task_out.get("long", {}).values()):
            out["long"][t] = _save(plt, plot_long(plt, task_out, payload), out_dir / f"{stem}_long_{t}.png")
    out["summary"] = _save(plt, plot_summary(plt, payload), out_dir / f"{stem}_summary.png")
    return out


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_task_curves(plt, task_out: dict, payload: dict):
    a = payload["config"]
    axis_key = {"tokens": "tokens", "time": "train_seconds", "steps": "step"}
    axis_label = {"tokens": "generated tokens", "time": f"training seconds ({a['clock']})", "steps": "optimizer steps"}
    base = {b["seed"]: b["avg_at_8"] for b in task_out["base"]}
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, budget in zip(axes, BUDGETS, strict=False):
        for m in a["methods"]:
            _band(ax, _curves(test_result(task_out, m, budget)[1], axis_key[budget], base), COLORS[m], m)
        ax.axvline(budgets_of(argparse.Namespace(**a))[budget], color="k", ls="--", lw=1, alpha=0.5)
        if task_out["base"]:
            ax.axhline(statistics.fmean(b["avg_at_8"] for b in task_out["base"]), color="gray", ls=":", label="base")
        ax.set_xlabel(axis_label[budget])
        ax.set_ylabel("test Avg@8")
        ax.set_title(BUDGET_LABELS[budget], fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[3]
    for m in a["methods"]:
        _, runs = test_result(task_out, m, HEADLINE_BUDGET)
        long = [r for r in runs if r["seed"] == a["seeds"][0]]
        if long:
            pts = long[0]["points"]
            ax.plot(
                [0.0] + [p["tokens"] for p in pts],
                [base.get(a["seeds"][0], math.nan)] + [p["avg_at_8"] for p in pts],
                marker="o",
                ms=3,
                color=COLORS[m],
                label=m,
            )
    ax.axvline(a["budget_tokens"], color="k", ls="--", lw=1, alpha=0.5)
    ax.set_xlabel("generated tokens")
    ax.set_title(
        f"stability: seed {a['seeds'][0]} to {a['stability_factor']}x tokens ({HEADLINE_BUDGET}-selected)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task_out['task']}: tuned methods" + (" [quick]" if a["quick"] else ""), fontsize=10)
    return fig


def plot_long(plt, task_out: dict, payload: dict):
    """Test Avg@8 against optimizer steps of the long-horizon runs, mean ± std over seeds per method."""
    a = payload["config"]
    base = {b["seed"]: b["avg_at_8"] for b in task_out["base"]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in a["methods"]:
        runs = (task_out.get("long", {}).get(m) or {}).get("runs", [])
        _band(ax, _curves(runs, "step", base), COLORS[m], m)
    if task_out["base"]:
        ax.axhline(statistics.fmean(b["avg_at_8"] for b in task_out["base"]), color="gray", ls=":", label="base")
    ax.axvline(a["budget_steps"], color="k", ls="--", lw=1, alpha=0.5)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("test Avg@8")
    ax.set_title(
        f"{task_out['task']}: long horizon ({HEADLINE_BUDGET}-selected configurations)"
        + (" [quick]" if a["quick"] else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_summary(plt, payload: dict):
    """One panel per task: test Avg@8 against training seconds of each method's headline-selected configuration,
    mean ± std over seeds; solid the test runs, dashed the long-horizon runs."""
    a = payload["config"]
    tasks = payload["tasks"]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(8 * max(1, len(tasks)), 4.5), squeeze=False)
    for ax, task_out in zip(axes[0], tasks, strict=False):
        base = {b["seed"]: b["avg_at_8"] for b in task_out["base"]}
        for m in a["methods"]:
            _band(ax, _curves(test_result(task_out, m, HEADLINE_BUDGET)[1], "train_seconds", base), COLORS[m], m)
            long = (task_out.get("long", {}).get(m) or {}).get("runs", [])
            _band(ax, _curves(long, "train_seconds", base), COLORS[m], None, ls="--")
        ax.axvline(a["budget_seconds"], color="k", ls="--", lw=1, alpha=0.5)
        ax.set_xlabel(f"training seconds ({a['clock']})")
        ax.set_ylabel("test Avg@8")
        ax.set_title(
            f"{task_out['task']}: {HEADLINE_BUDGET}-selected configurations (dashed: long horizon)", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("test Avg@8 vs training time" + (" [quick]" if a["quick"] else ""), fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Smoke run: test-size models, tiny budgets, 2 seeds.")
    p.add_argument("--plan", action="store_true", help="Print the runs and their estimated time, then exit.")
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="learning", help="Stem of the report files (<name>.md, <name>_<task>.png).")
    p.add_argument("--cache_dir", default=None, help="Run cache (default <output_dir>/learning_runs).")
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--learning_rates", nargs="+", type=float, default=list(LEARNING_RATES))
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument(
        "--pooled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also run PBSD's time-selected configuration with a teacher-sample pool at the time budget.",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget_tokens", type=float, default=140_000)
    p.add_argument("--budget_seconds", type=float, default=120.0)
    p.add_argument("--budget_steps", type=int, default=50)
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    p.add_argument("--eval_points", type=int, default=4, help="Test evaluations per token budget (the curves).")
    p.add_argument("--eval_problems", type=int, default=100, help="Problems per split (at most 100).")
    p.add_argument("--stability_factor", type=float, default=3.0)
    p.add_argument("--long_steps", type=int, default=300, help="Least optimizer steps of a long-horizon run.")
    p.add_argument(
        "--long_factor", type=float, default=6.0, help="Long-horizon runs: at least this x the token budget's steps."
    )
    p.add_argument("--long_seeds", nargs="*", type=int, default=[0, 1], help="Long-horizon seeds (none: no stage).")
    p.add_argument("--long_eval_points", type=int, default=10, help="Test evaluations per long-horizon run.")
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument(
        "--max_completion_length",
        type=int,
        default=None,
        help="Default: the task's (`TaskSpec.max_completion_length`, that of its example script).",
    )
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--max_minutes", type=float, default=None, help="Launch no new run after this many minutes.")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:2]
        args.learning_rates = args.learning_rates[:1]
        args.budget_tokens, args.budget_seconds, args.budget_steps = 600.0, 0.5, 2
        args.eval_points, args.eval_problems, args.stability_factor = 2, 4, 1.5
        args.prompts_per_step, args.train_size = 1, 32
        args.max_completion_length = 16
        # the diagnostic arms: the ablations with report logic of their own
        args.ablations = [name for name in args.ablations if name in DIAGNOSTIC_ARMS] or args.ablations[:1]
        args.long_steps, args.long_factor, args.long_eval_points = 3, 1.5, 2
        args.long_seeds = args.long_seeds[:2]
    if args.cache_dir is None:
        args.cache_dir = str(Path(args.output_dir) / "learning_runs")
    return args


def _without_history(obj):
    """The report's JSON without the per-step training logs (those stay in the run cache)."""
    if isinstance(obj, dict):
        return {k: _without_history(v) for k, v in obj.items() if k != "history"}
    if isinstance(obj, list):
        return [_without_history(v) for v in obj]
    return obj


def main(argv=None):
    args = parse_args(argv)
    quiet_training_logs(args.num_threads)
    out_dir = Path(args.output_dir)
    cache = RunCache(Path(args.cache_dir))
    if args.plan:
        text = plan(args, Path(args.cache_dir))
        print(text)
        return text
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    cli = list(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": " ".join(["python benchmarks/learning_tuned.py", *([shlex.join(cli)] if cli else [])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(),
        "config": {k: v for k, v in vars(args).items() if k not in ("output_dir", "plan")},
        "tasks": [],
    }
    runner = Runner(args, cache)
    with tqdm(total=planned_run_count(args), desc="runs", unit="run", dynamic_ncols=True) as progress:
        for task in args.tasks:
            payload["tasks"].append(run_task(TaskContext(task, args), args, runner, progress))
    payload["executed"] = runner.executed
    payload["errors"] = runner.errors
    payload["total_seconds"] = time.perf_counter() - runner.start
    payload["partial"] = None
    if runner.skipped_for_time:
        payload["partial"] = (
            f"`--max_minutes {args.max_minutes}` was reached with {runner.skipped_for_time} runs not started."
        )
    elif runner.errors:
        payload["partial"] = f"{len(runner.errors)} runs failed (see Errors)."
    (out_dir / f"{args.name}.json").write_text(json.dumps(_without_history(payload), indent=1, default=str))
    plots = plot(payload, out_dir, args.name)
    write_report(out_dir / f"{args.name}.md", payload, plots)
    print(
        f"[learning_tuned] wrote {out_dir / (args.name + '.md')}; {runner.executed} new runs; "
        f"{(time.perf_counter() - runner.start) / 60:.1f} min",
        flush=True,
    )
    return payload


if __name__ == "__main__":
    main()

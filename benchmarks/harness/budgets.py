"""Budgeted training runs: the clock (process CPU time or wall time, evaluations excluded), the counter of generated
tokens, training time and optimizer steps read from the trainers' own logs, which evaluates at budget points and on a
grid and stops the run, and the trainer settings every budgeted run shares."""

import math
import time

import torch


BUDGETS = ("tokens", "time", "steps")
HEADLINE_BUDGET = "time"
BUDGET_LABELS = {"tokens": "equal generated tokens", "time": "equal training time", "steps": "equal optimizer steps"}


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


def budgeted_run_settings(
    output_dir: str,
    seed: int,
    prompts_per_step: int,
    num_generations: int,
    max_completion_length: int,
    learning_rate: float,
) -> dict:
    """The `GRPOConfig` / `PBSDConfig` fields every method of the learning benchmarks shares: a constant learning
    rate, sampling at temperature 1, fp32 and no checkpoints; a budget callback stops the run, not `max_steps`."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=prompts_per_step * num_generations,
        num_generations=num_generations,
        gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        max_steps=100_000,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )


def budgets_of(args) -> dict:
    return {"tokens": float(args.budget_tokens), "time": float(args.budget_seconds), "steps": int(args.budget_steps)}

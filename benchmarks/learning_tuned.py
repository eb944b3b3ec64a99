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
   knob` (`KNOBS` in `harness/methods.py`, per task where the knob's useful range differs between the tasks, written into the
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

The methods, their grids and ablations, the budget callback, the run cache, the splits and the statistics are the
benchmarks' shared harness (`benchmarks/harness/`); `learning_tuned_report.py` writes the report.

Usage:
    python benchmarks/learning_tuned.py --plan                       # the runs and the time estimate
    python benchmarks/learning_tuned.py                              # full run (resumes from the cache)
    python benchmarks/learning_tuned.py --max_minutes 170            # one session's worth, then a partial report
    python benchmarks/learning_tuned.py --quick --output_dir /tmp/x  # smoke run on test-size models (minutes)
    python benchmarks/learning_tuned.py --max_completion_length math=56  # a completion budget per task
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from harness.budgets import BUDGETS, HEADLINE_BUDGET, HISTORY_KEYS, Clock, budgets_of, make_budget_callback  # noqa: E402
from harness.methods import (  # noqa: E402
    ABLATIONS,
    DIAGNOSTIC_ARMS,
    HEADLINE_PBSD,
    LEARNING_RATES,
    METHOD_FIXED,
    METHODS,
    ablation_config,
    build_trainer,
    config_name,
    is_pbsd,
    teacher_samples_per_step,
    tuning_grid,
)
from harness.runs import RunCache, loadavg, model_identity, run_machine, smoke_base_model  # noqa: E402
from harness.splits import eval_splits  # noqa: E402
from harness.system import display_path, machine_description, quiet_training_logs  # noqa: E402
from learning_tuned_report import budget_value, grid_text, plot, test_result, write_report  # noqa: E402


PROTOCOL_VERSION = 1  # part of every run key: bump when a change makes stored runs incomparable
TASK_NAMES = ("math", "tool_use")

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
# Context: models, data, evaluation
# ----------------------------------------------------------------------------------------------------------------


def task_settings(args, task: str) -> dict:
    """The settings every run of `task` shares (part of every run key)."""
    from pbsd_trl.recipes.data.tasks import TASKS

    return {
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length.get(task) or TASKS[task].max_completion_length,
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
        "load_average": loadavg(),
        **({"teacher_pool": pool} if pool else {}),
    }


# ----------------------------------------------------------------------------------------------------------------
# Plan, estimate, execution
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def completion_lengths(parser, values: list[str], tasks) -> dict[str, int]:
    """`--max_completion_length` as {task: N}: one N for every task, or TASK=N entries."""
    if len(values) == 1 and "=" not in values[0]:
        values = [f"{task}={values[0]}" for task in tasks]
    lengths = {}
    for value in values:
        task, _, n = value.partition("=")
        if task not in TASK_NAMES or not n.isdigit() or int(n) < 1:
            parser.error(f"--max_completion_length: expected N or TASK=N with TASK in {TASK_NAMES}, got {value!r}")
        lengths[task] = int(n)
    return lengths


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
        nargs="+",
        default=[],
        metavar="[TASK=]N",
        help="N for every task, or TASK=N per task (e.g. `math=56 tool_use=64`); a task without one takes its own "
        "(`TaskSpec.max_completion_length`, that of its example script).",
    )
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--max_minutes", type=float, default=None, help="Launch no new run after this many minutes.")
    args = p.parse_args(argv)
    args.max_completion_length = completion_lengths(p, args.max_completion_length, args.tasks)
    if args.quick:
        args.seeds = args.seeds[:2]
        args.learning_rates = args.learning_rates[:1]
        args.budget_tokens, args.budget_seconds, args.budget_steps = 600.0, 0.5, 2
        args.eval_points, args.eval_problems, args.stability_factor = 2, 4, 1.5
        args.prompts_per_step, args.train_size = 1, 32
        args.max_completion_length = dict.fromkeys(args.tasks, 16)
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

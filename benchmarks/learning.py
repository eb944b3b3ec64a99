"""
Learning benchmark: base vs GRPO vs OPSD/SDFT vs PBSD at an equal budget of generated completion tokens.

The first, untuned comparison (every method at one shared learning rate; report in `benchmarks/results/untuned/`).
The tuned comparison of issue 15 is `benchmarks/learning_tuned.py`, whose report is `benchmarks/results/learning.md`.

Every method starts from the same built-in tiny base model (`pbsd_trl.recipes.tiny.get_base_model("math")`) and trains on the
built-in arithmetic task with the training settings of `examples/math.py` (8 prompts x 8 samples per step,
`max_completion_length` of the task, lr 1e-4 constant, temperature 1.0). The peers are the real TRL trainers:

- `GRPO`: `trl.GRPOTrainer` (TRL's defaults for the loss: `loss_type="dapo"`, `beta=0`), reward = answer accuracy;
- `OPSD`: `trl.experimental.sdft.SDFTTrainer` configured as OPSD-style KL self-distillation: the same privileged
  teacher prompt as PBSD (`MATH_TEACHER_TEMPLATE` filled with the reference solution), `teacher_model_kind="base"`
  (frozen initial weights), `distillation_mode="full_logits"`, `distillation_alpha=0.0` (forward KL(teacher||student)
  over the full vocabulary, per token of on-policy student samples);
- `SDFT`: `SDFTTrainer` with SDFT's own loss defaults (`topk_logits`, top-100, `alpha=0.5`, base teacher), same
  teacher prompt;
- `PBSD-role` / `PBSD-reward`: `pbsd_trl.PBSDTrainer` (`pair_labels="role"` / `"reward"`, `pbsd_beta=0.1`, base
  teacher, G student + G teacher samples per prompt).

Equal budget: each run stops at the first optimizer step after which the cumulative number of *generated completion
tokens* reaches `--budget_tokens`. GRPO and SDFT generate only student samples; PBSD generates student and teacher
samples, both counted. Counted from each trainer's own logged metrics (`logging_steps=1`): GRPO / SDFT / PBSD
`completions/mean_length` x completions per step (PBSD's are the student samples), plus PBSD's
`pbsd/teacher_completions/mean_length` x teacher samples per step.

Avg@8 (8 samples per problem, temperature 1.0) on the first `--eval_problems` of the 200 held-out problems is measured
before training (the `base` row) and whenever a run's cumulative tokens cross a multiple of
`budget_tokens / --eval_points`. The first seed of every method runs on to `--stability_factor` x budget (the
stability view); its numbers up to the budget are exactly those of a run stopped at the budget (constant learning
rate, evaluation draws from a forked RNG).

Usage:
    python benchmarks/learning.py                               # full run, writes benchmarks/results/untuned/learning.*
    python benchmarks/learning.py --quick --output_dir /tmp/x   # CI smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness.budgets import Clock, make_budget_callback  # noqa: E402
from harness.methods import build_trainer as harness_build_trainer  # noqa: E402
from harness.methods import is_pbsd  # noqa: E402
from harness.runs import smoke_base_model  # noqa: E402
from harness.stats import mean_std, verdict, welch  # noqa: E402
from harness.system import display_path, machine_description, pyplot, quiet_training_logs  # noqa: E402

from pbsd_trl.rewards import math_accuracy_reward  # noqa: E402


METHODS = ("GRPO", "OPSD", "SDFT", "PBSD-role", "PBSD-reward")
PBSD_METHODS = ("PBSD-role", "PBSD-reward")
BASELINES = ("base", "GRPO", "OPSD", "SDFT")
DESCRIPTIONS = {
    "base": "untrained tiny base model (no training; the spread is over evaluation sampling seeds only)",
    "GRPO": "`trl.GRPOTrainer`, TRL defaults (`loss_type=dapo`, `beta=0`), accuracy reward",
    "OPSD": "`trl.experimental.sdft.SDFTTrainer`, OPSD-style: PBSD's teacher prompt, base teacher, "
    "`distillation_mode=full_logits`, `distillation_alpha=0` (forward KL)",
    "SDFT": "`SDFTTrainer` with SDFT's loss defaults (`topk_logits`, top-k 100, `alpha=0.5`), base teacher, "
    "PBSD's teacher prompt",
    "PBSD-role": "`pbsd_trl.PBSDTrainer`, `pair_labels=role`, `pbsd_beta=0.1`, base teacher, 8+8 samples per prompt",
    "PBSD-reward": "`pbsd_trl.PBSDTrainer`, `pair_labels=reward` (ties by role), otherwise as PBSD-role",
}
COLORS = {
    "base": "gray",
    "GRPO": "tab:blue",
    "OPSD": "tab:orange",
    "SDFT": "tab:purple",
    "PBSD-role": "tab:green",
    "PBSD-reward": "tab:red",
}
LINESTYLES = {"PBSD-reward": "--"}


# Each method of this comparison as a method of the harness (`harness.methods`) and its settings beyond the shared
# learning rate: OPSD is forward KL; PBSD-reward keeps matched pairs with reward labels (ties by role), unlike the
# tuned benchmark's `PBSD-reward` (every pair of a prompt, ties dropped)
HARNESS_METHODS = {
    "GRPO": ("GRPO", {}, None),
    "OPSD": ("OPSD", {"distillation_alpha": 0.0}, None),
    "SDFT": ("SDFT", {}, None),
    "PBSD-role": ("PBSD", {}, None),
    "PBSD-reward": ("PBSD", {}, {"teacher_model_kind": "base", "pair_labels": "reward"}),
}


def build_trainer(method: str, args, model, tokenizer, train_dataset, seed: int, output_dir: str, callback):
    """`method`'s trainer on the math task at the shared learning rate (and PBSD's `--pbsd_beta`)."""
    name, config, fixed = HARNESS_METHODS[method]
    config = {"learning_rate": args.learning_rate, **config}
    if is_pbsd(name):
        config["pbsd_beta"] = args.pbsd_beta
    settings = {
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
    }
    return harness_build_trainer(
        "math", name, config, settings, seed, model, tokenizer, train_dataset, output_dir, [callback], fixed=fixed
    )


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args):
        from pbsd_trl.recipes.data.math_task import make_math_dataset
        from pbsd_trl.recipes.models import load_model_and_tokenizer
        from pbsd_trl.recipes.tiny import get_base_model

        self.args = args
        if args.quick:  # a few warm-start steps of a test-size model: the smoke run must not build the real one
            self.model_path = smoke_base_model("math", args.output_dir)
        else:
            self.model_path = get_base_model("math")
        self.load = lambda: load_model_and_tokenizer(self.model_path)
        self.eval_dataset = make_math_dataset("eval", n=args.eval_problems)
        self.rewards = [math_accuracy_reward]
        self.make_train = lambda seed: make_math_dataset("train", n=args.train_size, seed=seed)

    def evaluate(self, model, tokenizer, seed: int, with_privileged_context: bool = False) -> dict:
        from pbsd_trl.recipes.data.math_task import MATH_TEACHER_TEMPLATE
        from pbsd_trl.recipes.evaluate import evaluate_avg_at_k

        return evaluate_avg_at_k(
            model,
            tokenizer,
            self.eval_dataset,
            self.rewards,
            k=8,
            num_problems=self.args.eval_problems,
            max_new_tokens=self.args.max_completion_length,
            temperature=1.0,
            seed=10_000 + seed,
            with_privileged_context=with_privileged_context,
            teacher_prompt_template=MATH_TEACHER_TEMPLATE,
            batch_size=32,
            progress_bar=False,
        )


def run_one(ctx: Context, method: str, seed: int, stop_at: float, position_desc: str) -> dict:
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, set_seed

    args = ctx.args
    set_seed(seed)
    model, tokenizer = ctx.load()
    train_dataset = ctx.make_train(seed)
    eval_every = args.budget_tokens / args.eval_points
    per_step = args.prompts_per_step * args.num_generations
    with tqdm(desc=position_desc, unit="step", dynamic_ncols=True, mininterval=5) as bar:
        callback = make_budget_callback(
            teacher_per_step=per_step if method in PBSD_METHODS else 0,
            student_per_step=per_step,
            budgets={"tokens": args.budget_tokens},
            stop={"tokens": stop_at},
            eval_every_tokens=eval_every,
            evaluate=lambda m: ctx.evaluate(m, tokenizer, seed),
            clock=Clock("wall"),
            bar=bar,
        )
        with tempfile.TemporaryDirectory(prefix=f"learning-{method}-") as tmp:
            trainer = build_trainer(method, args, model, tokenizer, train_dataset, seed, tmp, callback)
            trainer.remove_callback(PrinterCallback)  # the progress bar and the periodic evaluations report instead
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
    budget_point = callback.points[callback.marks["tokens"]] if "tokens" in callback.marks else None
    return {
        "method": method,
        "seed": seed,
        "stop_at_tokens": stop_at,
        "steps": trainer.state.global_step,
        "tokens": callback.tokens,
        "student_tokens": callback.student_tokens,
        "teacher_tokens": callback.teacher_tokens,
        "wall_seconds": wall,
        "eval_seconds": callback.eval_seconds,
        "train_seconds": wall - callback.eval_seconds,
        "budget_step": budget_point and budget_point["step"],
        "budget_tokens": budget_point and budget_point["tokens"],
        "budget_train_seconds": budget_point and budget_point["train_seconds"],
        "points": callback.points,
        "final": budget_point,
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(m, s, digits=3):
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarize(payload: dict) -> dict:
    """Per-method final Avg@8 over seeds (at the budget point), tokens, times."""
    out = {}
    base = payload["base"]
    out["base"] = {
        "values": [b["avg_at_8"] for b in base],
        "pass": [b["pass_at_8"] for b in base],
        "tokens": [0.0],
        "steps": [0],
        "train_seconds": [0.0],
        "wall_seconds": [b["seconds"] for b in base],
        "n": len(base),
    }
    for method in payload["methods"]:
        runs = [r for r in payload["runs"] if r["method"] == method and r["final"] is not None]
        if not runs:
            continue
        out[method] = {
            "values": [r["final"]["avg_at_8"] for r in runs],
            "pass": [r["final"]["pass_at_8"] for r in runs],
            "tokens": [r["budget_tokens"] for r in runs],
            "teacher_share": [r["final"]["teacher_tokens"] / r["final"]["tokens"] for r in runs],
            "steps": [r["budget_step"] for r in runs],
            "train_seconds": [r["budget_train_seconds"] for r in runs],
            "wall_seconds": [r["wall_seconds"] for r in runs],
            "n": len(runs),
        }
    return out


def write_markdown(path: Path, payload: dict, summary: dict, plots: dict):
    a = payload["config"]
    lines = [
        "# Learning benchmark: base vs GRPO vs OPSD/SDFT vs PBSD at an equal generated-token budget",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Started {payload['started']}, total wall time {payload['total_seconds'] / 60:.1f} min"
        + (" (**--quick smoke run: numbers are not meaningful**)" if a["quick"] else "")
        + ".",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in payload["machine"].items()],
        f"- load average at end (1/5/15 min): {payload.get('load_at_end')}",
        "",
        "## Setup",
        "",
        f"- Model: the built-in tiny base model `pbsd_trl.recipes.tiny.get_base_model('math')` ({payload['model_path']}), "
        "fp32, full fine-tuning; a fresh copy for every run.",
        f"- Task: built-in arithmetic (`make_math_dataset`, medium), {a['train_size']} training problems drawn with the "
        f"run's seed; Avg@8 on the first {a['eval_problems']} of the 200 held-out problems (8 samples per problem, "
        f"temperature 1.0, max {a['max_completion_length']} new tokens, sampling seed 10000+seed).",
        f"- Shared training settings (those of `examples/math.py`): {a['prompts_per_step']} prompts x "
        f"{a['num_generations']} samples per step, max_completion_length {a['max_completion_length']}, lr "
        f"{a['learning_rate']} constant, temperature 1.0, AdamW, seeds {a['seeds']}.",
        f"- Budget: {a['budget_tokens']:,} generated completion tokens per run (student samples, plus teacher samples "
        "for PBSD, which draws 8 teacher samples per prompt besides the 8 student ones). A run stops at the first step "
        "that reaches the budget, so it overshoots by less than one step's tokens (column `tokens`). Counted from the "
        "trainers' logged completion lengths.",
        f"- Evaluation every {a['budget_tokens'] / a['eval_points']:,.0f} tokens; the table reports the evaluation "
        "at the budget. `train s` is the training time up to the budget (evaluations excluded); `wall s` the whole "
        "run including its evaluations (and, for the first seed, the stability extension).",
        f"- Stability view: the first seed ({a['seeds'][0]}) of each method runs on to {a['stability_factor']}x the "
        "budget; its curve up to the budget is the same run as the others (constant learning rate; evaluations use a "
        "forked RNG).",
        "",
        "Methods:",
        "",
        *[f"- `{m}`: {DESCRIPTIONS[m]}" for m in ("base", *payload["methods"])],
        "",
    ]
    teacher = payload.get("teacher")
    if teacher:
        lines += [
            f"For reference, the base model prompted with the reference solution (the teacher's view) scores Avg@8 "
            f"{teacher['avg_at_8']:.3f} on the same problems (seed {a['seeds'][0]}).",
            "",
        ]
    lines += [
        "## Results",
        "",
        "| method | seeds | final Avg@8 (mean ± std) | pass@8 (mean ± std) | per-seed Avg@8 | tokens used | teacher share "
        "| steps | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in ("base", *payload["methods"]):
        if method not in summary:
            lines.append(f"| {method} | 0 | (no finished run) | | | | | | | |")
            continue
        s = summary[method]
        m, sd = mean_std(s["values"])
        pm, psd = mean_std(s["pass"])
        share = f"{statistics.fmean(s['teacher_share']):.2f}" if "teacher_share" in s else "–"
        lines.append(
            f"| {method} | {s['n']} | {_fmt(m, sd)} | {_fmt(pm, psd)} | {', '.join(f'{v:.3f}' for v in s['values'])} "
            f"| {statistics.fmean(s['tokens']):,.0f} | {share} | {statistics.fmean(s['steps']):.0f} "
            f"| {statistics.fmean(s['train_seconds']):.0f} | {statistics.fmean(s['wall_seconds']):.0f} |"
        )
    lines += [
        "",
        "## Verdicts",
        "",
        '"Beyond seed spread" means: the difference of the mean final Avg@8 is larger than the sum of the two '
        "standard deviations over seeds (sample std, n-1). Otherwise the verdict is `tied`. Welch's t-test p-value is "
        "given alongside (two-sided, 3 seeds each: low power).",
        "",
        "| PBSD variant | vs | Δ mean Avg@8 | std PBSD + std baseline | Welch p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    verdict_lines = []
    for pbsd in PBSD_METHODS:
        if pbsd not in summary:
            continue
        for base in (*BASELINES, *[p for p in PBSD_METHODS if p != pbsd]):
            if base not in summary or summary[base]["n"] < 2 or summary[pbsd]["n"] < 2:
                continue
            word, diff = verdict(summary[pbsd]["values"], summary[base]["values"])
            spread = mean_std(summary[pbsd]["values"])[1] + mean_std(summary[base]["values"])[1]
            _, p = welch(summary[pbsd]["values"], summary[base]["values"])
            text = {
                "beat": "PBSD beat it beyond seed spread",
                "lost": "PBSD lost beyond seed spread",
                "tied": "tied (within seed spread)",
            }[word]
            lines.append(f"| {pbsd} | {base} | {diff:+.3f} | {spread:.3f} | {p:.3f} | {text} |")
            if base in BASELINES:
                verdict_lines.append(f"- {pbsd} vs {base}: {text} (Δ {diff:+.3f}).")
    if not verdict_lines:
        verdict_lines = ["- (fewer than 2 finished seeds per method: no verdict)"]
    lines += ["", "In words:", "", *verdict_lines, ""]
    lines += ["## Plots", ""]
    if plots.get("curves"):
        lines += [
            f"![Avg@8 vs generated tokens]({plots['curves'].name})",
            "",
            f"`{plots['curves'].name}`: Avg@8 vs cumulative generated completion tokens, mean over seeds with a ± 1 std "
            "band (x: mean tokens at each evaluation); the dotted line is the untrained base model.",
            "",
        ]
    if plots.get("stability"):
        lines += [
            f"![Stability: long run]({plots['stability'].name})",
            "",
            f"`{plots['stability'].name}`: seed {a['seeds'][0]} of every method run to {a['stability_factor']}x the "
            "budget (left: Avg@8 vs generated tokens; right: vs optimizer steps); the dashed vertical line is the "
            "budget of the table.",
            "",
        ]
    stab = []
    for method in payload["methods"]:
        long = [r for r in payload["runs"] if r["method"] == method and r["stop_at_tokens"] > a["budget_tokens"]]
        if long and long[0]["points"]:
            pts = long[0]["points"]
            best = max(pts, key=lambda p: p["avg_at_8"])
            stab.append(
                f"| {method} | {long[0]['tokens']:,.0f} | {long[0]['steps']} | {long[0]['final']['avg_at_8'] if long[0]['final'] else float('nan'):.3f} "
                f"| {best['avg_at_8']:.3f} @ {best['tokens']:,.0f} | {pts[-1]['avg_at_8']:.3f} | {pts[-1]['avg_at_8'] - best['avg_at_8']:+.3f} |"
            )
    if stab:
        lines += [
            "Stability run (one seed): Avg@8 at the budget, best along the run, and at the end of the long run "
            "(drop = end − best; a large negative drop means degradation).",
            "",
            "| method | tokens | steps | Avg@8 at budget | best (at tokens) | at end | end − best |",
            "|---|---|---|---|---|---|---|",
            *stab,
            "",
        ]
    lines += [
        "## Raw data",
        "",
        "`learning.json` holds every evaluation point of every run (step, tokens, student/teacher tokens, train "
        "seconds, Avg@8, pass@8, mean completion length) and the configuration.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(payload: dict, out_dir: Path) -> dict:
    plt = pyplot()
    if plt is None:
        return {}
    import numpy as np

    a = payload["config"]
    budget = a["budget_tokens"]
    base_mean = statistics.fmean(b["avg_at_8"] for b in payload["base"])
    base_by_seed = {b["seed"]: b["avg_at_8"] for b in payload["base"]}
    paths = {}

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for method in payload["methods"]:
        runs = [r for r in payload["runs"] if r["method"] == method]
        if not runs:
            continue
        n_points = a["eval_points"]
        xs, ys = [], []
        for r in runs:
            pts = (
                [p for p in r["points"] if p["tokens"] <= r["budget_tokens"] + 1e-6]
                if r["budget_tokens"]
                else r["points"]
            )
            pts = pts[:n_points]
            if len(pts) < n_points:
                continue
            xs.append([0.0] + [p["tokens"] for p in pts])
            ys.append([base_by_seed.get(r["seed"], base_mean)] + [p["avg_at_8"] for p in pts])
        if not ys:
            continue
        x = np.mean(np.array(xs), axis=0)
        y = np.array(ys)
        m = y.mean(axis=0)
        s = y.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(m)
        ax.plot(
            x,
            m,
            marker="o",
            ms=3,
            color=COLORS[method],
            ls=LINESTYLES.get(method, "-"),
            label=f"{method} (n={len(ys)})",
        )
        ax.fill_between(x, m - s, m + s, color=COLORS[method], alpha=0.15)
    ax.axhline(base_mean, color=COLORS["base"], linestyle=":", label="base")
    ax.set_xlabel("generated completion tokens (student + teacher samples)")
    ax.set_ylabel(f"Avg@8 on {a['eval_problems']} held-out problems")
    ax.set_title("Avg@8 vs generated tokens (mean ± std over seeds)" + (" [quick]" if a["quick"] else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["curves"] = out_dir / "learning_curves.png"
    fig.savefig(paths["curves"], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for method in payload["methods"]:
        long = [r for r in payload["runs"] if r["method"] == method and r["stop_at_tokens"] > budget]
        if not long:
            long = [r for r in payload["runs"] if r["method"] == method][:1]
        if not long:
            continue
        r = long[0]
        b0 = base_by_seed.get(r["seed"], base_mean)
        for ax, x in zip(axes, ("tokens", "step"), strict=True):
            ax.plot(
                [0] + [p[x] for p in r["points"]],
                [b0] + [p["avg_at_8"] for p in r["points"]],
                marker="o",
                ms=3,
                color=COLORS[method],
                ls=LINESTYLES.get(method, "-"),
                label=method,
            )
    axes[0].axvline(budget, color="k", linestyle="--", linewidth=1, alpha=0.6)
    axes[0].set_xlabel("generated completion tokens")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes:
        ax.axhline(base_mean, color=COLORS["base"], linestyle=":", label="base")
        ax.set_ylabel("Avg@8")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Stability: seed {a['seeds'][0]} run to {a['stability_factor']}x the budget"
        + (" [quick]" if a["quick"] else ""),
        fontsize=10,
    )
    fig.tight_layout()
    paths["stability"] = out_dir / "learning_stability.png"
    fig.savefig(paths["stability"], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def report(payload: dict, out_dir: Path) -> dict:
    summary = summarize(payload)
    plots = plot(payload, out_dir)
    write_markdown(out_dir / "learning.md", payload, summary, plots)
    errors = [r for r in payload["runs"] if r.get("error")]
    if errors:
        with open(out_dir / "learning.md", "a") as f:
            f.write(
                "\n## Errors\n\n" + "\n".join(f"- {r['method']} seed {r['seed']}: {r['error']}" for r in errors) + "\n"
            )
    return plots


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny budget, 1 seed, few eval problems.")
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results" / "untuned"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget_tokens", type=int, default=140_000, help="Generated completion tokens per run.")
    p.add_argument(
        "--eval_points", type=int, default=4, help="Evaluations per budget (every budget/eval_points tokens)."
    )
    p.add_argument("--eval_problems", type=int, default=100)
    p.add_argument("--stability_factor", type=float, default=2.0, help="First seed runs to this x budget (1: off).")
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_completion_length", type=int, default=None, help="Default: the math task's (its example's).")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--pbsd_beta", type=float, default=0.1)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="Only rewrite learning.md and the PNGs from learning.json.")
    args = p.parse_args(argv)
    if args.max_completion_length is None:
        from pbsd_trl.recipes.data.tasks import TASKS

        args.max_completion_length = TASKS["math"].max_completion_length
    if args.quick:
        args.seeds = args.seeds[:1]
        args.budget_tokens = 3_000
        args.eval_points = 2
        args.eval_problems = 8
        args.stability_factor = 1.5
        args.prompts_per_step = 2
        args.train_size = 64
    return args


def main(argv=None):
    args = parse_args(argv)
    quiet_training_logs(args.num_threads)

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        payload = json.loads((out_dir / "learning.json").read_text())
        report(payload, out_dir)
        return payload
    cli = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/learning.py", *([shlex.join(cli)] if cli else [])])
    start = time.perf_counter()
    payload = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(),
        "config": {k: v for k, v in vars(args).items() if k not in ("output_dir",)},
        "methods": list(args.methods),
        "base": [],
        "runs": [],
    }
    json_path = out_dir / "learning.json"

    def save():
        payload["total_seconds"] = time.perf_counter() - start
        json_path.write_text(json.dumps(payload, indent=1))

    ctx = Context(args)
    payload["model_path"] = display_path(ctx.model_path)
    print(
        f"[learning] base model {ctx.model_path}; budget {args.budget_tokens:,} tokens; seeds {args.seeds}", flush=True
    )

    model, tokenizer = ctx.load()
    for seed in args.seeds:
        base = ctx.evaluate(model, tokenizer, seed)
        payload["base"].append(
            {"seed": seed, "avg_at_8": base["avg_at_k"], "pass_at_8": base["pass_at_k"], "seconds": base["seconds"]}
        )
        print(f"[learning] base seed {seed}: Avg@8 {base['avg_at_k']:.3f} ({base['seconds']:.0f} s)", flush=True)
    teacher = ctx.evaluate(model, tokenizer, args.seeds[0], with_privileged_context=True)
    payload["teacher"] = {"avg_at_8": teacher["avg_at_k"], "pass_at_8": teacher["pass_at_k"]}
    print(f"[learning] teacher (base + reference solution): Avg@8 {teacher['avg_at_k']:.3f}", flush=True)
    del model
    save()

    jobs = [(m, s) for s in args.seeds for m in args.methods]
    for i, (method, seed) in enumerate(jobs):
        stop_at = args.budget_tokens * (args.stability_factor if seed == args.seeds[0] else 1.0)
        desc = f"[{i + 1}/{len(jobs)}] {method} seed {seed}"
        try:
            record = run_one(ctx, method, seed, stop_at, desc)
        except Exception as err:  # report, keep going with the other methods
            import traceback

            traceback.print_exc()
            record = {
                "method": method,
                "seed": seed,
                "stop_at_tokens": stop_at,
                "error": f"{type(err).__name__}: {err}",
                "points": [],
                "final": None,
                "budget_tokens": None,
            }
        payload["runs"].append(record)
        if record.get("final"):
            print(
                f"[learning] {desc}: Avg@8 at budget {record['final']['avg_at_8']:.3f} after {record['budget_step']} "
                f"steps / {record['budget_tokens']:,.0f} tokens; run {record['wall_seconds']:.0f} s "
                f"(eval {record['eval_seconds']:.0f} s); elapsed {(time.perf_counter() - start) / 60:.1f} min",
                flush=True,
            )
        save()

    try:
        payload["load_at_end"] = tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        payload["load_at_end"] = None
    save()
    plots = report(payload, out_dir)
    print(
        f"[learning] wrote {out_dir / 'learning.md'}, {json_path}" + "".join(f", {p}" for p in plots.values()),
        flush=True,
    )
    print(f"[learning] total {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return payload


if __name__ == "__main__":
    main()

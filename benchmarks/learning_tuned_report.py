# Copyright 2026 The pbsd-trl authors. Licensed under the Apache License, Version 2.0.
"""The report of `benchmarks/learning_tuned.py`: results read off the stored runs (selection, test scores per budget,
verdicts, the diagnostic arms, the long horizon, training diagnostics), the Markdown report and its plots."""

import argparse
import math
import statistics
from pathlib import Path

from harness.budgets import BUDGET_LABELS, BUDGETS, HEADLINE_BUDGET, budgets_of
from harness.methods import (
    COLORS,
    DESCRIPTIONS,
    DIAGNOSTIC_ARMS,
    HEADLINE_PBSD,
    METHOD_FIXED,
    config_name,
    is_pbsd,
    knob_values,
)
from harness.runs import machines_of_runs
from harness.stats import mean_std, verdict, welch, within_seed_spread
from harness.system import pyplot


def budget_value(record: dict, budget: str) -> float | None:
    index = record.get("marks", {}).get(budget)
    return None if index is None else record["points"][index]["avg_at_8"]


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


def grid_text(method: str, task: str, learning_rates) -> str:
    knob, values = knob_values(method, task)
    return f"learning_rate in {list(learning_rates)} x `{knob}` in {list(values)}"

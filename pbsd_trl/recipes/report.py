"""The before/after report of a run: a markdown table of Avg@k and pass@k, results files and training curves."""

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

PLOT_METRICS = ("pbsd/student_reward", "pbsd/teacher_reward", "pbsd/preference_accuracy", "pbsd/margin")


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary_line(reports: dict[str, dict], k: int) -> str:
    """One line per evaluation: `student Avg@8 0.250 (pass@8 0.500, 12 s), teacher ...`."""
    return ", ".join(
        f"{who} Avg@{k} {r['avg_at_k']:.3f} (pass@{k} {r['pass_at_k']:.3f}, {r['seconds']:.0f} s)"
        for who, r in reports.items()
    )


def results_table(before: dict[str, dict] | None, after: dict[str, dict] | None, k: int) -> str:
    """A markdown before/after table of student and teacher Avg@k and pass@k (reports of [`~pbsd_trl.recipes.evaluate.evaluate_avg_at_k`])."""
    rows = [
        (f"student Avg@{k}", "student", "avg_at_k"),
        (f"student pass@{k}", "student", "pass_at_k"),
        (f"teacher (with privileged context) Avg@{k}", "teacher", "avg_at_k"),
        (f"teacher (with privileged context) pass@{k}", "teacher", "pass_at_k"),
    ]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for label, who, key in rows:
        b = (before or {}).get(who, {}).get(key)
        a = (after or {}).get(who, {}).get(key)
        change = f"{a - b:+.3f}" if a is not None and b is not None else "—"
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return "\n".join(lines)


def write_results(output_dir: str | os.PathLike, results: dict[str, Any], table: str, title: str) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` into `output_dir`; return their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# {title}", "", table, ""]
    for key in ("model", "dataset", "train_seconds", "total_seconds", "global_step", "interrupted"):
        if key in results:
            lines.append(f"- {key}: {results[key]}")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


# What an example run leaves in its output folder, in the order the results line lists it
_OUTPUT_GROUPS = (
    (
        "results",
        lambda n: n in ("results.md", "results.json"),
        "the before/after table, and every number of the run (.json)",
    ),
    ("curves", lambda n: n.startswith("training_curves."), "the logged metrics by step"),
    ("checkpoints", lambda n: n.startswith("checkpoint-"), "resume with --resume_from_checkpoint true"),
    ("pool", lambda n: n.startswith("teacher_pool-"), "the teacher's samples, reused when the command is rerun"),
)
_MODEL_NOTE = "the trained model and tokenizer (load them with from_pretrained on this folder)"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def output_listing(output_dir: str | os.PathLike) -> str:
    """Every file and folder in a finished run's `output_dir`, grouped by what it is, one group a line.

    Results, curves, checkpoints and the teacher pool are recognised by name; everything else is what `save_model`
    and `save_pretrained` wrote (weights, config, tokenizer, model card) and shares one line, so that nothing in the
    folder goes unmentioned. The size is the folder's total, checkpoints and pool included.
    """
    out = Path(output_dir)
    entries = sorted(out.iterdir(), key=lambda p: p.name) if out.is_dir() else []
    groups: dict[str, list[str]] = {name: [] for name, _, _ in _OUTPUT_GROUPS}
    model: list[str] = []
    for entry in entries:
        label = entry.name + ("/" if entry.is_dir() else "")
        group = next((name for name, matches, _ in _OUTPUT_GROUPS if matches(entry.name)), None)
        (groups[group] if group else model).append(label)
    megabytes = sum(_size(entry) for entry in entries) / 1e6
    lines = [f"[pbsd] Output folder {out}/ ({megabytes:.0f} MB):"]
    for name, _, note in _OUTPUT_GROUPS[:2]:
        if groups[name]:
            lines.append(f"  {', '.join(groups[name])}: {note}")
    if model:
        lines.append(f"  {', '.join(model)}: {_MODEL_NOTE}")
    for name, _, note in _OUTPUT_GROUPS[2:]:
        if groups[name]:
            lines.append(f"  {', '.join(groups[name])}: {note}")
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_training_curves(
    log_history: list[dict], path: str | os.PathLike, metrics: Sequence[str] = PLOT_METRICS, title: str = ""
) -> Path | None:
    """
    Save a PNG of `metrics` from `trainer.state.log_history` (one panel each, raw and smoothed).

    Student and teacher rewards share a panel. The curves are also written as JSON next to it (`<path>` with a `.json`
    suffix) so that they survive without matplotlib. Returns the PNG path, or `None` when matplotlib is not installed
    or nothing was logged.
    """
    path = Path(path)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for metric in metrics:
        steps, values = [], []
        for entry in log_history:
            if metric in entry and "step" in entry and isinstance(entry[metric], (int, float)):
                if not math.isnan(entry[metric]):
                    steps.append(entry["step"])
                    values.append(float(entry[metric]))
        series[metric] = (steps, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({m: {"step": s, "value": v} for m, (s, v) in series.items()}))
    if not any(values for _, values in series.values()):
        return None
    try:
        # The object-oriented API without pyplot: no global backend switch (a notebook keeps its inline backend)
        from matplotlib.figure import Figure  # optional dependency (pbsd-trl[plot])
    except ImportError:
        logger.warning("matplotlib is not installed (pip install pbsd-trl[plot]): curves written as JSON only.")
        return None

    panels: list[list[str]] = []
    rewards = [m for m in metrics if m.endswith("_reward")]
    if rewards:
        panels.append(rewards)
    panels += [[m] for m in metrics if m not in rewards]
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for metric in panel:
            steps, values = series[metric]
            if not values:
                continue
            label = metric.split("/", 1)[-1]
            line = ax.plot(steps, values, alpha=0.35, linewidth=1)[0]
            ax.plot(steps, _smooth(values, 5), color=line.get_color(), linewidth=2, label=label)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(m.split("/", 1)[-1] for m in panel), fontsize=10)
        ax.grid(alpha=0.3)
        if len(panel) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

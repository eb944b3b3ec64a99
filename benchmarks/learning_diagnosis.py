# Copyright 2026 The pbsd-trl authors. Licensed under the Apache License, Version 2.0.
"""
Diagnosis of PBSD's early reward dip (issue 15, item 5): what in the objective lowers the student's reward in the
first steps of the default job, and which variant avoids it.

Each variant trains the built-in math base model (seed 0, the default job's 8 prompts x 8 samples, lr 1e-4 unless the
variant says otherwise) for `--steps` steps and records:

- every step: the on-policy training reward and PBSD's logged metrics (margin, preference accuracy, the implicit
  log-ratios `log π_θ(y|x) - log π_T(y|x,c)` of the teacher and the student samples);
- every `--eval_every` steps: Avg@8 on the first `--eval_problems` problems of the *validation* half of the held-out
  set (rows 0-99; the tuned benchmark's test half, rows 100-199, is never touched here);
- every `--probe_every` steps: the student's sequence log-prob `log π_θ(y|x)` (student prompt) of a fixed probe set
  drawn once from the base model on `--probe_problems` validation problems: the base student's own *correct*
  samples, its own *wrong* samples, and teacher samples (base model prompted with the reference solution). The
  change of these from step 0 says what the update does to each kind of sample.

Every finished variant is stored in `<output_dir>/learning_diagnosis_runs/` by a hash of its specification, so a
rerun only runs what is missing.

Usage:
    python benchmarks/learning_diagnosis.py                                # all variants -> learning_diagnosis.*
    python benchmarks/learning_diagnosis.py --variants role reward-drop    # a subset
    python benchmarks/learning_diagnosis.py --quick --output_dir /tmp/x    # smoke run on a test-size model
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

import torch  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.methods import build_trainer, teacher_samples_per_step  # noqa: E402
from harness.runs import RunCache, model_identity, smoke_base_model  # noqa: E402
from harness.splits import eval_splits  # noqa: E402
from harness.system import display_path, machine_description, pyplot, quiet_training_logs  # noqa: E402


DIAGNOSIS_VERSION = 1
# name -> (method, configuration on top of the default job: lr 1e-4, pbsd_beta 0.1, role labels)
VARIANTS = {
    "role": ("PBSD", {"learning_rate": 1e-4, "pbsd_beta": 0.1}),
    "reward-drop": ("PBSD", {"learning_rate": 1e-4, "pbsd_beta": 0.1, "pair_labels": "reward", "tie_policy": "drop"}),
    "reward-role": ("PBSD", {"learning_rate": 1e-4, "pbsd_beta": 0.1, "pair_labels": "reward", "tie_policy": "role"}),
    "role-lennorm": ("PBSD", {"learning_rate": 1e-4, "pbsd_beta": 4.0, "length_normalize": True}),
    "role-beta1": ("PBSD", {"learning_rate": 1e-4, "pbsd_beta": 1.0}),
    "role-lr3e-5": ("PBSD", {"learning_rate": 3e-5, "pbsd_beta": 0.1}),
    "GRPO": ("GRPO", {"learning_rate": 1e-4}),
}
DEFAULT_VARIANTS = ("role", "reward-drop", "reward-role", "role-lennorm", "GRPO")
LABELS = {
    "role": "PBSD role labels (default job)",
    "reward-drop": "PBSD reward labels, ties dropped",
    "reward-role": "PBSD reward labels, ties by role",
    "role-lennorm": "PBSD role, length-normalized, β=4",
    "role-beta1": "PBSD role, β=1",
    "role-lr3e-5": "PBSD role, lr 3e-5",
    "GRPO": "GRPO (reference)",
}
HISTORY = (
    "reward",
    "pbsd/margin",
    "pbsd/preference_accuracy",
    "pbsd/log_ratio_teacher_samples",
    "pbsd/log_ratio_student_samples",
    "pbsd/student_reward",
    "pbsd/teacher_reward",
    "pbsd/label_flipped_frac",
    "pbsd/label_dropped_frac",
    "pbsd/tie_frac",
)
PROBE_SETS = ("student_correct", "student_wrong", "teacher")
EARLY_LATE_METRICS = (  # the PBSD metrics the report compares between the first and the last 5 steps
    "pbsd/margin",
    "pbsd/preference_accuracy",
    "pbsd/log_ratio_teacher_samples",
    "pbsd/log_ratio_student_samples",
    "pbsd/label_flipped_frac",
    "pbsd/label_dropped_frac",
)


# ----------------------------------------------------------------------------------------------------------------
# Probe set
# ----------------------------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _sample(model, tokenizer, prompt_ids: list[int], n: int, max_new_tokens: int, seed: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids] * n)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    samples = []
    for row in out[:, len(prompt_ids) :].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]  # the end-of-turn token is a completion token, as in GRPO's mask
        samples.append([t for t in row if t != tokenizer.pad_token_id])
    return samples


def build_probe(
    model,
    tokenizer,
    dataset,
    reward_funcs,
    template: str,
    n_student: int,
    n_teacher: int,
    max_new_tokens: int,
    seed: int = 0,
) -> dict:
    """Base-model samples on `dataset`: `{set name: [(prompt ids, completion ids), ...]}` (student prompt ids)."""
    probe = {name: [] for name in PROBE_SETS}
    for i, row in enumerate(dataset):
        question = row["prompt"][-1]["content"]
        student_prompt = _prompt_ids(tokenizer, question)
        teacher_prompt = _prompt_ids(
            tokenizer, template.format(prompt=question, privileged_context=row["privileged_context"])
        )
        student = _sample(model, tokenizer, student_prompt, n_student, max_new_tokens, seed + 2 * i)
        teacher = _sample(model, tokenizer, teacher_prompt, n_teacher, max_new_tokens, seed + 2 * i + 1)
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in student]
        extra = {k: [row[k]] * len(texts) for k in row if k not in ("prompt",)}
        rewards = reward_funcs[0](
            prompts=[row["prompt"]] * len(texts),
            completions=[[{"role": "assistant", "content": t}] for t in texts],
            **extra,
        )
        for ids, r in zip(student, rewards, strict=False):
            probe["student_correct" if r and r > 0.5 else "student_wrong"].append((student_prompt, ids))
        probe["teacher"].extend((student_prompt, ids) for ids in teacher)
    return probe


def probe_logps(model, probe: dict) -> dict:
    """Mean sequence log-prob and mean per-token log-prob of each probe set under `model` (student prompts)."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for name, pairs in probe.items():
            seq, tok = [], []
            for prompt_ids, completion in pairs:
                if not completion:
                    continue
                ids = torch.tensor([prompt_ids + completion])
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
                lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
                seq.append(lp.sum().item())
                tok.append(lp.mean().item())
            out[name] = {
                "seq": statistics.fmean(seq) if seq else float("nan"),
                "token": statistics.fmean(tok) if tok else float("nan"),
                "n": len(seq),
            }
    if was_training:
        model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# A diagnosis run
# ----------------------------------------------------------------------------------------------------------------


def run_variant(name: str, args, ctx: dict) -> dict:
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, TrainerCallback, set_seed

    from pbsd_trl.recipes.evaluate import evaluate_avg_at_k

    method, config = VARIANTS[name]
    settings = ctx["settings"]
    set_seed(args.seed)
    model, tokenizer = ctx["load"]()
    record = {"history": {k: [] for k in ("step", *HISTORY)}, "evals": [], "probes": []}

    def evaluate(m, step):
        report = evaluate_avg_at_k(
            m,
            tokenizer,
            ctx["val"],
            ctx["rewards"],
            k=8,
            max_new_tokens=settings["max_completion_length"],
            temperature=1.0,
            seed=30_000 + args.seed,
            batch_size=32,
            progress_bar=False,
        )
        record["evals"].append({"step": step, "avg_at_8": report["avg_at_k"], "pass_at_8": report["pass_at_k"]})

    def probe(m, step):
        record["probes"].append({"step": step, **probe_logps(m, ctx["probe"])})

    bar = tqdm(total=args.steps, desc=f"diagnosis {name}", unit="step", dynamic_ncols=True, mininterval=5)

    class Diagnose(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kwargs):
            evaluate(model, 0)
            probe(model, 0)

        def on_log(self, a, state, control, logs=None, model=None, **kwargs):
            logs = logs or {}
            if "completions/mean_length" not in logs:
                return control
            step = state.global_step
            record["history"]["step"].append(step)
            for key in HISTORY:
                record["history"][key].append(logs.get(key))
            if step % args.probe_every == 0:
                probe(model, step)
            if step % args.eval_every == 0:
                evaluate(model, step)
            bar.update(1)
            if step >= args.steps:
                control.should_training_stop = True
            return control

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"diagnosis-{name}-") as tmp:
        trainer = build_trainer(
            "math", method, config, settings, args.seed, model, tokenizer, ctx["train"], tmp, [Diagnose()]
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    bar.close()
    record["seconds"] = time.perf_counter() - t0
    record["teacher_samples_per_step"] = teacher_samples_per_step(method, config, settings)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Summary, report, plot
# ----------------------------------------------------------------------------------------------------------------


def _window_mean(history: dict, key: str, lo: int, hi: int) -> float:
    values = [
        v
        for s, v in zip(history["step"], history[key], strict=False)
        if lo <= s <= hi and v is not None and not math.isnan(v)
    ]
    return statistics.fmean(values) if values else float("nan")


def summarize(record: dict, steps: int) -> dict:
    evals = {e["step"]: e["avg_at_8"] for e in record["evals"]}
    probes = {p["step"]: p for p in record["probes"]}
    base = probes[0]
    h = record["history"]
    early_hi = max(5, steps // 4)
    out = {
        "val_avg8": evals,
        "val_min": min(evals.values()),
        "val_min_step": min(evals, key=evals.get),
        "val_drop": min(evals.values()) - evals[0],
        "reward_first5": _window_mean(h, "reward", 1, 5),
        "reward_early": _window_mean(h, "reward", early_hi - 4, early_hi + 5),
        "reward_last10": _window_mean(h, "reward", steps - 9, steps),
        "delta_logp": {
            s: {name: p[name]["seq"] - base[name]["seq"] for name in PROBE_SETS} for s, p in probes.items()
        },
        "probe_n": {name: base[name]["n"] for name in PROBE_SETS},
    }
    for key in EARLY_LATE_METRICS:
        out[key] = (_window_mean(h, key, 1, 5), _window_mean(h, key, steps - 4, steps))
    return out


def _f(x, digits=3, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def write_report(path: Path, payload: dict, plot_path: Path | None) -> None:
    a = payload["config"]
    steps = a["steps"]
    lines = [
        "# Diagnosis of PBSD's early reward dip (math task)",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Started {payload['started']}; {payload['executed']} new runs in {payload['total_seconds'] / 60:.1f} min."
        + (" **--quick smoke run: the numbers mean nothing.**" if a["quick"] else ""),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in payload["machine"].items()],
        "",
        "## Setup",
        "",
        f"- Base model `{payload['model_path']}`; seed {a['seed']}; {a['prompts_per_step']} prompts x "
        f"{a['num_generations']} samples per step; {steps} optimizer steps per variant; constant learning rate.",
        f"- Validation Avg@8 on the first {a['eval_problems']} validation problems (held-out rows 0-"
        f"{a['eval_problems'] - 1}) every {a['eval_every']} steps (sampling seed fixed, so every variant is scored on the "
        "same draws at step 0).",
        f"- Probe: {a['probe_problems']} validation problems, {a['probe_student']} base-student samples each (split by "
        f"reward into correct / wrong) and {a['probe_teacher']} teacher samples each; n = "
        + ", ".join(f"{k} {v}" for k, v in payload["probe_n"].items())
        + f". Δ log π = change of the student's mean sequence log-prob of a set since step 0, every {a['probe_every']} "
        "steps.",
        "",
        "## Measured",
        "",
        "| variant | val Avg@8 by step | min (step) | min − step 0 | train reward steps 1-5 / mid / last 10 |",
        "|---|---|---|---|---|",
    ]
    for name, s in payload["summaries"].items():
        by_step = ", ".join(f"{st}: {v:.3f}" for st, v in sorted(s["val_avg8"].items(), key=lambda kv: int(kv[0])))
        lines.append(
            f"| {LABELS[name]} | {by_step} | {s['val_min']:.3f} ({s['val_min_step']}) | {_f(s['val_drop'], sign=True)} "
            f"| {_f(s['reward_first5'])} / {_f(s['reward_early'])} / {_f(s['reward_last10'])} |"
        )
    lines += [
        "",
        "Δ log π of the probe sets (nats per sequence, vs step 0):",
        "",
        "| variant | "
        + " | ".join(f"step {st}: correct / wrong / teacher" for st in payload["probe_steps_shown"])
        + " |",
        "|---|" + "---|" * len(payload["probe_steps_shown"]),
    ]
    for name, s in payload["summaries"].items():
        cells = []
        for st in payload["probe_steps_shown"]:
            d = s["delta_logp"].get(str(st)) or s["delta_logp"].get(st)
            cells.append("–" if d is None else " / ".join(_f(d[k], 1, sign=True) for k in PROBE_SETS))
        lines.append(f"| {LABELS[name]} | {' | '.join(cells)} |")
    lines += [
        "",
        "PBSD's logged metrics, mean over steps 1-5 → mean over the last 5 steps:",
        "",
        "| variant | margin | preference accuracy | log-ratio teacher samples | log-ratio student samples "
        "| label flipped | label dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in payload["summaries"].items():
        if VARIANTS[name][0] != "PBSD":
            continue
        cells = [f"{_f(s[k][0], 2)} → {_f(s[k][1], 2)}" for k in EARLY_LATE_METRICS]
        lines.append(f"| {LABELS[name]} | {' | '.join(cells)} |")
    lines.append("")
    if plot_path:
        lines += [
            f"![diagnosis]({plot_path.name})",
            "",
            f"`{plot_path.name}`: validation Avg@8, on-policy training reward (5-step mean), and Δ log π of the "
            "base student's correct samples and of teacher samples, per variant.",
            "",
        ]
    if payload.get("findings"):
        lines += ["## Findings", "", payload["findings"], ""]
    path.write_text("\n".join(lines))


def plot(payload: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for name, rec in payload["records"].items():
        evals = sorted((e["step"], e["avg_at_8"]) for e in rec["evals"])
        axes[0].plot(*zip(*evals, strict=False), marker="o", ms=3, label=LABELS[name])
        h = rec["history"]
        r = [v if v is not None else float("nan") for v in h["reward"]]
        smooth = [
            statistics.fmean([x for x in r[max(0, i - 4) : i + 1] if not math.isnan(x)] or [float("nan")])
            for i in range(len(r))
        ]
        axes[1].plot(h["step"], smooth, label=LABELS[name])
        probes = sorted(rec["probes"], key=lambda p: p["step"])
        base = probes[0]
        for ax, key in ((axes[2], "student_correct"), (axes[3], "teacher")):
            ax.plot(
                [p["step"] for p in probes],
                [p[key]["seq"] - base[key]["seq"] for p in probes],
                marker=".",
                label=LABELS[name],
            )
    titles = (
        "validation Avg@8",
        "on-policy training reward (5-step mean)",
        "Δ log π: base student's correct samples",
        "Δ log π: teacher samples",
    )
    for ax, title in zip(axes, titles, strict=False):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[2].axhline(0, color="k", lw=0.8)
    axes[3].axhline(0, color="k", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--eval_problems", type=int, default=50)
    p.add_argument("--probe_every", type=int, default=5)
    p.add_argument("--probe_problems", type=int, default=24)
    p.add_argument("--probe_student", type=int, default=4)
    p.add_argument("--probe_teacher", type=int, default=2)
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--findings", default=None, help="Markdown file whose text becomes the report's Findings section.")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_problems, args.probe_every = 4, 2, 4, 2
        args.probe_problems, args.prompts_per_step, args.train_size = 3, 2, 32
    return args


def main(argv=None):
    args = parse_args(argv)
    quiet_training_logs(args.num_threads)
    from pbsd_trl.recipes.data.tasks import TASKS
    from pbsd_trl.recipes.models import load_model_and_tokenizer
    from pbsd_trl.recipes.tiny import get_base_model

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        model_path = smoke_base_model("math", out_dir)
    else:
        model_path = get_base_model("math")
    spec_task = TASKS["math"]
    val, _ = eval_splits("math", 100, 100)
    settings = {
        "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations,
        "max_completion_length": spec_task.max_completion_length,
        "train_size": args.train_size,
    }
    rewards = list(spec_task.reward_funcs)
    cache = RunCache(out_dir / "learning_diagnosis_runs")
    specs = {
        name: {
            "version": DIAGNOSIS_VERSION,
            "task": "diagnosis",
            "variant": VARIANTS[name],
            "seed": args.seed,
            "steps": args.steps,
            "settings": settings,
            "model": model_identity(model_path),
            "probe": [args.probe_problems, args.probe_student, args.probe_teacher],
            "eval": [args.eval_every, args.eval_problems, args.probe_every],
        }
        for name in args.variants
    }
    records = {name: cache.get(spec) for name, spec in specs.items()}
    ctx = None
    if any(r is None for r in records.values()):  # the probe is drawn only when something has to run
        base_model, tokenizer = load_model_and_tokenizer(model_path)
        probe = build_probe(
            base_model,
            tokenizer,
            val.select(range(args.probe_problems)),
            rewards,
            spec_task.teacher_prompt_template,
            args.probe_student,
            args.probe_teacher,
            settings["max_completion_length"],
        )
        del base_model
        ctx = {
            "settings": settings,
            "load": lambda: load_model_and_tokenizer(model_path),
            "probe": probe,
            "val": val.select(range(args.eval_problems)),
            "rewards": rewards,
            "train": spec_task.make_dataset("train", args.train_size, args.seed),
        }
    cli = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    payload = {
        "command": " ".join(["python benchmarks/learning_diagnosis.py", *([shlex.join(cli)] if cli else [])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_description(),
        "config": {k: v for k, v in vars(args).items() if k not in ("output_dir", "findings")},
        "model_path": display_path(model_path),
        "records": {},
        "summaries": {},
        "executed": 0,
    }
    for name in args.variants:
        record = records[name]
        if record is None:
            record = run_variant(name, args, ctx)
            cache.put(specs[name], record)
            payload["executed"] += 1
            print(f"[diagnosis] {name}: {record['seconds']:.0f} s", flush=True)
        payload["records"][name] = record
        payload["summaries"][name] = summarize(record, args.steps)
    first_probe = next(iter(payload["records"].values()))["probes"][0]
    payload["probe_n"] = {k: first_probe[k]["n"] for k in PROBE_SETS}
    pe = args.probe_every
    payload["probe_steps_shown"] = sorted({pe, 2 * pe, (args.steps // 2) // pe * pe, args.steps // pe * pe} - {0})
    payload["total_seconds"] = time.perf_counter() - start
    if args.findings:
        payload["findings"] = Path(args.findings).read_text()
    stem = "learning_diagnosis"
    plot_path = plot(payload, out_dir / f"{stem}.png")
    write_report(out_dir / f"{stem}.md", payload, plot_path)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({k: v for k, v in payload.items() if k != "records"}, indent=1, default=str)
    )
    print(f"[diagnosis] wrote {out_dir / (stem + '.md')}", flush=True)
    return payload


if __name__ == "__main__":
    main()

# Copyright 2026 The pbsd-trl authors. Licensed under the Apache License, Version 2.0.
"""Shared pieces of the example scripts (``examples/math.py``, ``examples/tool_use.py``).

- :data:`TASKS`: the built-in tasks (reward functions, teacher templates, default training settings).
- :func:`load_prompt_dataset`: built-in, local-file or hub datasets with column mapping into PBSD's schema
  (``prompt``, ``privileged_context``, reward columns), with errors that name the file and the column.
- :func:`load_model_and_tokenizer`: a causal LM and a left-padding tokenizer with a chat template.
- :class:`SignalCheckpointCallback`: on SIGTERM/SIGINT, save a checkpoint at the end of the current step and stop.
- :func:`results_table`, :func:`write_results`, :func:`plot_training_curves`: the before/after report.
- :func:`run_example`: the whole example flow (evaluate, train with PBSD, evaluate, report).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "DatasetColumnError",
    "ExampleArguments",
    "SignalCheckpointCallback",
    "TaskSpec",
    "load_model_and_tokenizer",
    "load_prompt_dataset",
    "plot_training_curves",
    "results_table",
    "run_example",
    "write_results",
]

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The paper's LoRA targets (r=64, α=128)."""

PLOT_METRICS = ("pbsd/student_reward", "pbsd/teacher_reward", "pbsd/preference_accuracy", "pbsd/margin")


# ----------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------


def _math_rewards() -> list[Callable]:
    from .rewards import math_accuracy_reward

    return [math_accuracy_reward]


def _tool_rewards() -> list[Callable]:
    from .rewards import tool_call_reward

    return [tool_call_reward]


def _math_builtin(split: str, n: int | None, seed: int):
    from .data.math_task import make_math_dataset

    return make_math_dataset(split, n=n, seed=seed)


def _tool_builtin(split: str, n: int | None, seed: int):
    from .data.tool_task import make_tool_dataset

    return make_tool_dataset(split, n=n, seed=seed)


def _template(module: str, name: str) -> str:
    import importlib

    return getattr(importlib.import_module(f"pbsd_trl.data.{module}"), name)


@dataclass
class TaskSpec:
    """A built-in task: how to score it, prompt its teacher and train on it by default."""

    name: str
    reward_funcs: Callable[[], list[Callable]]
    answer_column: str
    """Column the reward reads the reference from (``--answer_column`` is renamed to it)."""
    reward_columns: tuple[tuple[str, ...], ...]
    """Alternatives of columns the reward needs: each inner tuple is satisfied by any of its columns."""
    builtin: Callable[[str, int | None, int], Any]
    template_ref: tuple[str, str]
    default_config: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher_prompt_template(self) -> str:
        return _template(*self.template_ref)


# Settings of the no-argument runs, applied only where the user (command line or --config) sets nothing.
_COMMON_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 64,  # 8 prompts × 8 completions per step
    "num_generations": 8,
    "gradient_accumulation_steps": 1,
    "pad_to_multiple_of": 16,
    "temperature": 1.0,
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 25,
    "save_total_limit": 2,
    "report_to": "none",
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "seed": 0,
    "gradient_checkpointing": False,  # GRPO turns it on; on a 1M-parameter model it only costs time
}

TASKS: dict[str, TaskSpec] = {
    "math": TaskSpec(
        name="math",
        reward_funcs=_math_rewards,
        answer_column="answer",
        reward_columns=(("answer", "solution"),),
        builtin=_math_builtin,
        template_ref=("math_task", "MATH_TEACHER_TEMPLATE"),
        default_config={
            **_COMMON_DEFAULTS,
            "output_dir": "pbsd-math-tiny",
            "max_completion_length": 56,
            "learning_rate": 1e-4,
            "max_steps": 80,
            "pbsd_beta": 0.1,
        },
    ),
    "tool_use": TaskSpec(
        name="tool_use",
        reward_funcs=_tool_rewards,
        answer_column="golden_answer",
        reward_columns=(("golden_answer",),),
        builtin=_tool_builtin,
        template_ref=("tool_task", "TOOL_TEACHER_TEMPLATE"),
        default_config={
            **_COMMON_DEFAULTS,
            "output_dir": "pbsd-tool-use-tiny",
            "max_completion_length": 64,
            "learning_rate": 1e-4,
            "max_steps": 60,
            "pbsd_beta": 0.1,
        },
    ),
}


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------


class DatasetColumnError(ValueError):
    """A dataset lacks a column the run needs (the message names the dataset and the column)."""


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _is_local_file(name: str) -> bool:
    return os.path.isfile(name) or Path(name).suffix.lower() in _FILE_BUILDERS


def _read_dataset(name: str, split: str, config: str | None):
    """A ``datasets.Dataset`` from a local file or a hub id; errors name the source."""
    from datasets import DatasetDict, load_dataset

    if _is_local_file(name):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"Dataset file {name} does not exist.")
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read dataset file {name}: unknown extension {path.suffix!r} (use one of {sorted(_FILE_BUILDERS)})."
            )
        try:
            return load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:
            raise ValueError(f"Could not parse dataset file {name} as {builder}: {type(err).__name__}: {err}") from err
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as err:
        raise ValueError(f"Could not load dataset {name!r} (split {split!r}): {type(err).__name__}: {err}") from err
    if isinstance(dataset, DatasetDict):  # pragma: no cover - split=None
        dataset = dataset[split]
    return dataset


def load_prompt_dataset(
    name: str,
    *,
    split: str = "train",
    builtin_split: str = "train",
    config: str | None = None,
    prompt_column: str = "prompt",
    solution_column: str | None = None,
    answer_column: str | None = None,
    task: str | TaskSpec | None = None,
    privileged_context_column: str = "privileged_context",
    required_columns: Sequence[Sequence[str]] | None = None,
    require_privileged_context: bool = True,
    num_rows: int | None = None,
    seed: int = 0,
):
    """Loads a dataset into PBSD's schema.

    Args:
        name: ``builtin:math`` / ``builtin:tool_use`` (the built-in tasks; ``builtin_split`` picks ``train``/``eval``),
            a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file, or a hub dataset id.
        split: Split of a hub dataset.
        prompt_column: Column with the problem; renamed to ``prompt``. A plain-text problem becomes a one-turn
            conversation ``[{"role": "user", "content": text}]``.
        solution_column: Column with the privileged context (e.g. a reference solution); renamed to
            ``privileged_context_column``. Default: ``privileged_context_column`` itself.
        answer_column: Column with the reference answer; renamed to the task's reward column (``answer`` for math,
            ``golden_answer`` for tool use). Default: the task's column.
        task: The task whose reward columns are needed (a :data:`TASKS` key or a :class:`TaskSpec`).
        required_columns: Extra column alternatives to require (each inner sequence: any one of its columns).
        require_privileged_context: Whether the privileged-context column must exist.
        num_rows: Keep only the first ``num_rows`` rows.

    Raises:
        DatasetColumnError: a needed column is missing; the message names the dataset (file) and the column.
        ValueError / FileNotFoundError: the file cannot be read (the message names the file).
    """
    spec = TASKS[task] if isinstance(task, str) else task
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in TASKS:
            raise ValueError(f"Unknown built-in dataset {name!r}; expected one of {[f'builtin:{t}' for t in TASKS]}.")
        dataset = TASKS[key].builtin(builtin_split, num_rows, seed)
        if privileged_context_column != "privileged_context":
            dataset = dataset.rename_column("privileged_context", privileged_context_column)
        return dataset

    dataset = _read_dataset(name, split, config)
    columns = list(dataset.column_names)
    where = f"dataset file {name}" if _is_local_file(name) else f"dataset {name!r}"

    def missing(column: str, flag: str) -> DatasetColumnError:
        return DatasetColumnError(
            f"The {where} has no column '{column}' (set it with {flag}); its columns are {columns}."
        )

    if prompt_column not in columns:
        raise missing(prompt_column, "--prompt_column")
    renames: dict[str, str] = {}
    if prompt_column != "prompt":
        renames[prompt_column] = "prompt"
    solution_column = solution_column or privileged_context_column
    if solution_column in columns:
        if solution_column != privileged_context_column:
            renames[solution_column] = privileged_context_column
    elif require_privileged_context:
        raise missing(solution_column, "--solution_column")
    target = spec.answer_column if spec is not None else None
    if answer_column is not None:
        if answer_column not in columns:
            raise missing(answer_column, "--answer_column")
        if target is not None and answer_column != target:
            renames[answer_column] = target
    for old, new in renames.items():
        if new in columns and new not in renames:
            dataset = dataset.remove_columns(new)
    if renames:
        dataset = dataset.rename_columns(renames)
    # math: without an answer column, the reward extracts the final answer from a `solution` column
    if (
        spec is not None
        and spec.name == "math"
        and target not in dataset.column_names
        and "solution" not in dataset.column_names
        and privileged_context_column in dataset.column_names
    ):
        dataset = dataset.add_column("solution", list(dataset[privileged_context_column]))

    needed = list(spec.reward_columns if spec is not None else ()) + [tuple(c) for c in (required_columns or ())]
    for alternatives in needed:
        if not any(column in dataset.column_names for column in alternatives):
            raise DatasetColumnError(
                f"The {where} has no column '{alternatives[0]}' needed by the "
                f"{spec.name if spec else ''} reward (map one with --answer_column); its columns are {columns}."
            )

    if num_rows is not None:
        dataset = dataset.select(range(min(num_rows, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"The {where} has no rows.")
    first = dataset[0]["prompt"]
    if isinstance(first, str):
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    elif not (isinstance(first, list) and first and isinstance(first[0], dict) and "role" in first[0]):
        raise DatasetColumnError(
            f"The {where}: column '{prompt_column}' must hold text or a list of chat messages, got "
            f"{type(first).__name__}."
        )
    return dataset


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def _is_tiny_tokenizer_dir(path: str) -> bool:
    """Whether ``path`` is a local directory holding pbsd-trl's character tokenizer (:mod:`pbsd_trl.tiny`)."""
    config = Path(path) / "tokenizer_config.json"
    if not config.is_file():
        return False
    if (Path(path) / "pbsd_trl_base.json").is_file():
        return True
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    from .tiny import ASSISTANT_TOKEN, END_TOKEN, USER_TOKEN

    specials = set(map(str, data.get("extra_special_tokens") or data.get("additional_special_tokens") or []))
    return {USER_TOKEN, ASSISTANT_TOKEN} <= specials and data.get("eos_token") == END_TOKEN


def load_tokenizer_for(model_name_or_path: str):
    """The tokenizer of a model, left-padded, with a pad token and (for the built-in tiny models) its chat template."""
    from transformers import AutoTokenizer

    if _is_tiny_tokenizer_dir(model_name_or_path):
        # `AutoTokenizer` resolves the tiny character tokenizer to `Qwen2Tokenizer` (from the model config), which
        # silently drops spaces: load it as saved.
        from .tiny import load_tokenizer

        return load_tokenizer(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(model_name_or_path: str, dtype: Any = None, **kwargs):
    """``AutoModelForCausalLM`` and :func:`load_tokenizer_for`; ``dtype`` as ``from_pretrained`` takes it."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype if dtype is not None else "auto", **kwargs)
    tokenizer = load_tokenizer_for(model_name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# Interrupt safety
# ----------------------------------------------------------------------------------------------------


class SignalCheckpointCallback(TrainerCallback):
    """Saves a checkpoint and stops training at the end of the current step after SIGTERM or SIGINT (Ctrl-C).

    The signal handler only sets a flag; at the next ``on_step_end`` the callback sets ``control.should_save`` and
    ``control.should_training_stop``, so the Trainer writes a regular, resumable ``checkpoint-<step>`` (model,
    optimizer, scheduler, RNG and trainer state) and returns from ``train()``. A second signal restores the previous
    handler and re-raises it (hard stop). Under several processes the flag is OR-reduced across them every step, so
    all stop and save at the same step. Call :meth:`request_stop` to trigger the same path programmatically.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.stop_requested = False
        self.received: int | None = None
        self.stopped_at_step: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handlers ------------------------------------------------------------------------------------------------
    def _handler(self, signum, frame):
        if self.stop_requested:  # second signal: give up gracefully saving
            self.uninstall()
            if callable(self._previous.get(signum)):
                self._previous[signum](signum, frame)
            raise KeyboardInterrupt
        self.stop_requested = True
        self.received = signum
        name = signal.Signals(signum).name
        print(f"\n[pbsd] {name} received: saving a checkpoint at the end of this step, then stopping "
              f"(send it again to stop now).", file=sys.stderr, flush=True)

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            logger.warning("SignalCheckpointCallback: not on the main thread, signal handlers not installed.")
            return
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._handler)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover
                pass
        self._previous = {}

    def request_stop(self) -> None:
        self.stop_requested = True

    # -- trainer events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def _synced_flag(self) -> bool:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)
        return self.stop_requested

    def on_step_end(self, args, state, control, **kwargs):
        if self._synced_flag():
            self.stop_requested = True
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def results_table(before: dict[str, dict] | None, after: dict[str, dict] | None, k: int) -> str:
    """A markdown before/after table of student and teacher Avg@k and pass@k (reports of :mod:`pbsd_trl.evaluate`)."""
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
    """Writes ``results.json`` and ``results.md`` into ``output_dir``; returns their paths."""
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
    """Saves a PNG of ``metrics`` from ``trainer.state.log_history`` (one panel each, raw and smoothed).

    Student and teacher rewards share a panel. Also writes the curves as ``<path>.csv``-style JSON next to it
    (``training_curves.json``) so they survive without matplotlib. Returns the PNG path, or ``None`` when matplotlib
    is not installed or nothing was logged.
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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install pbsd-trl[plot]): curves written as JSON only.")
        return None

    panels: list[list[str]] = []
    rewards = [m for m in metrics if m.endswith("_reward")]
    if rewards:
        panels.append(rewards)
    panels += [[m] for m in metrics if m not in rewards]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
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
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The example flow
# ----------------------------------------------------------------------------------------------------


@dataclass
class ExampleArguments:
    """Arguments of the example scripts besides :class:`PBSDConfig` and TRL's ``ModelConfig``.

    ``--model_name_or_path`` (ModelConfig) defaults to the built-in tiny base model of the task
    (:func:`pbsd_trl.tiny.get_base_model`), ``--dataset_name`` to the built-in synthetic task.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local json/jsonl/parquet/csv file. Default: the built-in synthetic task."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split of a hub dataset."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Evaluation split of a hub dataset. Default: hold out `eval_num_problems` training rows."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate evaluation dataset (hub id or local file), same column mapping."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the problem (text or messages)."})
    solution_column: str | None = field(
        default=None,
        metadata={"help": "Column with the privileged context (e.g. reference solution). Default: privileged_context."},
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Column with the reference answer (math) or golden tool calls (tool use)."},
    )
    train_size: int = field(default=2000, metadata={"help": "Rows of the built-in training set."})
    eval_k: int = field(default=8, metadata={"help": "Samples per problem for Avg@k / pass@k."})
    eval_num_problems: int = field(
        default=200, metadata={"help": "Evaluation problems (built-in: the 200 held-out ones). 0 skips evaluation."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Problems per generate call during evaluation."})
    eval_teacher: bool = field(default=True, metadata={"help": "Also evaluate the network with the privileged context."})
    plot: bool = field(default=True, metadata={"help": "Save training_curves.png in the output directory."})
    build_base_model: bool = field(
        default=False,
        metadata={
            "help": "With the built-in tiny base model: build it from scratch (a 1,200-step warm start, ~8 minutes on "
            "2 cores, cached) instead of loading the copy shipped in the package. A build differs from the shipped "
            "weights on another CPU, and so do the numbers it gives."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads (torch.set_num_threads). Default on CPU with the built-in tiny model: the "
            "available cores shared out among the processes (on a quiet 2-core machine 2 threads trained 1.5x and "
            "built the base model 1.65x faster than 1); else torch's default. Pass 1 on a busy machine: oversubscribed "
            "threads spin (2 threads measured 13x slower than 1 for generation on a loaded 2-core machine)."
        },
    )


def _parse(spec: TaskSpec, argv: Sequence[str] | None):
    import torch
    from trl import ModelConfig, TrlParser

    from .config import PBSDConfig

    parser = TrlParser((ExampleArguments, PBSDConfig, ModelConfig))
    defaults = dict(spec.default_config)
    defaults["teacher_prompt_template"] = spec.teacher_prompt_template
    # The paper's LoRA setup when --use_peft is given
    defaults.update(lora_r=64, lora_alpha=128, lora_target_modules=list(LORA_TARGET_MODULES))
    if not torch.cuda.is_available():
        defaults.update(use_cpu=True, bf16=False)
    parser.set_defaults_with_config(**defaults)
    import warnings

    with warnings.catch_warnings():
        # Our default sets GRPO's `gradient_checkpointing` (so that the user's flag still works); not worth a warning
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        return parser.parse_args_and_config(args=list(argv) if argv is not None else None)


def _resume_arg(value):
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in ("true", "latest"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value


def run_example(task: str, argv: Sequence[str] | None = None, title: str | None = None) -> dict[str, Any]:
    """The example flow for a built-in task (``"math"`` or ``"tool_use"``).

    Parses ``(ExampleArguments, PBSDConfig, ModelConfig)`` with TRL's ``TrlParser`` (so ``--config recipe.yaml``
    works; the task's no-argument defaults apply only where neither the command line nor the config sets a value),
    loads the model (default: the built-in tiny base model, built and cached on first use) and the datasets,
    evaluates student and teacher Avg@k, trains with :class:`~pbsd_trl.PBSDTrainer`, evaluates again, prints the
    before/after table and writes ``results.json``, ``results.md`` and ``training_curves.png`` into ``output_dir``.

    Returns the results dict (on every process; evaluations are run on the main process only).
    """
    from accelerate import PartialState
    from trl import get_peft_config

    from .evaluate import evaluate_avg_at_k
    from .trainer import PBSDTrainer

    start = time.perf_counter()
    spec = TASKS[task]
    script_args, training_args, model_args = _parse(spec, argv)
    state = PartialState()
    is_main = state.is_main_process

    def say(*args):
        if is_main:
            print(*args, flush=True)

    # ---- datasets first: bad files / columns fail before any model is built or trained
    column = training_args.privileged_context_column
    common = dict(
        prompt_column=script_args.prompt_column,
        solution_column=script_args.solution_column,
        answer_column=script_args.answer_column,
        task=spec,
        privileged_context_column=column,
        config=script_args.dataset_config,
        seed=training_args.seed,
    )
    builtin = script_args.dataset_name is None
    n_eval = script_args.eval_num_problems
    if builtin:
        train_dataset = load_prompt_dataset(f"builtin:{task}", builtin_split="train", num_rows=script_args.train_size, **common)
        eval_dataset = (
            load_prompt_dataset(f"builtin:{task}", builtin_split="eval", num_rows=min(n_eval, 200), **common)
            if n_eval > 0 else None
        )
    else:
        train_dataset = load_prompt_dataset(script_args.dataset_name, split=script_args.dataset_train_split, **common)
        eval_dataset = None
        if script_args.eval_dataset_name:
            eval_dataset = load_prompt_dataset(
                script_args.eval_dataset_name, split=script_args.dataset_test_split or "test", **common
            )
        elif script_args.dataset_test_split:
            eval_dataset = load_prompt_dataset(script_args.dataset_name, split=script_args.dataset_test_split, **common)
        elif n_eval > 0:
            if len(train_dataset) >= 10:
                held = min(n_eval, len(train_dataset) // 5)
                split = train_dataset.train_test_split(test_size=held, seed=training_args.seed)
                train_dataset, eval_dataset = split["train"], split["test"]
                say(f"[pbsd] Holding out {held} of the dataset's rows for evaluation.")
            else:
                eval_dataset = train_dataset
                say("[pbsd] The dataset is too small to hold rows out: evaluating on training rows.")
        if eval_dataset is not None and n_eval > 0:
            eval_dataset = eval_dataset.select(range(min(n_eval, len(eval_dataset))))
    if n_eval <= 0:
        eval_dataset = None

    # ---- model
    model_path = model_args.model_name_or_path
    num_threads = script_args.num_threads
    if num_threads is None and model_path is None and training_args.use_cpu:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // state.num_processes)
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    if model_path is None:
        from .tiny import get_base_model

        with state.main_process_first():  # one build; the other processes then read the cache
            t0 = time.perf_counter()
            model_path = get_base_model(task, build=script_args.build_base_model, progress_bar=is_main)
            if time.perf_counter() - t0 > 5:
                say(f"[pbsd] Built the tiny {task} base model in {time.perf_counter() - t0:.0f} s: {model_path}")
    model, tokenizer = load_model_and_tokenizer(
        model_path,
        dtype=model_args.dtype,
        revision=model_args.model_revision,
        **({"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}),
    )
    reward_funcs = spec.reward_funcs()
    k = script_args.eval_k
    eval_kwargs = dict(
        batch_size=script_args.eval_batch_size,
        max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature,
        teacher_prompt_template=training_args.teacher_prompt_template,
        privileged_context_column=column,
        seed=training_args.seed,
    )

    def evaluate(net, label: str) -> dict | None:
        if eval_dataset is None or not is_main:
            return None
        reports = {"student": evaluate_avg_at_k(net, tokenizer, eval_dataset, reward_funcs, k, description=f"{label} student", **eval_kwargs)}
        if script_args.eval_teacher:
            reports["teacher"] = evaluate_avg_at_k(
                net, tokenizer, eval_dataset, reward_funcs, k, with_privileged_context=True,
                description=f"{label} teacher", **eval_kwargs,
            )
        summary = ", ".join(f"{who} Avg@{k} {r['avg_at_k']:.3f} (pass@{k} {r['pass_at_k']:.3f}, {r['seconds']:.0f} s)" for who, r in reports.items())
        say(f"[pbsd] {label}: {summary}")
        return reports

    resume = _resume_arg(training_args.resume_from_checkpoint)
    before = None
    if resume is None:
        before = evaluate(model, "before training")
    else:
        say("[pbsd] Resuming: skipping the before-training evaluation.")
    state.wait_for_everyone()

    # ---- train
    stopper = SignalCheckpointCallback()
    trainer = PBSDTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[stopper],
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - t0
    interrupted = stopper.stop_requested
    out_dir = Path(training_args.output_dir)

    results: dict[str, Any] = {
        "task": task,
        "model": model_path,
        "dataset": script_args.dataset_name or f"builtin:{task}",
        "k": k,
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 1),
        "interrupted": interrupted,
    }
    if interrupted:
        checkpoint = out_dir / f"checkpoint-{trainer.state.global_step}"
        say(
            f"[pbsd] Interrupted at step {trainer.state.global_step}: checkpoint saved to {checkpoint}. Continue with "
            f"the same command plus --resume_from_checkpoint {checkpoint}"
        )
        after = None
    else:
        trainer.save_model(str(out_dir))  # every process: collective under DeepSpeed ZeRO-3
        if is_main:
            tokenizer.save_pretrained(str(out_dir))
        state.wait_for_everyone()
        after = evaluate(trainer.accelerator.unwrap_model(trainer.model), "after training")
    state.wait_for_everyone()

    if is_main:
        plot = None
        if script_args.plot:
            plot = plot_training_curves(
                trainer.state.log_history, out_dir / "training_curves.png", title=title or f"PBSD on {task}"
            )
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        results["before"], results["after"] = before, after
        results["training_curves"] = str(plot) if plot else None
        table = results_table(before, after, k) if (before or after) else "(no evaluation)"
        json_path, md_path = write_results(out_dir, results, table, title or f"PBSD on {task}")
        say("")
        say(table)
        say("")
        say(f"[pbsd] Results: {json_path} and {md_path}" + (f"; training curves: {plot}" if plot else ""))
        say(f"[pbsd] Total time {results['total_seconds']:.0f} s (training {train_seconds:.0f} s).")
    state.wait_for_everyone()
    return results

"""What the example scripts share: their arguments beside `PBSDConfig` and `ModelConfig`, their defaults, parsing."""

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from trl import ModelConfig, TrlParser

from ..config import PBSDConfig
from .data.tasks import TaskSpec


LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The paper's LoRA targets (r=64, α=128)."""

# Settings of the no-argument runs, applied only where the user (command line or --config) sets nothing.
EXAMPLE_DEFAULTS: dict[str, Any] = {
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
    # The paper's LoRA setup when --use_peft is given
    "lora_r": 64,
    "lora_alpha": 128,
    "lora_target_modules": LORA_TARGET_MODULES,
}


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """
    Arguments of the example scripts besides [`PBSDConfig`] and TRL's `ModelConfig`.

    `--model_name_or_path` (`ModelConfig`) defaults to the built-in tiny base model of the task
    ([`~pbsd_trl.recipes.tiny.get_base_model`]), `--dataset_name` to the built-in synthetic task.

    Args:
        dataset_test_split: Evaluation split of a hub dataset. Default: hold out `eval_num_problems` training rows.
        eval_dataset_name: Separate evaluation dataset (hub id or local file), same column mapping.
        prompt_column: Column with the problem (text or messages).
        solution_column: Column with the privileged context (e.g. a reference solution).
        answer_column: Column with the reference answer (math) or golden tool calls (tool use).
        train_size: Rows of the built-in training set.
        eval_k: Samples per problem for Avg@k / pass@k.
        eval_num_problems: Evaluation problems (built-in: the 200 held-out ones); 0 skips evaluation.
        eval_batch_size: Problems per generate call during evaluation.
        eval_teacher: Also evaluate the network with the privileged context.
        auto_teacher_pool: Draw the fixed base teacher's samples for the rows the run visits into a teacher pool
            before training ([`pbsd_trl.pool.use_default_pool`]).
        plot: Save `training_curves.png` in the output directory.
        build_base_model: Build the built-in tiny base model instead of loading the copy shipped in the package.
        num_threads: torch intra-op threads.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id or local json/jsonl/parquet/csv file. Default: the built-in synthetic task."},
    )
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
        metadata={
            "help": "Column with the privileged context (e.g. reference solution). Default: privileged_context."
        },
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
    eval_teacher: bool = field(
        default=True, metadata={"help": "Also evaluate the network with the privileged context."}
    )
    auto_teacher_pool: bool = field(
        default=True,
        metadata={
            "help": "With the fixed base teacher (and HF generate), draw its samples for the rows the run visits into "
            "a teacher pool before training (pbsd_trl.pool.use_default_pool), reused by reruns. False samples the "
            "teacher in every step."
        },
    )
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
            "available cores shared out among the processes; else torch's default. Pass 1 on a busy machine, where "
            "oversubscribed threads spin and generation slows down many times over."
        },
    )

    def dataset_kwargs(self, privileged_context_column: str, seed: int) -> dict[str, Any]:
        """The keyword arguments of [`~pbsd_trl.recipes.data.loading.load_train_and_eval_datasets`] set by these arguments."""
        return dict(
            dataset_name=self.dataset_name,
            dataset_train_split=self.dataset_train_split,
            dataset_test_split=self.dataset_test_split,
            eval_dataset_name=self.eval_dataset_name,
            eval_num_problems=self.eval_num_problems,
            train_size=self.train_size,
            seed=seed,
            config=self.dataset_config,
            prompt_column=self.prompt_column,
            solution_column=self.solution_column,
            answer_column=self.answer_column,
            privileged_context_column=privileged_context_column,
        )


def parse_args(
    task: TaskSpec, defaults: dict[str, Any], argv: Sequence[str] | None = None
) -> tuple[ScriptArguments, PBSDConfig, ModelConfig]:
    """
    Parse `(ScriptArguments, PBSDConfig, ModelConfig)` with TRL's `TrlParser` (so `--config recipe.yaml` works).

    [`EXAMPLE_DEFAULTS`], the task's teacher prompt template and `defaults` apply only where neither the command line
    nor the config file sets a value; without CUDA, `use_cpu=True` and `bf16=False`.
    """
    parser = task_parser(task, defaults)
    with warnings.catch_warnings():
        # Our default sets GRPO's `gradient_checkpointing` (so that the user's flag still works); not worth a warning
        warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
        return parser.parse_args_and_config(args=list(argv) if argv is not None else None)


def task_parser(task: TaskSpec, defaults: dict[str, Any]) -> TrlParser:
    """TRL's `TrlParser` over `(ScriptArguments, PBSDConfig, ModelConfig)` with [`EXAMPLE_DEFAULTS`], the task's
    teacher prompt template and `defaults` (without CUDA also `use_cpu=True`, `bf16=False`) where neither the command
    line nor a `--config` file sets a value."""
    parser = TrlParser((ScriptArguments, PBSDConfig, ModelConfig))
    device_defaults = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}
    parser.set_defaults_with_config(
        **EXAMPLE_DEFAULTS, teacher_prompt_template=task.teacher_prompt_template, **device_defaults, **defaults
    )
    return parser


def resume_arg(value: str | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: `true`/`latest` → the latest checkpoint."""
    if isinstance(value, str) and value.lower() in ("true", "latest"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value


def set_num_threads(num_threads: int | None, builtin_model: bool, use_cpu: bool, num_processes: int) -> None:
    """`torch.set_num_threads`; by default, with the built-in tiny model on CPU, the cores shared among processes."""
    if num_threads is None and builtin_model and use_cpu:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_threads = max(1, cores // num_processes)
    if num_threads is not None:
        torch.set_num_threads(num_threads)

"""Datasets in PBSD's schema: built-in, local-file or hub datasets with their columns mapped, and the eval split."""

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from datasets import DatasetDict, load_dataset

from .tasks import TASKS, TaskSpec


logger = logging.getLogger(__name__)


class DatasetColumnError(ValueError):
    """A dataset lacks a column the run needs (the message names the dataset and the column)."""


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _is_local_file(name: str) -> bool:
    return os.path.isfile(name) or Path(name).suffix.lower() in _FILE_BUILDERS


def _read_dataset(name: str, split: str, config: str | None):
    """A `datasets.Dataset` from a local file or a hub id; errors name the source."""
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
    """
    Load a dataset into PBSD's schema (`prompt`, the privileged-context column, the task's reward columns).

    Args:
        name: `builtin:math` / `builtin:tool_use` (the built-in tasks; `builtin_split` picks `train`/`eval`),
            a local `.json`/`.jsonl`/`.parquet`/`.csv` file, or a hub dataset id.
        split: Split of a hub dataset.
        builtin_split: Split of a built-in dataset.
        config: Configuration of a hub dataset.
        prompt_column: Column with the problem; renamed to `prompt`. A plain-text problem becomes a one-turn
            conversation `[{"role": "user", "content": text}]`.
        solution_column: Column with the privileged context (e.g. a reference solution); renamed to
            `privileged_context_column`. Default: `privileged_context_column` itself.
        answer_column: Column with the reference answer; renamed to the task's reward column (`answer` for math,
            `golden_answer` for tool use). Default: the task's column.
        task: The task whose reward columns are needed (a [`TASKS`] key or a [`TaskSpec`]).
        privileged_context_column: Name of the privileged-context column in the result.
        required_columns: Extra column alternatives to require (each inner sequence: any one of its columns).
        require_privileged_context: Whether the privileged-context column must exist.
        num_rows: Keep only the first `num_rows` rows.
        seed: Seed of a built-in training split.

    Raises:
        `DatasetColumnError`: a needed column is missing; the message names the dataset (file) and the column.
        `ValueError` or `FileNotFoundError`: the file cannot be read (the message names the file).
    """
    spec = TASKS[task] if isinstance(task, str) else task
    if name.startswith("builtin:"):
        return _builtin_dataset(name, builtin_split, num_rows, seed, privileged_context_column)
    dataset = _read_dataset(name, split, config)
    where = f"dataset file {name}" if _is_local_file(name) else f"dataset {name!r}"
    columns = list(dataset.column_names)
    dataset = _rename_to_schema(
        dataset,
        where,
        spec,
        prompt_column,
        solution_column,
        answer_column,
        privileged_context_column,
        require_privileged_context,
    )
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
    return _as_conversations(dataset, where, prompt_column)


def _builtin_dataset(name: str, builtin_split: str, num_rows: int | None, seed: int, privileged_context_column: str):
    key = name.split(":", 1)[1]
    if key not in TASKS:
        raise ValueError(f"Unknown built-in dataset {name!r}; expected one of {[f'builtin:{t}' for t in TASKS]}.")
    dataset = TASKS[key].make_dataset(builtin_split, n=num_rows, seed=seed)
    if privileged_context_column != "privileged_context":
        dataset = dataset.rename_column("privileged_context", privileged_context_column)
    return dataset


def _rename_to_schema(
    dataset,
    where,
    spec,
    prompt_column,
    solution_column,
    answer_column,
    privileged_context_column,
    require_privileged_context,
):
    """The user's prompt, solution and answer columns renamed to PBSD's names (a column already holding a target
    name is replaced); a missing column is a `DatasetColumnError` naming the flag that maps it."""
    columns = list(dataset.column_names)

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
    for new in renames.values():
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
    return dataset


def _as_conversations(dataset, where: str, prompt_column: str):
    """Plain-text prompts as one-turn conversations; anything but text or chat messages is refused."""
    first = dataset[0]["prompt"]
    if isinstance(first, str):
        return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    if not (isinstance(first, list) and first and isinstance(first[0], dict) and "role" in first[0]):
        raise DatasetColumnError(
            f"The {where}: column '{prompt_column}' must hold text or a list of chat messages, got "
            f"{type(first).__name__}."
        )
    return dataset


def load_train_and_eval_datasets(
    task: TaskSpec,
    dataset_name: str | None = None,
    *,
    dataset_train_split: str = "train",
    dataset_test_split: str | None = None,
    eval_dataset_name: str | None = None,
    eval_num_problems: int = 200,
    train_size: int = 2000,
    seed: int = 0,
    **column_kwargs,
):
    """
    The training and evaluation datasets of the example scripts, both through [`load_prompt_dataset`].

    Without `dataset_name`, the task's built-in synthetic data: `train_size` training rows and the first
    `eval_num_problems` (at most 200) held-out rows. Otherwise the evaluation rows come from `eval_dataset_name`, else
    from `dataset_test_split`, else `eval_num_problems` rows (at most a fifth) are held out of the training set.

    Args:
        task: The task.
        dataset_name: A hub id or a local file, or `None` for the built-in data.
        dataset_train_split: Training split of a hub dataset.
        dataset_test_split: Evaluation split of a hub dataset.
        eval_dataset_name: A separate evaluation dataset, with the same column mapping.
        eval_num_problems: Rows to evaluate on; `0` gives no evaluation dataset.
        train_size: Rows of the built-in training set.
        seed: Seed of the built-in training set and of the held-out split.
        **column_kwargs: Passed to [`load_prompt_dataset`] (`prompt_column`, `solution_column`, `answer_column`,
            `privileged_context_column`, `config`).

    Returns:
        `(train_dataset, eval_dataset)`, `eval_dataset` being `None` when `eval_num_problems` is 0.
    """
    common = dict(task=task, seed=seed, **column_kwargs)
    n_eval = eval_num_problems
    if dataset_name is None:
        builtin = f"builtin:{task.name}"
        train_dataset = load_prompt_dataset(builtin, builtin_split="train", num_rows=train_size, **common)
        eval_dataset = None
        if n_eval > 0:
            eval_dataset = load_prompt_dataset(builtin, builtin_split="eval", num_rows=min(n_eval, 200), **common)
        return train_dataset, eval_dataset

    train_dataset = load_prompt_dataset(dataset_name, split=dataset_train_split, **common)
    if n_eval <= 0:
        return train_dataset, None
    if eval_dataset_name:
        eval_dataset = load_prompt_dataset(eval_dataset_name, split=dataset_test_split or "test", **common)
    elif dataset_test_split:
        eval_dataset = load_prompt_dataset(dataset_name, split=dataset_test_split, **common)
    elif len(train_dataset) >= 10:
        held = min(n_eval, len(train_dataset) // 5)
        split = train_dataset.train_test_split(test_size=held, seed=seed)
        train_dataset, eval_dataset = split["train"], split["test"]
        logger.warning("Holding out %d of the dataset's rows for evaluation.", held)
    else:
        eval_dataset = train_dataset
        logger.warning("The dataset is too small to hold rows out: evaluating on training rows.")
    return train_dataset, eval_dataset.select(range(min(n_eval, len(eval_dataset))))

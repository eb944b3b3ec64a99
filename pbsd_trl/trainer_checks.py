"""The checks `PBSDTrainer` runs at construction (and on a dataset given to `evaluate()`): a bad argument, dataset
row or tokenizer fails with its name before any model is built or any step runs, not deep inside a training step."""

from datasets import Dataset

from .config import PBSDConfig
from .teacher.prompts import check_privileged_context, check_prompt


# Rows per chunk of the construction-time scans of map-style datasets
_CHECK_CHUNK = 1024


def check_trainer_arguments(args, reward_funcs: list, rollout_func, environment_factory) -> None:
    """Arguments that cannot work together, before GRPOTrainer builds anything."""
    if not isinstance(args, PBSDConfig):
        raise TypeError(
            f"PBSDTrainer needs a `PBSDConfig`, got `{type(args).__name__}`. Replace `GRPOConfig(...)` with "
            "`PBSDConfig(...)`: it takes the same arguments."
        )
    if rollout_func is not None and args.num_teacher_generations != args.num_generations:
        raise ValueError(
            "With `rollout_func`, every row needs a teacher rollout: the teacher prompt's tokens are the ones the "
            f"rollout returns. Set `num_teacher_generations` ({args.num_teacher_generations}) to `num_generations` "
            f"({args.num_generations})."
        )
    if args.uses_rewards_in_loss and not reward_funcs and environment_factory is None:
        raise ValueError(f"{reward_use(args)}: pass at least one reward function.")


def reward_use(args) -> str:
    """What the loss does with the rewards, for the error that asks for them."""
    if args.pbsd_loss_type == "kl_regularized_pg":
        return "`pbsd_loss_type='kl_regularized_pg'` is a policy gradient on the reward"
    if args.pair_labels != "role":
        return f"`pair_labels={args.pair_labels!r}` orders pairs by reward"
    return "`teacher_weighting='tilted'` weights the teacher samples by reward"


def named_datasets(train_dataset, eval_dataset):
    """`(name, dataset)` of the train dataset and each eval dataset, named as errors name them."""
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            yield f"eval_dataset[{key!r}]", dataset
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def check_privileged_column(dataset, name: str, args: PBSDConfig, check_prompts: bool = True) -> None:
    """Fail at construction, not at step 1, on a missing column or a row that cannot make a teacher prompt.

    With `check_prompts=False` (an environment may own the prompt) only the privileged context is checked.
    """
    column = args.privileged_context_column
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an iterable dataset of unknown schema: rows are checked as they arrive
        return
    for needed in ("prompt", column) if check_prompts else (column,):
        if needed not in columns:
            raise ValueError(
                f"{name} has no {'privileged-context' if needed == column else 'prompt'} column '{needed}' "
                f"(columns: {columns}). PBSD's teacher is prompted with the prompt and the privileged context: "
                + (
                    "add the column, or set `privileged_context_column` to the column that holds it."
                    if needed == column
                    else "add it (GRPO samples from it)."
                )
            )
    if isinstance(dataset, Dataset):
        rows = dataset.select_columns(["prompt", column] if check_prompts else [column])
        for start in range(0, len(rows), _CHECK_CHUNK):
            chunk = rows[start : start + _CHECK_CHUNK]
            prompts = chunk["prompt"] if check_prompts else [None] * len(chunk[column])
            for row, (prompt, value) in enumerate(zip(prompts, chunk[column], strict=True), start=start):
                try:
                    if check_prompts:
                        check_prompt(prompt, row)
                    check_privileged_context(value, column, row, args.allow_empty_privileged_context)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"{name}: {err}") from None


def check_tokenizer(processing_class) -> None:
    """Padding needs a pad token or, as GRPO's fallback, an EOS token: without both a step would crash deep inside."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token: batches cannot be "
            "padded and completions cannot end. Set one, e.g. `tokenizer.pad_token = ...` or "
            "`tokenizer.add_special_tokens({'eos_token': ...})` (and resize the model's embeddings)."
        )


def check_teacher_prompts(builder, dataset, name: str, column: str, uses_environments: bool) -> None:
    """Tokenize every teacher prompt of a map-style dataset once, so that one that cannot fit fails now."""
    if (
        not isinstance(dataset, Dataset)
        or uses_environments  # the environment's observation joins the prompt later
        or (builder.max_length is None and builder.position_limit is None)
    ):
        return
    rows = dataset.select_columns(["prompt", column])
    for start in range(0, len(rows), _CHECK_CHUNK):
        chunk = rows.select(range(start, min(start + _CHECK_CHUNK, len(rows)))).to_list()
        try:
            builder.check_rows(chunk, list(range(start, start + len(chunk))))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from None

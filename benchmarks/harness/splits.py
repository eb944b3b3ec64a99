"""The held-out problems of a task, split into a validation half (selection) and a test half (reporting)."""


def prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def eval_splits(task: str, num_val: int, num_test: int):
    """Validation rows `[0, num_val)` and test rows `[100, 100 + num_test)` of the task's 200 held-out problems.

    Raises `AssertionError` if a prompt appears in both (the held-out problems are distinct by construction, so this
    guards against a change of the generators).
    """
    from pbsd_trl.recipes.data.tasks import TASKS

    if not (1 <= num_val <= 100 and 1 <= num_test <= 100):
        raise ValueError(f"Each split holds at most 100 problems; got num_val={num_val}, num_test={num_test}.")
    full = TASKS[task].make_dataset("eval", 200, 0)
    val = full.select(range(num_val))
    test = full.select(range(100, 100 + num_test))
    check_disjoint(val, test)
    return val, test


def check_disjoint(val, test) -> None:
    overlap = {prompt_text(p) for p in val["prompt"]} & {prompt_text(p) for p in test["prompt"]}
    assert not overlap, f"validation and test splits share {len(overlap)} prompts, e.g. {sorted(overlap)[:3]}"

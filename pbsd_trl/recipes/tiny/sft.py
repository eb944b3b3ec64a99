"""The warm start: a short SFT from random initialization on the built-in tasks."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2ForCausalLM

from .model import (
    ASSISTANT_TOKEN,
    END_TOKEN,
    USER_TOKEN,
    Task,
    build_char_tokenizer,
    build_random_model,
    torch_threads,
)


DEFAULT_WARM_START_STEPS: dict[str, int] = {"math": 1500, "tool_use": 1500}
"""SFT steps of the default recipe (the shipped base models; their quality, measured with
:data:`~pbsd_trl.recipes.tiny.shipped.BASE_MODEL_EVAL`, is recorded in each ``pbsd_trl_base.json`` and tabled in
``benchmarks/results/tasks.md``). The student's accuracy is bounded by its guess of what only the context says (math:
11/27 of the teacher's, tool use: 1/3), so it stays below 0.45 on a rebuild on any CPU; the teacher's depends on the
float trajectory a little (the cosine schedule ends every build at a low learning rate)."""


# ----------------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------------


def _lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` scheduler steps: linear warmup, then constant or a cosine decay to
    ``min_ratio`` at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"Unknown lr_schedule {schedule!r}; expected 'cosine' or 'constant'.")
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _task_sampler(task: str, rng: random.Random, difficulty: str) -> Callable[[int], list[tuple[str, str, str, str]]]:
    """Returns ``sample(n) -> [(student_user_text, teacher_user_text, student_completion, teacher_completion)]`` for
    a task; fresh training examples on every call, never a held-out one.

    The teacher completion is the task's answer. The student completion is what a model that was not told the
    privileged knowledge of the task would answer: math, the scratchpad of an operation drawn at random among those
    the operands allow (the prompt writes the operation as a code); tool use, the right call with the argument names
    of a signature drawn at random among the tool's real one and its two decoys. So the warm-started student is
    uncertain exactly where the teacher's context informs it, and computes everything else as the teacher does."""
    if task == "math":
        from ..data.math_task import (
            MATH_TEACHER_TEMPLATE,
            math_completion,
            math_hint,
            problem_text,
            train_problems,
            valid_operations,
        )

        def sample(n: int) -> list[tuple[str, str, str, str]]:
            out = []
            for a, op, b in train_problems(rng, n, difficulty):
                question = problem_text(a, op, b)
                teacher = MATH_TEACHER_TEMPLATE.format(prompt=question, privileged_context=math_hint(a, op, b))
                guess = rng.choice(valid_operations(a, b))
                out.append((question, teacher, math_completion(a, guess, b), math_completion(a, op, b)))
            return out

        return sample
    if task == "tool_use":
        from ..data.tool_task import TOOL_TEACHER_TEMPLATE, TOOLS, tool_call, tool_completion, train_examples

        def sample(n: int) -> list[tuple[str, str, str, str]]:
            out = []
            for example in train_examples(rng, n):
                tool = example["tool"]
                teacher = TOOL_TEACHER_TEMPLATE.format(
                    prompt=example["prompt"], privileged_context=example["privileged_context"]
                )
                signature = rng.choice((TOOLS[tool]["signature"], *TOOLS[tool]["decoys"]))
                guess = tool_completion([tool_call(tool, example["values"], signature)])
                out.append((example["prompt"], teacher, guess, tool_completion(example["golden_answer"])))
            return out

        return sample
    raise ValueError(f"Unknown task {task!r}; expected 'math' or 'tool_use'.")


def _sft_batch(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], completions: list[str], pad_to_multiple_of: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding) for chat-formatted pairs."""
    prompt_texts = [USER_TOKEN + p + ASSISTANT_TOKEN for p in prompts]
    completion_texts = [c + END_TOKEN for c in completions]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_texts, add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=False))
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=False)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return input_ids, labels


def _sft_step(model, tokenizer, rows, optimizer, scheduler) -> float:
    """One optimizer step on ``rows``: the first half in student format, the second in teacher format."""
    half = len(rows) // 2
    prompts = [r[0] for r in rows[:half]] + [r[1] for r in rows[half:]]
    completions = [r[2] for r in rows[:half]] + [r[3] for r in rows[half:]]
    input_ids, labels = _sft_batch(tokenizer, prompts, completions)
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _train(model, tokenizer, sample, batch_size, steps, schedule, description, progress_bar, callback) -> None:
    """AdamW from ``schedule = (learning_rate, warmup_steps, lr_schedule, min_lr_ratio)``, ``steps`` steps on fresh
    ``sample(batch_size)`` rows, ``callback(step, model, tokenizer)`` after each one (in eval mode)."""
    from tqdm.auto import tqdm

    learning_rate, warmup_steps, lr_schedule, min_lr_ratio = schedule
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, warmup_steps, lr_schedule, min_lr_ratio)
    )
    model.train()
    running = None
    with tqdm(total=steps, desc=description, disable=not progress_bar, dynamic_ncols=True) as bar:
        for step in range(1, steps + 1):
            loss = _sft_step(model, tokenizer, sample(batch_size), optimizer, scheduler)
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            bar.update(1)
            if callback is not None:
                model.eval()
                callback(step, model, tokenizer)
                model.train()


def warm_start(
    task: Task = "math",
    steps: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    warmup_steps: int = 20,
    lr_schedule: str = "cosine",
    min_lr_ratio: float = 0.05,
    difficulty: str = "medium",
    model_overrides: dict[str, Any] | None = None,
    num_threads: int | None = None,
    progress_bar: bool = True,
    callback: Callable[[int, PreTrainedModel, PreTrainedTokenizerFast], None] | None = None,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Supervised warm start from random initialization on a built-in task.

    Every step draws ``batch_size`` fresh training problems (never a held-out one); the first half is
    in student format (``<|user|>question<|assistant|>answer<|end|>``, the answer of a student that guesses what
    only the privileged context tells, see :func:`_task_sampler`), the second half in teacher format (the question
    with the privileged context appended by the task's teacher template, and the right answer). The loss is the
    cross-entropy of the completion tokens only. AdamW; linear warmup, then a cosine decay to ``min_lr_ratio``
    at ``steps`` (``lr_schedule="cosine"``, the default: the end of the run does not depend on where a noisy
    constant-rate trajectory happens to be) or a constant rate (``"constant"``: the model after ``k`` steps does
    not depend on the total number of steps).

    With the defaults (:data:`DEFAULT_WARM_START_STEPS`), the student is right on part of the held-out problems
    and the teacher (with the hint) on most of them; the shipped copies' numbers are in
    :data:`DEFAULT_WARM_START_STEPS`.

    Args:
        task: ``"math"`` (:mod:`pbsd_trl.recipes.data.math_task`) or ``"tool_use"`` (:mod:`pbsd_trl.recipes.data.tool_task`).
        steps: Optimizer steps; default :data:`DEFAULT_WARM_START_STEPS` of the task.
        seed: Seed of the initialization and of the training problems.
        output_dir: If given, the model and tokenizer are saved there with ``save_pretrained``.
        batch_size: Sequences per step (half student, half teacher format).
        learning_rate: AdamW learning rate.
        warmup_steps: Linear warmup steps.
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio`` times the rate at ``steps``) or ``"constant"``.
        min_lr_ratio: Final learning rate of the cosine schedule, relative to ``learning_rate``.
        difficulty: Math difficulty (see :func:`pbsd_trl.recipes.data.math_task.make_math_dataset`).
        model_overrides: :class:`~transformers.Qwen2Config` fields overriding :func:`tiny_model_config`.
        num_threads: If given, ``torch.set_num_threads`` for the duration of the run.
        progress_bar: Show a tqdm progress bar with the running loss.
        callback: Called as ``callback(step, model, tokenizer)`` after each step (e.g. to evaluate).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    steps = DEFAULT_WARM_START_STEPS[task] if steps is None else steps
    tokenizer = build_char_tokenizer()
    model = build_random_model(tokenizer, size="base", seed=seed, **(model_overrides or {}))
    sample = _task_sampler(task, random.Random(f"warm-start-{task}-{seed}"), difficulty)

    with torch_threads(num_threads):
        schedule = (learning_rate, warmup_steps, lr_schedule, min_lr_ratio)
        _train(model, tokenizer, sample, batch_size, steps, schedule, f"warm start ({task})", progress_bar, callback)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer

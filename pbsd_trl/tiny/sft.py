"""The warm start: a short SFT from random initialization on the built-in tasks."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2ForCausalLM

from .model import ASSISTANT_TOKEN, END_TOKEN, USER_TOKEN, Task, build_char_tokenizer, build_random_model


DEFAULT_WARM_START_STEPS: dict[str, int] = {"math": 1200, "tool_use": 500}
"""SFT steps of the default recipe (the shipped base models). Measured on the shipped copies (seed 0, 1 CPU thread,
held-out sets, temperature 1, :data:`BASE_MODEL_EVAL`; recorded in each ``pbsd_trl_base.json``): math 1200 steps,
student Avg@8 0.256 (pass@8 0.555), teacher with the reference solution 0.925; tool_use 500 steps, student Avg@4
0.288 (pass@4 0.57), teacher with documentation and demonstration 0.35. A rebuild on another CPU gives other
numbers: the learning rate is constant, so accuracy is noisy from step to step (math at 1100 steps: 0.11 / 0.78),
and earlier builds of the same recipe on other machines scored student 0.157 (an Intel Xeon with AVX-512) and 0.302
(an AMD EPYC)."""


# ----------------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------------


def _task_sampler(task: str, rng: random.Random, difficulty: str) -> Callable[[int], list[tuple[str, str, str]]]:
    """Returns ``sample(n) -> [(student_user_text, teacher_user_text, completion)]`` for a task; fresh
    training examples on every call, never a held-out one."""
    if task == "math":
        from ..data.math_task import MATH_TEACHER_TEMPLATE, math_completion, problem_text, train_problems

        def sample(n: int) -> list[tuple[str, str, str]]:
            out = []
            for a, op, b in train_problems(rng, n, difficulty):
                question, solution = problem_text(a, op, b), math_completion(a, op, b)
                teacher = MATH_TEACHER_TEMPLATE.format(prompt=question, privileged_context=solution)
                out.append((question, teacher, solution))
            return out

        return sample
    if task == "tool_use":
        from ..data.tool_task import TOOL_TEACHER_TEMPLATE, tool_completion, train_examples

        def sample(n: int) -> list[tuple[str, str, str]]:
            out = []
            for example in train_examples(rng, n):
                teacher = TOOL_TEACHER_TEMPLATE.format(
                    prompt=example["prompt"], privileged_context=example["privileged_context"]
                )
                out.append((example["prompt"], teacher, tool_completion(example["golden_answer"])))
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


def warm_start(
    task: Task = "math",
    steps: int | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    warmup_steps: int = 20,
    difficulty: str = "medium",
    model_overrides: dict[str, Any] | None = None,
    num_threads: int | None = None,
    progress_bar: bool = True,
    callback: Callable[[int, PreTrainedModel, PreTrainedTokenizerFast], None] | None = None,
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Supervised warm start from random initialization on a built-in task.

    Every step draws ``batch_size`` fresh training problems (never a held-out one); the first half is
    in student format (``<|user|>question<|assistant|>solution<|end|>``), the second half in teacher
    format (the question with the privileged context appended by the task's teacher template). The loss
    is the cross-entropy of the completion tokens only. AdamW, constant learning rate after a linear
    warmup (so the model after ``k`` steps does not depend on the total number of steps).

    With the defaults (:data:`DEFAULT_WARM_START_STEPS`), the math student is right on part of the
    held-out problems (Avg@8 0.30) while the teacher with the reference solution is right on 0.93.

    Args:
        task: ``"math"`` (:mod:`pbsd_trl.data.math_task`) or ``"tool_use"`` (:mod:`pbsd_trl.data.tool_task`).
        steps: Optimizer steps; default :data:`DEFAULT_WARM_START_STEPS` of the task.
        seed: Seed of the initialization and of the training problems.
        output_dir: If given, the model and tokenizer are saved there with ``save_pretrained``.
        batch_size: Sequences per step (half student, half teacher format).
        learning_rate: AdamW learning rate.
        warmup_steps: Linear warmup steps.
        difficulty: Math difficulty (see :func:`pbsd_trl.data.math_task.make_math_dataset`).
        model_overrides: :class:`~transformers.Qwen2Config` fields overriding :func:`tiny_model_config`.
        num_threads: If given, ``torch.set_num_threads`` for the duration of the run.
        progress_bar: Show a tqdm progress bar with the running loss.
        callback: Called as ``callback(step, model, tokenizer)`` after each step (e.g. to evaluate).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from tqdm.auto import tqdm

    steps = DEFAULT_WARM_START_STEPS[task] if steps is None else steps
    tokenizer = build_char_tokenizer()
    model = build_random_model(tokenizer, size="base", seed=seed, **(model_overrides or {}))
    sample = _task_sampler(task, random.Random(f"warm-start-{task}-{seed}"), difficulty)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
        model.train()
        half = batch_size // 2
        running = None
        with tqdm(total=steps, desc=f"warm start ({task})", disable=not progress_bar, dynamic_ncols=True) as bar:
            for step in range(1, steps + 1):
                rows = sample(batch_size)
                prompts = [r[0] for r in rows[:half]] + [r[1] for r in rows[half:]]
                input_ids, labels = _sft_batch(tokenizer, prompts, [r[2] for r in rows])
                loss = model(input_ids=input_ids, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
                bar.update(1)
                if callback is not None:
                    model.eval()
                    callback(step, model, tokenizer)
                    model.train()
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer

"""
Avg@k evaluation of a causal LM with any GRPO-style reward function.

For each problem, `k` completions are sampled (temperature 1.0 by default) and scored by the reward function(s):

- `avg_at_k`: the mean reward over all `n × k` samples (for 0/1 rewards: the mean accuracy, the paper's Avg@k);
- `pass_at_k`: the mean over problems of the best sample's reward (for 0/1 rewards: the fraction of problems solved
  by at least one of the `k` samples);
- `greedy_accuracy` (optional): the mean reward of one greedy completion per problem;
- `per_problem`: each problem's mean reward over its `k` samples.

With `with_privileged_context=True` the model is prompted like PBSD's teacher (the prompt with the privileged context
folded in by `teacher_prompt_template`, see [`~pbsd_trl.teacher.prompts.compose_teacher_prompt`]), while the reward still
judges the answer to the student's question, exactly as during training.

Generation is batched: `batch_size` problems × `k` samples per call through `pbsd_trl.sampling` (HF `generate` on
left-padded prompt ids, tokenized as GRPO tokenizes them, the tokenizer's chat template for conversational prompts).
`use_vllm=True` samples the same prompt ids with `vllm.LLM` instead (needs vLLM and a model path). The command line
is `python -m pbsd_trl.scripts.evaluate`.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from ..config import DEFAULT_TEACHER_PROMPT_TEMPLATE
from ..rewards import combine_rewards
from ..sampling import HFSampler, VLLMSampler, load_vllm
from ..teacher.prompts import check_privileged_context, compose_teacher_prompt
from ..tokens import eos_token_ids, tokenize_prompts


logger = logging.getLogger(__name__)

__all__ = ["evaluate_avg_at_k", "evaluate_student_and_teacher", "score_completions"]

_RESERVED_COLUMNS = {"prompt", "completion", "completion_ids"}


def _noop(*args, **kwargs):
    return None


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def score_completions(
    reward_funcs: Callable | Sequence[Callable],
    prompts: list,
    completions: list,
    completion_ids: list[list[int]] | None,
    columns: dict[str, list],
    reward_weights: Sequence[float] | None = None,
) -> list[float]:
    """Scores completions with GRPO-style reward functions, one value per completion.

    The reward functions are called as GRPO calls them (see [`~pbsd_trl.rewards.combine_rewards`]): keyword arguments
    `prompts`, `completions`, `completion_ids`, every other dataset column as a per-completion list,
    `trainer_state=None` and no-op `log_extra`/`log_metric`. The result is the weighted sum over functions; a `None`
    from a function counts as 0 for that function (as GRPO's `nansum`), and a completion where every function returned
    `None` scores NaN. Async reward functions are run to completion.
    """
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("At least one reward function is needed to evaluate.")
    kwargs = {key: value for key, value in columns.items() if key not in _RESERVED_COLUMNS}
    values = combine_rewards(funcs, reward_weights)(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids,
        trainer_state=None,
        log_extra=_noop,
        log_metric=_noop,
        **kwargs,
    )
    return [float("nan") if value is None else value for value in values]


def evaluate_avg_at_k(
    model,
    tokenizer,
    dataset,
    reward_funcs: Callable | Sequence[Callable],
    k: int = 8,
    *,
    reward_weights: Sequence[float] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    with_privileged_context: bool = False,
    teacher_prompt_template: str | None = None,
    privileged_context_column: str = "privileged_context",
    prompt_column: str = "prompt",
    num_problems: int | None = None,
    seed: int = 0,
    pad_to_multiple_of: int | None = 16,
    use_vllm: bool = False,
    llm=None,
    progress_bar: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    """Samples `k` completions per problem and reports Avg@k, pass@k and per-problem accuracies.

    Args:
        model: A causal LM (`transformers` model, PEFT model, or an accelerate-wrapped one: it is only called through
            `generate`). Ignored when `use_vllm` (then `llm` or a model path is needed).
        tokenizer: Its tokenizer; left padding is used for generation whatever its `padding_side`.
        dataset: A `datasets.Dataset` or a list of row dicts with a `prompt` column (string or list of messages)
            and the columns the reward functions read (e.g. `answer`, `golden_answer`).
        reward_funcs: One or more reward functions with GRPO's signature (see `pbsd_trl.rewards`).
        k: Samples per problem.
        reward_weights: Weights of the reward functions (default 1 each), as GRPO's `reward_weights`.
        batch_size: Problems per `generate` call (`batch_size × k` sequences).
        max_new_tokens: Completion length limit.
        temperature, top_p, top_k: Sampling parameters (`top_k=None`: no top-k filtering).
        greedy: Also report `greedy_accuracy` (one greedy completion per problem).
        with_privileged_context: Prompt the model as PBSD's teacher: `teacher_prompt_template` applied to the
            prompt and the `privileged_context_column` (for conversational prompts, to the last user turn).
        teacher_prompt_template: Needed with `with_privileged_context`; default [`PBSDConfig`]'s.
        privileged_context_column: Column of the privileged context.
        prompt_column: Column of the prompts.
        num_problems: Evaluate only the first `num_problems` rows.
        seed: Seed of the sampling (the global RNG state is restored afterwards).
        pad_to_multiple_of: Pad prompt batches to a multiple of this (stable shapes are faster on CPU).
        use_vllm: Sample with `vllm.LLM` (`llm`, or built from `model` when it is a path string).
        llm: An existing `vllm.LLM`.
        progress_bar: Show a tqdm progress bar.
        description: Label of the progress bar and of the report (`"student"`/`"teacher"` by default).

    Returns:
        A JSON-serializable dict: `avg_at_k`, `pass_at_k`, `greedy_accuracy` (or `None`), `per_problem`
        (mean reward of each problem's samples), `n_problems`, `k`, `seconds`, `prompt` (`"student"` or
        `"teacher"`), `mean_completion_tokens`, `n_unscored` (samples every reward function declined) and the
        sampling settings.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows = _evaluation_rows(dataset, num_problems, prompt_column)
    student_prompts = [row[prompt_column] for row in rows]
    gen_prompts = student_prompts
    if with_privileged_context:
        gen_prompts = _teacher_view(rows, student_prompts, teacher_prompt_template, privileged_context_column)
    role = "teacher" if with_privileged_context else "student"
    start = time.perf_counter()
    generation = dict(settings=(max_new_tokens, temperature, top_p, top_k), seed=seed, use_vllm=use_vllm, llm=llm)
    generation.update(pad_to_multiple_of=pad_to_multiple_of, description=description or role)
    sampled, greedy_ids = _sample_completions(
        model, tokenizer, gen_prompts, k, greedy, batch_size, progress_bar, **generation
    )
    scoring = (tokenizer, rows, student_prompts, prompt_column, reward_funcs, reward_weights)
    greedy_rewards = None if greedy_ids is None else _score_samples(greedy_ids, *scoring)
    seconds = time.perf_counter() - start
    report = _avg_at_k_report(_score_samples(sampled, *scoring), greedy_rewards, sampled, role, k, seconds, generation)
    report["sample_completions"] = [tokenizer.decode(per[0], skip_special_tokens=True) for per in sampled[:3]]
    return report


def _sample_completions(
    model,
    tokenizer,
    prompts,
    k,
    greedy,
    batch_size,
    progress_bar,
    *,
    settings,
    seed,
    use_vllm,
    llm,
    pad_to_multiple_of,
    description,
):
    """`k` sampled completions per prompt, and one greedy completion per prompt when `greedy` (else `None`)."""
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    generate, model = _generator(model, tokenizer, prompt_ids, use_vllm, llm, settings, seed, pad_to_multiple_of)
    # Sort by length so that each batch pads little; results are put back in dataset order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    with _sampling_mode(None if use_vllm else model, seed):
        sampled = _sample_in_batches(generate, order, batch_size, k, True, f"{description} avg@{k}", progress_bar)
        greedy_ids = (
            _sample_in_batches(generate, order, batch_size, 1, False, f"{description} greedy", progress_bar)
            if greedy
            else None
        )
    return sampled, greedy_ids


def _generator(model, tokenizer, prompt_ids, use_vllm, llm, settings, seed, pad_to_multiple_of):
    """`generate(idx, num_samples, do_sample, offset)`: completion token ids of the prompts at `idx`, sampled with HF
    `generate` or vLLM (`pbsd_trl.sampling`); and the model, loaded when given as a path."""
    if use_vllm and llm is None:
        if not isinstance(model, str):
            raise ValueError("use_vllm=True needs `llm` (a vllm.LLM) or `model` as a path/hub id.")
        llm = load_vllm(model)
    if not use_vllm and isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model)
    samplers = {
        do_sample: _vllm_sampler(llm, *settings, do_sample)
        if use_vllm
        else _hf_sampler(model, tokenizer, *settings, do_sample, pad_to_multiple_of)
        for do_sample in (True, False)
    }

    def generate(idx: list[int], num_samples: int, do_sample: bool, offset: int) -> list[list[list[int]]]:
        batch = [prompt_ids[i] for i in idx]
        if use_vllm:
            return samplers[do_sample].sample(batch, num_samples, seed=seed + offset)[0]
        return samplers[do_sample].sample(batch, num_samples)[0]

    return generate, model


def _hf_sampler(model, tokenizer, max_new_tokens, temperature, top_p, top_k, do_sample, pad_to_multiple_of):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [i for i in eos_token_ids(model, tokenizer) if i is not None]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": eos or None,
        "do_sample": do_sample,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k is not None else 0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    device = next(model.parameters()).device
    return HFSampler(
        model,
        kwargs,
        pad_token_id=pad_id,
        eos_ids=eos,
        device=device,
        share_prompt_prefill=False,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def _vllm_sampler(llm, max_new_tokens, temperature, top_p, top_k, do_sample):
    from vllm import SamplingParams

    return VLLMSampler(
        llm,
        lambda n, seed: SamplingParams(
            n=n,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            top_k=(top_k if top_k else -1) if do_sample else -1,
            max_tokens=max_new_tokens,
            seed=seed,
        ),
    )


@contextlib.contextmanager
def _sampling_mode(model, seed: int):
    """Eval mode and a seeded, forked RNG (the caller's RNG state is untouched); a model evaluated in the middle of
    training goes back to training mode, also when interrupted."""
    was_training = getattr(model, "training", False)
    if model is not None:
        model.eval()
    rng_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            yield
    finally:
        if was_training:
            model.train()


def _evaluation_rows(dataset, num_problems: int | None, prompt_column: str) -> list[dict]:
    rows = [dict(row) for row in dataset]
    if num_problems is not None:
        rows = rows[:num_problems]
    if not rows:
        raise ValueError("The evaluation dataset is empty.")
    if prompt_column not in rows[0]:
        raise KeyError(f"The evaluation dataset has no prompt column '{prompt_column}' (columns: {sorted(rows[0])}).")
    return rows


def _teacher_view(rows, student_prompts, template: str | None, column: str) -> list:
    """The prompts PBSD's teacher sees: `template` applied to each prompt and its privileged context."""
    template = DEFAULT_TEACHER_PROMPT_TEMPLATE if template is None else template
    if column not in rows[0]:
        raise KeyError(
            f"Evaluating with the privileged context needs the column '{column}' (columns: {sorted(rows[0])})."
        )
    return [
        compose_teacher_prompt(p, check_privileged_context(row.get(column), column, i, True), template)
        for i, (p, row) in enumerate(zip(student_prompts, rows, strict=True))
    ]


def _sample_in_batches(generate, order, batch_size, num_samples, do_sample, label, progress_bar):
    """`[problem][sample][token]` completions, problems generated `batch_size` at a time in `order`."""
    completions: list = [None] * len(order)
    with tqdm(total=len(order), desc=label, disable=not progress_bar, dynamic_ncols=True, leave=False) as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            for i, samples in zip(idx, generate(idx, num_samples, do_sample, lo), strict=True):
                completions[i] = samples
            bar.update(len(idx))
    return completions


def _score_samples(completion_ids, tokenizer, rows, student_prompts, prompt_column, reward_funcs, reward_weights):
    """`[problem][sample]` rewards; they judge the answer to the student's question."""
    num = len(completion_ids[0])
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for per in completion_ids for ids in per]
    prompts = [p for p in student_prompts for _ in range(num)]
    completions = [
        [{"role": "assistant", "content": t}] if _is_conversational(p) else t
        for p, t in zip(prompts, texts, strict=True)
    ]
    columns = {
        key: [row.get(key) for row in rows for _ in range(num)]
        for key in rows[0]
        if key not in _RESERVED_COLUMNS and key != prompt_column
    }
    flat_ids = [ids for per in completion_ids for ids in per]
    values = score_completions(reward_funcs, prompts, completions, flat_ids, columns, reward_weights)
    return [values[i * num : (i + 1) * num] for i in range(len(rows))]


def _avg_at_k_report(rewards, greedy_rewards, sampled, role: str, k: int, seconds: float, generation: dict) -> dict:
    """Avg@k (mean over problems of the mean reward of their samples; an unscored sample counts 0), its standard
    error over problems, pass@k, the greedy accuracy (`None` without greedy samples) and the sampling settings."""
    n_unscored = sum(1 for per in rewards for v in per if math.isnan(v))
    clean = [[0.0 if math.isnan(v) else v for v in per] for per in rewards]
    per_problem = [sum(per) / len(per) for per in clean]
    avg = sum(per_problem) / len(per_problem)
    std_err = math.sqrt(sum((p - avg) ** 2 for p in per_problem) / max(1, len(per_problem) - 1) / len(per_problem))
    lengths = [len(ids) for per in sampled for ids in per]
    greedy = None if greedy_rewards is None else [0.0 if math.isnan(per[0]) else per[0] for per in greedy_rewards]
    return {
        "prompt": role,
        "k": k,
        "n_problems": len(per_problem),
        "avg_at_k": avg,
        "avg_at_k_stderr": std_err,
        "pass_at_k": sum(max(per) for per in clean) / len(clean),
        "greedy_accuracy": None if greedy is None else sum(greedy) / len(greedy),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "n_unscored": n_unscored,
        "seconds": round(seconds, 2),
        "temperature": generation["settings"][1],
        "top_p": generation["settings"][2],
        "max_new_tokens": generation["settings"][0],
        "per_problem": per_problem,
    }


def evaluate_student_and_teacher(
    model, tokenizer, dataset, reward_funcs, k: int = 8, teacher: bool = True, description: str = "", **kwargs
) -> dict[str, dict[str, Any]]:
    """
    [`evaluate_avg_at_k`] with the student prompt and, if `teacher`, with the teacher prompt (privileged context).

    Args:
        description: Prefix of the progress bars' labels (e.g. `"before training"`).
        **kwargs: Passed to both calls (e.g. `teacher_prompt_template`, `batch_size`, `max_new_tokens`).

    Returns:
        `{"student": report}`, plus `"teacher": report` when `teacher`.
    """
    prefix = f"{description} " if description else ""
    reports = {
        "student": evaluate_avg_at_k(
            model, tokenizer, dataset, reward_funcs, k, description=f"{prefix}student", **kwargs
        )
    }
    if teacher:
        reports["teacher"] = evaluate_avg_at_k(
            model,
            tokenizer,
            dataset,
            reward_funcs,
            k,
            with_privileged_context=True,
            description=f"{prefix}teacher",
            **kwargs,
        )
    return reports

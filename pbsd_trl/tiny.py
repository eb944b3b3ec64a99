"""A tiny offline base model for trying PBSD on a laptop CPU.

Everything is built from code, nothing is downloaded:

- :func:`build_char_tokenizer`: a character-level tokenizer over printable ASCII with a chat template
  (``<|user|>...<|assistant|>...<|end|>``) that works with TRL's conversational prompt path.
- :func:`tiny_model_config` / :func:`build_random_model`: a ~1M-parameter Qwen2 causal LM (and an even
  smaller one for unit tests).
- :func:`warm_start`: a short SFT from random initialization on the built-in tasks
  (:mod:`pbsd_trl.data`), half in student format (question -> solution) and half in teacher format
  (question + privileged context -> solution). The default number of steps leaves a student that is
  right part of the time and a teacher (the same network with the reference solution in its prompt)
  that is almost always right: the setting self-distillation is for.
- :func:`get_base_model`: the warm-started model of a task, as a directory for ``from_pretrained``. The default
  recipe's models ship inside the package (``pbsd_trl/base_models/<task>``, checksummed), so every machine gets
  the same weights: the warm start's float trajectory depends on the CPU's kernels and thread count, so two
  machines building "the same" model get different ones. Other recipes (or ``build=True``) are built once and
  cached (``$PBSD_TRL_CACHE`` or ``~/.cache/pbsd_trl``).

The shipped copies were produced by the committed command

```bash
python -m pbsd_trl.tiny build math --output_dir pbsd_trl/base_models/math --num_threads 1
python -m pbsd_trl.tiny build tool_use --output_dir pbsd_trl/base_models/tool_use --num_threads 1
```

which also records, in each ``pbsd_trl_base.json``, the SHA-256 of every file (checked on every load), the
machine and the held-out quality of the result.

Example:

```python
from transformers import AutoModelForCausalLM
from pbsd_trl.tiny import get_base_model, load_tokenizer

path = get_base_model("math")  # the shipped copy: instant, no build
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = load_tokenizer(path)
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


__all__ = [
    "BASE_MODEL_VERSION",
    "BaseModelChecksumError",
    "DEFAULT_WARM_START_STEPS",
    "SHIPPED_BASE_MODELS_DIR",
    "TEST_MODEL_OVERRIDES",
    "build_char_tokenizer",
    "build_random_model",
    "default_cache_dir",
    "get_base_model",
    "load_tokenizer",
    "tiny_model_config",
    "verify_base_model",
    "warm_start",
]

logger = logging.getLogger(__name__)

Task = Literal["math", "tool_use"]

PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN, UNK_TOKEN = (
    "<|pad|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|unk|>",
)
SPECIAL_TOKENS = (PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN, UNK_TOKEN)
CHARACTERS = string.printable  # digits, letters, punctuation and whitespace (including "\n"): 100 characters

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER_TOKEN + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT_TOKEN + "{{ message['content'] }}" + END_TOKEN + ""
    "{%- elif message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT_TOKEN + "{%- endif -%}"
)
"""``<|user|>question<|assistant|>answer<|end|>``; a system message is written as plain text first."""

BASE_MODEL_VERSION = 1
"""Bump when the tokenizer, the tasks or the warm-start recipe change: it is part of the cache key."""

DEFAULT_WARM_START_STEPS: dict[str, int] = {"math": 1200, "tool_use": 500}
"""SFT steps of the default recipe (the shipped base models). Measured on the shipped copies (seed 0, 1 CPU thread,
held-out sets, temperature 1, :data:`BASE_MODEL_EVAL`; recorded in each ``pbsd_trl_base.json``): math 1200 steps,
student Avg@8 0.256 (pass@8 0.555), teacher with the reference solution 0.925; tool_use 500 steps, student Avg@4
0.288 (pass@4 0.57), teacher with documentation and demonstration 0.35. A rebuild on another CPU gives other
numbers: the learning rate is constant, so accuracy is noisy from step to step (math at 1100 steps: 0.11 / 0.78),
and earlier builds of the same recipe on other machines scored student 0.157 (an Intel Xeon with AVX-512) and 0.302
(an AMD EPYC)."""

TEST_MODEL_OVERRIDES: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
}
"""A ~10k-parameter configuration for unit tests."""


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over :data:`string.printable` plus five special tokens.

    One token per character (``WordLevel`` vocabulary, each character split off by the pre-tokenizer,
    ``Fuse`` decoder), so ``decode(encode(text)) == text`` for printable ASCII; other characters map to
    ``<|unk|>``. Special tokens: ``<|pad|>`` (pad, id 0), ``<|user|>``, ``<|assistant|>``, ``<|end|>``
    (end of turn and EOS), ``<|unk|>``. The chat template is :data:`CHAT_TEMPLATE` and
    ``padding_side="left"`` for generation.
    """
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=END_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[USER_TOKEN, ASSISTANT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer saved with ``save_pretrained`` and restores ``padding_side="left"`` (which
    ``save_pretrained`` does not reliably keep) and the chat template if it is missing."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def tiny_model_config(vocab_size: int, **overrides: Any) -> Qwen2Config:
    """The base model's configuration: a 4-layer, 128-wide Qwen2 (~1.06M parameters with the 105-token
    character vocabulary). Any field can be overridden, e.g. ``pad_token_id`` or ``hidden_size``."""
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "use_cache": True,
    }
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }


def build_random_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    size: Literal["test", "base"] = "test",
    seed: int = 0,
    vocab_size: int | None = None,
    **overrides: Any,
) -> Qwen2ForCausalLM:
    """A randomly initialized Qwen2 for ``tokenizer`` (default: :func:`build_char_tokenizer`).

    Args:
        tokenizer: Sets the vocabulary size and the pad/EOS ids of the model and its generation config.
        size: ``"test"`` uses :data:`TEST_MODEL_OVERRIDES` (~10k parameters, for unit tests);
            ``"base"`` the full :func:`tiny_model_config`.
        seed: Seed of the initialization.
        vocab_size: Embedding rows, if not the tokenizer's size (e.g. a real model's vocabulary, for benchmarks).
        **overrides: Further :class:`~transformers.Qwen2Config` fields.
    """
    tokenizer = build_char_tokenizer() if tokenizer is None else tokenizer
    fields = dict(TEST_MODEL_OVERRIDES) if size == "test" else {}
    fields.update(_token_ids(tokenizer))
    fields.update(overrides)
    config = tiny_model_config(vocab_size or len(tokenizer), **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


# ----------------------------------------------------------------------------------------------------
# Warm start
# ----------------------------------------------------------------------------------------------------


def _task_sampler(task: str, rng: random.Random, difficulty: str) -> Callable[[int], list[tuple[str, str, str]]]:
    """Returns ``sample(n) -> [(student_user_text, teacher_user_text, completion)]`` for a task; fresh
    training examples on every call, never a held-out one."""
    if task == "math":
        from .data.math_task import MATH_TEACHER_TEMPLATE, math_completion, problem_text, train_problems

        def sample(n: int) -> list[tuple[str, str, str]]:
            out = []
            for a, op, b in train_problems(rng, n, difficulty):
                question, solution = problem_text(a, op, b), math_completion(a, op, b)
                teacher = MATH_TEACHER_TEMPLATE.format(prompt=question, privileged_context=solution)
                out.append((question, teacher, solution))
            return out

        return sample
    if task == "tool_use":
        from .data.tool_task import TOOL_TEACHER_TEMPLATE, tool_completion, train_examples

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


# ----------------------------------------------------------------------------------------------------
# Shipped copies and cache
# ----------------------------------------------------------------------------------------------------

SHIPPED_BASE_MODELS_DIR = Path(__file__).resolve().parent / "base_models"
"""Where the default recipe's base models ship, one directory per task."""

MANIFEST_FILE = "pbsd_trl_base.json"


class BaseModelChecksumError(ValueError):
    """A base-model file is missing or does not match the SHA-256 recorded in its ``pbsd_trl_base.json``."""


def default_cache_dir() -> Path:
    """``$PBSD_TRL_CACHE`` if set, else ``$XDG_CACHE_HOME/pbsd_trl`` (``~/.cache/pbsd_trl``)."""
    if os.environ.get("PBSD_TRL_CACHE"):
        return Path(os.environ["PBSD_TRL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "pbsd_trl"


def _base_model_spec(task: str, steps: int, seed: int, warm_start_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What determines the warm-started weights; its hash is the cache key (the library versions are not
    part of it)."""
    tokenizer = build_char_tokenizer()
    config = tiny_model_config(len(tokenizer), **(warm_start_kwargs.get("model_overrides") or {})).to_diff_dict()
    config.pop("transformers_version", None)
    return {
        "version": BASE_MODEL_VERSION,
        "task": task,
        "steps": steps,
        "seed": seed,
        "vocab": "".join(CHARACTERS),
        "special_tokens": list(SPECIAL_TOKENS),
        "config": config,
        "warm_start": {k: v for k, v in sorted(warm_start_kwargs.items()) if k not in ("model_overrides",)},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Writes ``pbsd_trl_base.json``: ``metadata`` plus the SHA-256 of every other file of ``directory``."""
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = dict(metadata, sha256={name: _sha256(directory / name) for name in files})
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def verify_base_model(path: str | os.PathLike) -> dict[str, Any]:
    """Checks every file of a base-model directory against the SHA-256 in its ``pbsd_trl_base.json``.

    Returns the manifest. Raises [`BaseModelChecksumError`] naming the file when one is missing or altered (a
    partial download, a corrupted install, an edited checkpoint), since a model that silently differs would
    give other numbers than the documented ones.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BaseModelChecksumError(f"{manifest_path} is missing: {path} is not a pbsd-trl base model directory.")
    manifest = json.loads(manifest_path.read_text())
    hashes = manifest.get("sha256")
    if not hashes:
        raise BaseModelChecksumError(f"{manifest_path} records no checksums; rebuild the model (`force=True`).")
    fix = (
        "Reinstall pbsd-trl (or `git checkout pbsd_trl/base_models`)"
        if path.parent == SHIPPED_BASE_MODELS_DIR
        else "Rebuild it with `get_base_model(..., force=True)`"
    )
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            raise BaseModelChecksumError(f"Base model file {file} is missing. {fix}.")
        actual = _sha256(file)
        if actual != expected:
            raise BaseModelChecksumError(
                f"Base model file {file} does not match its checksum (SHA-256 {actual[:16]}..., recorded "
                f"{expected[:16]}... in {manifest_path}): it is corrupt or was modified. {fix}."
            )
    return manifest


def _shipped_base_model(task: str) -> str:
    path = SHIPPED_BASE_MODELS_DIR / task
    manifest = verify_base_model(path)
    if manifest.get("version") != BASE_MODEL_VERSION:
        raise BaseModelChecksumError(
            f"The shipped {task} base model in {path} has recipe version {manifest.get('version')}, the code "
            f"{BASE_MODEL_VERSION}: regenerate it with `python -m pbsd_trl.tiny build {task} --output_dir {path}`."
        )
    return str(path)


def get_base_model(
    task: Task = "math",
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    *,
    build: bool = False,
    steps: int | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    **warm_start_kwargs: Any,
) -> str:
    """Path to the warm-started tiny base model of ``task``: the shipped copy, or one built and cached.

    With the default recipe (default ``steps`` and ``seed``, no further warm-start arguments) and without
    ``build``/``force``, this is the copy shipped in the package (:data:`SHIPPED_BASE_MODELS_DIR`), checked
    against its checksums: instant, and the same weights on every machine. Otherwise the model is built by
    :func:`warm_start` into ``<cache_dir>/<task>-<hash>`` (the hash covering the recipe, steps, seed and model
    configuration) on first use and reused after that. A build happens in a temporary directory renamed into
    place at the end, so an interrupted build is never used. Nothing is downloaded.

    Either directory holds the model and tokenizer written by ``save_pretrained`` and a ``pbsd_trl_base.json``
    with the recipe and the files' checksums: load them with ``AutoModelForCausalLM.from_pretrained(path)`` and
    :func:`load_tokenizer`.

    Args:
        task: ``"math"`` or ``"tool_use"``.
        cache_dir: Root of the cache of built models; default :func:`default_cache_dir`.
        force: Rebuild even if a cached model exists (implies ``build``).
        build: Build from scratch (into the cache) even for the default recipe, instead of the shipped copy.
            The result differs from the shipped weights in the last bits on another CPU, and so does its
            accuracy after 1,200 SFT steps at a constant learning rate.
        steps: Warm-start steps; default :data:`DEFAULT_WARM_START_STEPS` of the task.
        seed: Warm-start seed.
        progress_bar: Show the warm start's progress bar.
        **warm_start_kwargs: Further :func:`warm_start` arguments (``learning_rate``, ``batch_size``,
            ``difficulty``, ``model_overrides``, ...); they are part of the cache key (``num_threads``
            is not).

    Returns:
        The directory, as a string.
    """
    if task not in DEFAULT_WARM_START_STEPS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(DEFAULT_WARM_START_STEPS)}.")
    default_steps = DEFAULT_WARM_START_STEPS[task]
    steps = default_steps if steps is None else steps
    num_threads = warm_start_kwargs.pop("num_threads", None)
    if not (build or force) and steps == default_steps and seed == 0 and not warm_start_kwargs:
        return _shipped_base_model(task)

    spec = _base_model_spec(task, steps, seed, warm_start_kwargs)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"{task}-{key}"
    if final.is_dir() and (final / MANIFEST_FILE).is_file() and not force:
        verify_base_model(final)
        return str(final)

    root.mkdir(parents=True, exist_ok=True)
    logger.warning("Building the tiny %s base model (%d SFT steps, one time) into %s", task, steps, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        start = time.perf_counter()
        warm_start(
            task,
            steps=steps,
            seed=seed,
            output_dir=tmp,
            progress_bar=progress_bar,
            num_threads=num_threads,
            **warm_start_kwargs,
        )
        _write_manifest(tmp, dict(spec, **_build_info(time.perf_counter() - start, num_threads)))
        if final.exists():
            if not force and (final / MANIFEST_FILE).is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return str(final)
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=root))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def _build_info(seconds: float, num_threads: int | None) -> dict[str, Any]:
    """Where and how a model was built: the warm start's result depends on the CPU kernels and thread count."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "build_seconds": round(seconds, 1),
        "num_threads": num_threads or torch.get_num_threads(),
        "cpu": cpu,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def build_base_model(
    task: Task,
    output_dir: str | os.PathLike,
    *,
    num_threads: int | None = 1,
    evaluate: bool = True,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Builds the default recipe's base model of ``task`` into ``output_dir`` (the command that produced the
    shipped copies) and writes its manifest; with ``evaluate``, also measures and records its held-out quality
    (:func:`base_model_quality`). Returns the manifest."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty; remove it first (the build writes every file anew).")
    output_dir.mkdir(parents=True, exist_ok=True)
    steps = DEFAULT_WARM_START_STEPS[task]
    start = time.perf_counter()
    warm_start(task, steps=steps, seed=0, output_dir=output_dir, num_threads=num_threads, progress_bar=progress_bar)
    metadata = dict(_base_model_spec(task, steps, 0, {}), **_build_info(time.perf_counter() - start, num_threads))
    metadata["command"] = f"python -m pbsd_trl.tiny build {task} --output_dir {output_dir} --num_threads {num_threads}"
    if evaluate:
        metadata["quality"] = base_model_quality(task, output_dir, num_threads=num_threads, progress_bar=progress_bar)
    return _write_manifest(output_dir, metadata)


BASE_MODEL_EVAL: dict[str, dict[str, Any]] = {
    "math": {"k": 8, "num_problems": 200, "max_new_tokens": 64},
    "tool_use": {"k": 4, "num_problems": 100, "max_new_tokens": 64},
}
"""How :func:`base_model_quality` evaluates each task's base model (held-out problems, temperature 1, seed 0)."""


def base_model_quality(
    task: Task, path: str | os.PathLike, *, num_threads: int | None = None, progress_bar: bool = False
) -> dict[str, float]:
    """Student and teacher (with the privileged context) Avg@k / pass@k of a base model on the task's held-out
    problems, with the settings of :data:`BASE_MODEL_EVAL`."""
    from transformers import AutoModelForCausalLM

    from .data import MATH_TEACHER_TEMPLATE, TOOL_TEACHER_TEMPLATE, make_math_dataset, make_tool_dataset
    from .evaluate import evaluate_avg_at_k
    from .rewards import math_accuracy_reward, tool_call_reward

    settings = BASE_MODEL_EVAL[task]
    make_dataset, template, reward = {
        "math": (make_math_dataset, MATH_TEACHER_TEMPLATE, math_accuracy_reward),
        "tool_use": (make_tool_dataset, TOOL_TEACHER_TEMPLATE, tool_call_reward),
    }[task]
    dataset = make_dataset("eval", n=settings["num_problems"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        quality = {}
        for who, privileged in (("student", False), ("teacher", True)):
            report = evaluate_avg_at_k(
                model, tokenizer, dataset, [reward], settings["k"], max_new_tokens=settings["max_new_tokens"],
                with_privileged_context=privileged, teacher_prompt_template=template, seed=0,
                progress_bar=progress_bar, description=f"{task} {who}",
            )  # fmt: skip
            quality[f"{who}_avg_at_{settings['k']}"] = round(report["avg_at_k"], 4)
            quality[f"{who}_pass_at_{settings['k']}"] = round(report["pass_at_k"], 4)
    finally:
        torch.set_num_threads(previous)
    return quality


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbsd_trl.tiny", description="Tiny offline base models.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="Build the default recipe's base model of a task, with its manifest.")
    build.add_argument("task", choices=sorted(DEFAULT_WARM_START_STEPS))
    build.add_argument("--output_dir", required=True)
    build.add_argument("--num_threads", type=int, default=1, help="torch threads (the shipped copies used 1).")
    build.add_argument("--no_evaluate", action="store_true", help="Skip the held-out quality measurement.")
    verify = commands.add_parser("verify", help="Check a base-model directory against its checksums.")
    verify.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build_base_model(
            args.task, args.output_dir, num_threads=args.num_threads, evaluate=not args.no_evaluate
        )
        print(
            json.dumps(
                {k: manifest[k] for k in ("task", "steps", "build_seconds", "cpu", "quality") if k in manifest},
                indent=2,
            )
        )
    else:
        verify_base_model(args.path)
        print(f"{args.path}: every file matches its checksum.")


if __name__ == "__main__":
    main()

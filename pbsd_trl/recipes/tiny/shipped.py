"""The default recipe's base models: the checksummed copies shipped in the package, and builds cached on
first use for other recipes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .model import (
    CHARACTERS,
    SPECIAL_TOKENS,
    Task,
    build_char_tokenizer,
    load_tokenizer,
    tiny_model_config,
    torch_threads,
)
from .sft import DEFAULT_WARM_START_STEPS, warm_start


logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = 2
"""Bump when the tokenizer, the tasks or the warm-start recipe change: it is part of the cache key. Version 2: the
tasks whose privileged context is a hint (math: coded operations, the method and the first step; tool use: hidden
argument names, the documentation and a similar call), the uninformed student of the warm start, the cosine
learning-rate schedule."""

# ----------------------------------------------------------------------------------------------------
# Shipped copies and cache
# ----------------------------------------------------------------------------------------------------

SHIPPED_BASE_MODELS_DIR = Path(__file__).resolve().parents[1] / "base_models"
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
        "Reinstall pbsd-trl (or `git checkout pbsd_trl/recipes/base_models`)"
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
            f"{BASE_MODEL_VERSION}: regenerate it with `python -m pbsd_trl.recipes.tiny build {task} --output_dir {path}`."
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
            The result differs from the shipped weights in the last bits on another CPU, and so, a little, does
            its accuracy.
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
    return _build_into(final, force, spec, num_threads, progress_bar=progress_bar, **warm_start_kwargs)


def _build_into(final: Path, force: bool, spec: dict, num_threads: int | None, **warm_start_kwargs: Any) -> str:
    """Warm-starts into a temporary directory beside ``final`` and renames it into place at the end, so that an
    interrupted build is never used and a build finished first by another process is kept."""
    root = final.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        warm_start(
            spec["task"],
            steps=spec["steps"],
            seed=spec["seed"],
            output_dir=tmp,
            num_threads=num_threads,
            **warm_start_kwargs,
        )
        info = _build_info(time.perf_counter() - start, num_threads, time.process_time() - cpu_start)
        _write_manifest(tmp, dict(spec, **info))
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


def _build_info(seconds: float, num_threads: int | None, cpu_seconds: float | None = None) -> dict[str, Any]:
    """Where and how a model was built: the warm start's result depends on the CPU kernels and thread count.
    ``build_seconds`` is wall time (on a shared machine, much more than the work), ``build_cpu_seconds`` the
    process's CPU time (all threads)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "build_seconds": round(seconds, 1),
        "build_cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "num_threads": num_threads or torch.get_num_threads(),
        "cpu": cpu,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return info


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
    start, cpu_start = time.perf_counter(), time.process_time()
    warm_start(task, steps=steps, seed=0, output_dir=output_dir, num_threads=num_threads, progress_bar=progress_bar)
    info = _build_info(time.perf_counter() - start, num_threads, time.process_time() - cpu_start)
    metadata = dict(_base_model_spec(task, steps, 0, {}), **info)
    metadata["command"] = (
        f"python -m pbsd_trl.recipes.tiny build {task} --output_dir {output_dir} --num_threads {num_threads}"
    )
    if evaluate:
        metadata["quality"] = base_model_quality(task, output_dir, num_threads=num_threads, progress_bar=progress_bar)
    return _write_manifest(output_dir, metadata)


BASE_MODEL_EVAL: dict[str, dict[str, Any]] = {
    "math": {"k": 8, "num_problems": 200, "max_new_tokens": 80},
    "tool_use": {"k": 8, "num_problems": 200, "max_new_tokens": 80},
}
"""How :func:`base_model_quality` evaluates each task's base model (held-out problems, temperature 1, seed 0)."""

TEST_ROWS = slice(100, 200)
"""The held-out rows the benchmarks call the test split (rows 0-99 are their validation split)."""


@torch.no_grad()
def sampled_log_probs(
    model, tokenizer, prompts: list, k: int, max_new_tokens: int, *, seed: int = 0, batch_size: int = 32
) -> tuple[list[float], list[int]]:
    """Samples ``k`` completions per prompt at temperature 1 (no top-k / top-p) and returns, for each sample, the summed
    log-probability of its tokens (the end-of-turn token included) under the prompt it was sampled from, read off the
    decoding steps, and its length in tokens. Prompts are tokenized as :func:`~pbsd_trl.evaluate_avg_at_k` tokenizes
    them."""
    from ...sampling import HFSampler
    from ...tokens import tokenize_prompts

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    settings = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
    sampler = HFSampler(
        model, {**settings, "pad_token_id": pad, "eos_token_id": eos}, pad_token_id=pad, eos_ids=[eos],
        device=model.device, share_prompt_prefill=False, record_logps_at=1.0, pad_to_multiple_of=16,
    )  # fmt: skip
    totals: list[float] = []
    lengths: list[int] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            completions, logps = sampler.sample(tokenize_prompts(tokenizer, prompts[lo : lo + batch_size]), k)
            if logps is None:
                raise RuntimeError("The decoding steps' log-probs did not line up with the samples.")
            totals += [logp for row in logps for logp in row]
            lengths += [len(ids) for row in completions for ids in row]
    return totals, lengths


def base_model_quality(
    task: Task, path: str | os.PathLike, *, num_threads: int | None = None, progress_bar: bool = False
) -> dict[str, float]:
    """The task table of a base model on the task's held-out problems, with the settings of :data:`BASE_MODEL_EVAL`:
    student and teacher (with the privileged context) Avg@k / pass@k on all held-out problems and Avg@k on the test
    rows (:data:`TEST_ROWS`); the teacher's mean log-probability of its own samples (summed over each completion,
    temperature 1: how far from copying its context it is) and both views' mean completion length in tokens."""
    from transformers import AutoModelForCausalLM

    from ...rewards import math_accuracy_reward, tool_call_reward
    from ...teacher import compose_teacher_prompt
    from ..data import MATH_TEACHER_TEMPLATE, TOOL_TEACHER_TEMPLATE, make_math_dataset, make_tool_dataset
    from ..evaluate import evaluate_avg_at_k

    settings = BASE_MODEL_EVAL[task]
    k = settings["k"]
    make_dataset, template, reward = {
        "math": (make_math_dataset, MATH_TEACHER_TEMPLATE, math_accuracy_reward),
        "tool_use": (make_tool_dataset, TOOL_TEACHER_TEMPLATE, tool_call_reward),
    }[task]
    dataset = make_dataset("eval", n=settings["num_problems"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    with torch_threads(num_threads):
        quality: dict[str, float] = {}
        for who, privileged in (("student", False), ("teacher", True)):
            report = evaluate_avg_at_k(
                model, tokenizer, dataset, [reward], k, max_new_tokens=settings["max_new_tokens"],
                with_privileged_context=privileged, teacher_prompt_template=template, seed=0,
                progress_bar=progress_bar, description=f"{task} {who}",
            )  # fmt: skip
            test = report["per_problem"][TEST_ROWS]
            quality[f"{who}_avg_at_{k}"] = round(report["avg_at_k"], 4)
            quality[f"{who}_pass_at_{k}"] = round(report["pass_at_k"], 4)
            quality[f"{who}_avg_at_{k}_test"] = round(sum(test) / len(test), 4)
            quality[f"{who}_mean_completion_tokens"] = round(report["mean_completion_tokens"], 1)
        prompts = [compose_teacher_prompt(row["prompt"], row["privileged_context"], template) for row in dataset]
        log_probs, _ = sampled_log_probs(model, tokenizer, prompts, k, settings["max_new_tokens"], seed=1)
        quality["teacher_self_log_prob"] = round(sum(log_probs) / len(log_probs), 3)
        test_log_probs = log_probs[TEST_ROWS.start * k : TEST_ROWS.stop * k]
        quality["teacher_self_log_prob_test"] = round(sum(test_log_probs) / len(test_log_probs), 3)
    return quality

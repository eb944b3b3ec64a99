"""Building a pool (sharded over processes, resumable) and loading a finished one."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import uuid

import torch

from ..sampling import HFSampler, VLLMSampler
from .sampling import cut_after_eos, sequence_logps, teacher_prompt_builder, tokenize_prompts
from .stamp import POOL_STAMP_FILE, TeacherPoolError, eos_token_ids, pool_stamp, row_key, stamp_mismatches


# ---- building ---------------------------------------------------------------------------------------------------
def _parts_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "parts")


def _damaged(path: str, err: Exception, fix: str) -> TeacherPoolError:
    return TeacherPoolError(f"{path} cannot be read ({type(err).__name__}: {err}); it is damaged or truncated. {fix}")


_REBUILD = "Rebuild the pool (delete its folder and rerun `python -m pbsd_trl.scripts.build_teacher_pool`)."


def _read_stamp(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, POOL_STAMP_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            stamp = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, err, _REBUILD) from err
    if not isinstance(stamp, dict):
        raise _damaged(path, TypeError(f"a {type(stamp).__name__}, not an object"), _REBUILD)
    return stamp


def _write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def _done_keys(output_dir: str) -> set[str]:
    import pyarrow.parquet as pq

    folder = _parts_dir(output_dir)
    if not os.path.isdir(folder):
        return set()
    keys = set()
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            path = os.path.join(folder, name)
            try:
                keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
            except Exception as err:  # pyarrow raises OSError or ArrowInvalid, by the kind of damage
                fix = "Delete this part file and rerun the build: it draws the part's rows again."
                raise _damaged(path, err, fix) from err
    return keys


def _write_part(output_dir: str, rank: int, records: list[dict]) -> None:
    """One finished batch, written under a temporary name and renamed: a killed build leaves whole parts only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = _parts_dir(output_dir)
    name = f"part-{time.strftime('%Y%m%d%H%M%S')}-r{rank}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = os.path.join(folder, f".{name}.tmp")
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, os.path.join(folder, name))


def _merge_parts(output_dir: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    folder = _parts_dir(output_dir)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet"))
    merged = Dataset(pa.concat_tables([pq.read_table(f) for f in files])).sort("row")
    data = os.path.join(output_dir, "data")
    tmp = f"{data}.tmp-{uuid.uuid4().hex[:8]}"
    enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        merged.save_to_disk(tmp)
    finally:
        if enabled:
            enable_progress_bar()
    if os.path.exists(data):
        shutil.rmtree(data)
    os.replace(tmp, data)
    return merged


def _distinct_rows(prompts, contexts, args) -> dict[str, int]:
    """Key -> first row of each distinct (prompt, context), every row checked as the trainer checks it at
    construction (before any sampling: a row the trainer would refuse is refused now)."""
    from ..teacher.prompts import check_privileged_context, check_prompt

    first_row: dict[str, int] = {}
    for i, (prompt, context) in enumerate(zip(prompts, contexts, strict=True)):
        check_prompt(prompt, i)
        check_privileged_context(context, args.privileged_context_column, i, args.allow_empty_privileged_context)
        first_row.setdefault(row_key(prompt, context), i)
    return first_row


def default_pool_batch_size(device, num_samples: int = 1) -> int:
    """Completions per generate call: 256, never fewer than the `num_samples` (K) completions of one row.

    A GPU needs large batches to fill it; on CPU 256 per call draws the most tokens per second
    (`benchmarks/results/pool_batch_size.md`).
    """
    return max(num_samples, 256)


def build_teacher_pool(
    model,
    tokenizer,
    dataset,
    output_dir: str,
    args,
    num_samples: int,
    *,
    batch_size: int | None = None,
    backend: str = "hf",
    model_name_or_path: str | None = None,
    seed: int = 0,
    progress: bool = True,
    vllm_gpu_memory_utilization: float = 0.5,
    stop_after_batches: int | None = None,
):
    """Draw `num_samples` (K) teacher completions for every distinct row of `dataset` and store them at `output_dir`.

    Args:
        model: the teacher weights (a causal LM; with a PEFT model its adapters are disabled). Moved to this
            process's device.
        tokenizer: the tokenizer the trainer will use.
        dataset: the training rows (`prompt` and the privileged-context column).
        output_dir: the pool folder. An existing, unfinished or finished pool with the same stamp is resumed or
            extended (only rows without samples are drawn); one with another stamp is refused.
        args: the run's `PBSDConfig` (teacher prompt, sampling settings, `bf16`).
        num_samples: K, samples per row (the trainer takes `num_teacher_generations` of them per visit).
        batch_size: completions per generate call (rows × K); default [`default_pool_batch_size`] of the device.
        backend: `"hf"` (transformers `generate`) or `"vllm"` (offline `vllm.LLM`, needs `model_name_or_path`).
        seed: sampling seed (each batch is seeded from it and its first row, so a rerun draws the same samples).
        progress: show a progress bar on the main process.
        stop_after_batches: stop (as if killed) after this many batches on each process; for tests.

    Under `accelerate launch`, each process draws a disjoint share of the rows; the main process then merges the
    parts. Returns the pool's `datasets.Dataset`.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    _check_build_arguments(args, num_samples, backend, batch_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    state = PartialState()
    device = state.device
    was_training = model.training
    model = model.to(device).eval()
    eos_ids = eos_token_ids(model, tokenizer)
    _open_pool(output_dir, pool_stamp(model, tokenizer, args, eos_ids), num_samples, backend, seed, state)
    mine, prompt_ids, num_rows = _rows_to_draw(model, tokenizer, dataset, args, output_dir, backend, state)

    if backend == "vllm":
        # The engine samples in the precision the teacher is scored in (bf16 autocast, or the model's dtype)
        scored_dtype = "bfloat16" if args.bf16 else str(next(model.parameters()).dtype).removeprefix("torch.")
        name = model_name_or_path or model.config._name_or_path
        sampler = VLLMSampler.for_training(name, args, eos_ids, vllm_gpu_memory_utilization, seed, dtype=scored_dtype)
    else:
        sampler = HFSampler.for_training(model, tokenizer, args, eos_ids, device, bf16=bool(args.bf16))
    batch_size = batch_size or default_pool_batch_size(device, num_samples)
    draw = functools.partial(_draw_batch, model, tokenizer, sampler, args, eos_ids, device, num_samples)
    bar = tqdm(
        total=len(mine) * num_samples,
        unit="sample",
        desc=f"teacher pool ({sampler.name})",
        disable=not (progress and state.is_main_process),
        dynamic_ncols=True,
    )
    _draw_all(draw, mine, prompt_ids, output_dir, state, bar, batch_size // num_samples, seed, stop_after_batches)
    model.train(was_training)

    state.wait_for_everyone()
    if stop_after_batches is not None and len(_done_keys(output_dir)) < num_rows:
        return None
    if state.is_main_process:
        merged = _merge_parts(output_dir)
        final = _read_stamp(output_dir)
        final.update(complete=True, rows=len(merged))
        _write_json_atomic(os.path.join(output_dir, POOL_STAMP_FILE), final)
    state.wait_for_everyone()
    dataset_out, _ = load_teacher_pool(output_dir)
    return dataset_out


def _check_build_arguments(args, num_samples: int, backend: str, batch_size: int | None) -> None:
    if getattr(args, "fp16", False):
        raise ValueError(
            "A teacher pool is sampled and scored in float32, or in bf16 autocast with `bf16=True`; the trainer would "
            "score an `fp16=True` run in fp16 autocast, so its log-probs would differ. Build with `bf16` or float32."
        )
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"`backend` must be 'hf' or 'vllm', got {backend!r}.")
    if batch_size is not None and batch_size < num_samples:
        raise ValueError(f"`batch_size` ({batch_size}) must hold at least the K={num_samples} samples of one row.")


def _open_pool(output_dir: str, stamp: dict, num_samples: int, backend: str, seed: int, state) -> None:
    """Write the stamp first (a resumed build must be the same build): refuse a folder drawn with other settings."""
    os.makedirs(_parts_dir(output_dir), exist_ok=True)
    found = _read_stamp(output_dir)
    if found is not None:
        problems = stamp_mismatches(found, stamp)
        if found.get("num_samples") != num_samples:
            problems.append(f"num_samples (K): pool {found.get('num_samples')}, this build {num_samples}")
        if problems:
            raise TeacherPoolError(
                f"{output_dir} holds a teacher pool drawn with other settings; refusing to mix samples: "
                + "; ".join(problems)
                + ". Use another output_dir, or delete this one."
            )
    state.wait_for_everyone()
    if state.is_main_process:
        _write_json_atomic(
            os.path.join(output_dir, POOL_STAMP_FILE),
            {
                **stamp,
                "num_samples": num_samples,
                "complete": False,
                "backend": backend,
                "seed": seed,
                "rows": None,
                "created": (found or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            },
        )


def _rows_to_draw(model, tokenizer, dataset, args, output_dir: str, backend: str, state):
    """`(mine, prompt_ids, num_rows)`: this process's share of the distinct rows not drawn yet, as `(key, row index)`,
    their teacher prompts' ids, and the number of distinct rows. Every row is checked as the trainer checks it first,
    on every process, so that all of them stop (none waits for the others at the next barrier)."""
    from ..teacher.prompts import teacher_position_limit

    column = args.privileged_context_column
    prompts, contexts = dataset["prompt"], dataset[column]
    first_row = _distinct_rows(prompts, contexts, args)
    state.wait_for_everyone()
    done = _done_keys(output_dir)
    todo = [(key, row) for key, row in first_row.items() if key not in done]
    mine = todo[state.process_index :: state.num_processes]

    config = (model.get_base_model() if hasattr(model, "peft_config") else model).config
    builder = teacher_prompt_builder(tokenizer, args, teacher_position_limit(config, args, backend == "vllm"))
    as_rows = lambda pairs: [{"prompt": prompts[r], column: contexts[r]} for _, r in pairs]  # noqa: E731
    for start in range(0, len(todo), 1024):
        chunk = todo[start : start + 1024]
        builder.check_rows(as_rows(chunk), [r for _, r in chunk])
    rows = as_rows(mine)
    teacher_prompts, _ = builder([row["prompt"] for row in rows], rows, [r for _, r in mine]) if rows else ([], [])
    return mine, tokenize_prompts(tokenizer, teacher_prompts, args.chat_template_kwargs), len(first_row)


def _draw_all(draw, mine, prompt_ids, output_dir, state, bar, prompts_per_batch, seed, stop_after_batches) -> None:
    """Draw this process's rows batch by batch (longest first: similar lengths share a batch, and a memory problem
    shows up at once), each batch seeded from `seed` and its first row and written as a part of its own."""
    prompts_per_batch = max(1, prompts_per_batch)
    order = sorted(range(len(mine)), key=lambda i: -len(prompt_ids[i]))
    generated, started = 0, time.perf_counter()
    for b, start in enumerate(range(0, len(order), prompts_per_batch)):
        if stop_after_batches is not None and b >= stop_after_batches:
            break
        batch = order[start : start + prompts_per_batch]
        torch.manual_seed(int(hashlib.sha256(f"{seed}:{mine[batch[0]][0]}".encode()).hexdigest()[:8], 16))
        records = draw([mine[i] for i in batch], [prompt_ids[i] for i in batch])
        _write_part(output_dir, state.process_index, records)
        drawn = [ids for record in records for ids in record["completion_ids"]]
        generated += sum(len(ids) for ids in drawn)
        bar.update(len(drawn))
        bar.set_postfix_str(f"{generated / (time.perf_counter() - started):.0f} tok/s")
    bar.close()


def _draw_batch(model, tokenizer, sampler, args, eos_ids, device, num_samples, rows, prompt_ids) -> list[dict]:
    """One batch's records: K completions of each row (cut after EOS) and their teacher log-probs (from the decoding
    steps, or scored with the base teacher's weights)."""
    # A PEFT model's base teacher is the model with its adapters disabled
    base_weights = model.disable_adapter if hasattr(model, "peft_config") else contextlib.nullcontext
    with base_weights():
        samples, decoded_logps = sampler.sample(prompt_ids, num_samples)
    records, flat_prompts, flat_completions = [], [], []
    for (key, row), ids, drawn in zip(rows, prompt_ids, samples, strict=True):
        drawn = [cut_after_eos(completion, eos_ids) for completion in drawn]
        flat_prompts += [ids] * num_samples
        flat_completions += drawn
        records.append({"key": key, "row": row, "completion_ids": drawn, "teacher_prompt_length": len(ids)})
    if decoded_logps is not None:
        logps = [logp for drawn in decoded_logps for logp in drawn]
    else:
        with base_weights():
            logps = sequence_logps(
                model,
                flat_prompts,
                flat_completions,
                args.temperature,
                tokenizer.pad_token_id,
                device,
                bf16=bool(args.bf16),
            )
    for j, record in enumerate(records):
        record["teacher_logps"] = logps[j * num_samples : (j + 1) * num_samples]
    return records


def load_teacher_pool(path: str):
    """(dataset, stamp) of a finished pool; raises [`TeacherPoolError`] for a missing or unfinished one."""
    from datasets import load_from_disk

    stamp = _read_stamp(path)
    if stamp is None:
        raise TeacherPoolError(
            f"{path} is not a teacher pool (no {POOL_STAMP_FILE}). Build one with "
            "`python -m pbsd_trl.scripts.build_teacher_pool`."
        )
    if not stamp.get("complete"):
        raise TeacherPoolError(
            f"The teacher pool at {path} is unfinished (its build was interrupted). Rerun the same build command to "
            "finish it: it resumes with the rows that have no samples yet."
        )
    data = os.path.join(path, "data")
    try:
        dataset = load_from_disk(data)
    except Exception as err:  # a truncated arrow file, a half-written state.json: pyarrow or datasets errors
        raise _damaged(data, err, _REBUILD) from err
    if stamp.get("rows") is not None and len(dataset) != stamp["rows"]:
        raise _damaged(data, ValueError(f"{len(dataset)} rows, its stamp says {stamp['rows']}"), _REBUILD)
    return dataset, stamp

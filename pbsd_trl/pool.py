"""Teacher-sample pool: the `base` teacher's samples drawn once, before training, instead of inside every step.

With `teacher_model_kind="base"` the teacher `π_T(·|x,c)` is the initial weights prompted with the privileged
context: its distribution never changes during training, so its samples and their teacher log-probs can be drawn
ahead of time, in large batches, and read back by the trainer (`PBSDConfig.teacher_pool`).

A pool is a folder:

- `data/`: a `datasets` dataset with one row per distinct (prompt, privileged context) of the source dataset:
  `key` (a hash of both), `row` (index of its first occurrence in the source dataset), `completion_ids` (K lists of
  token ids, cut after the first EOS as GRPO cuts them), `teacher_logps` (K sums of the teacher's per-token log-probs
  of those completions given the teacher prompt, at the sampling temperature) and `teacher_prompt_length`.
- `parts/`: the batches written while building (kept, so that an interrupted build resumes where it stopped).
- `pbsd_pool.json`: the stamp, what the samples were drawn from (teacher weights fingerprint, tokenizer, teacher
  prompt template and budget, sampling settings, K). The trainer recomputes the stamp from its own model and config
  and refuses a pool whose stamp differs, naming the field.

Build with [`build_teacher_pool`] or `python -m pbsd_trl.scripts.build_teacher_pool` (under `accelerate launch` to
shard the rows over processes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch


logger = logging.getLogger(__name__)

POOL_STAMP_FILE = "pbsd_pool.json"
POOL_FORMAT = 1
# Stamp fields that decide the teacher's sampling distribution and scoring: a pool must agree on all of them
CHECKED_FIELDS = (
    "format",
    "teacher_weights",
    "tokenizer",
    "teacher_prompt_template",
    "privileged_context_column",
    "allow_empty_privileged_context",
    "max_teacher_prompt_length",
    "chat_template_kwargs",
    "sampling",
)


class TeacherPoolError(ValueError):
    """A pool that cannot serve this run (mismatched stamp, unfinished build, missing rows, too few samples)."""


# ---- fingerprints -----------------------------------------------------------------------------------------------
def row_key(prompt: Any, privileged_context: Any) -> str:
    """Stable key of a (prompt, privileged context) pair: what the teacher prompt is built from."""
    text = json.dumps([prompt, privileged_context], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _adapter_names(model) -> set[str]:
    config = getattr(model, "peft_config", None)
    return set(config) if isinstance(config, dict) else set()


def _canonical_name(name: str) -> str:
    # A PEFT wrapper, a DDP/DeepSpeed wrapper and LoRA's `base_layer` do not change the weights' meaning
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the teacher weights: every parameter and buffer, by name, dtype, shape and bytes.

    With a PEFT model the adapters are skipped (the `base` teacher is the adapter-disabled model), so a pool drawn
    from a plain model serves a LoRA student of the same model. ZeRO-3 partitioned parameters are gathered.
    """
    from .teacher_model import _gathered

    adapters = _adapter_names(model)
    digest = hashlib.sha256()
    tensors = [(n, p) for n, p in model.named_parameters()] + [(n, b) for n, b in model.named_buffers()]
    for name, tensor in tensors:
        parts = name.split(".")
        if adapters and any(part in adapters for part in parts):
            continue
        if "inv_freq" in name:  # RoPE buffers are derived from the config, and vary with the device they sit on
            continue
        with _gathered([tensor] if isinstance(tensor, torch.nn.Parameter) else []):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{_canonical_name(name)}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what turns text into the ids the teacher sees: vocabulary, special tokens, chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
    }
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion, as GRPOTrainer collects them."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def sampling_settings(args, eos_ids: Sequence[int]) -> dict[str, Any]:
    """The generation settings GRPOTrainer samples with (`max_new_tokens`, temperature, top-p/k, min-p, …)."""
    return {
        "max_completion_length": args.max_completion_length,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "generation_kwargs": args.generation_kwargs or {},
        "eos_token_ids": list(eos_ids),
    }


def pool_stamp(teacher_model, tokenizer, args, eos_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """The checked part of a pool's stamp for `teacher_model` (the teacher weights), `tokenizer` and a `PBSDConfig`."""
    eos_ids = eos_token_ids(teacher_model, tokenizer) if eos_ids is None else eos_ids
    return {
        "format": POOL_FORMAT,
        "teacher_weights": weights_fingerprint(teacher_model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "teacher_prompt_template": args.teacher_prompt_template,
        "privileged_context_column": args.privileged_context_column,
        "allow_empty_privileged_context": args.allow_empty_privileged_context,
        "max_teacher_prompt_length": args.max_teacher_prompt_length,
        "chat_template_kwargs": args.chat_template_kwargs or {},
        "sampling": sampling_settings(args, eos_ids),
    }


def stamp_mismatches(found: dict, expected: dict) -> list[str]:
    """Human-readable differences between a pool's stamp and the one this run expects."""
    problems = []
    for name in CHECKED_FIELDS:
        if name == "sampling":
            a, b = found.get(name) or {}, expected.get(name) or {}
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    problems.append(f"sampling.{key}: pool {a.get(key)!r}, this run {b.get(key)!r}")
        elif found.get(name) != expected.get(name):
            what = {"teacher_weights": " (the teacher weights differ)", "tokenizer": " (the tokenizer differs)"}
            problems.append(
                f"{name}{what.get(name, '')}: pool {found.get(name)!r:.80}, this run {expected.get(name)!r:.80}"
            )
    return problems


# ---- prompts ----------------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt ids as GRPOTrainer tokenizes text prompts (chat template with the generation prompt, or plain text)."""
    from trl.data_utils import is_conversational

    if not prompts:
        return []
    if is_conversational({"prompt": prompts[0]}):
        out = tokenizer.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
        return [list(ids) for ids in out["input_ids"]]
    return [list(ids) for ids in tokenizer(text=prompts)["input_ids"]]


def teacher_prompt_builder(tokenizer, args):
    """The trainer's [`TeacherPromptBuilder`] for `args`, tokenizing as GRPOTrainer does."""
    from .teacher import TeacherPromptBuilder

    kwargs = args.chat_template_kwargs or {}
    return TeacherPromptBuilder(
        template=args.teacher_prompt_template,
        column=args.privileged_context_column,
        allow_empty=args.allow_empty_privileged_context,
        max_length=args.max_teacher_prompt_length,
        count_tokens=lambda prompts: [len(ids) for ids in tokenize_prompts(tokenizer, prompts, kwargs)],
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
    )


# ---- sampling and scoring ---------------------------------------------------------------------------------------
def cut_after_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS (GRPO's completion mask), as a list."""
    out = []
    for token in ids:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def _left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _autocast(device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def sequence_logps(
    model,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    pad_id: int,
    device,
    bf16: bool = False,
) -> list[float]:
    """Sum over each completion of `log softmax(logits / temperature)` at its tokens, given its prompt.

    The same computation as the trainer's teacher scoring with pbsd-trl's fused kernel (`[left-padded prompt ;
    right-padded completion]`, hidden states through the LM head in fp32 without `[tokens, vocab]` logits).
    """
    from .logprobs import concat_prompt_completion, head_logit_transform
    from .ops import fused_logprobs

    p_ids, p_mask = _left_pad(prompt_ids, pad_id, device)
    c_ids, c_mask = _right_pad(completion_ids, pad_id, device)
    input_ids, attention_mask, labels = concat_prompt_completion(p_ids, p_mask, c_ids, c_mask)
    backbone = model.get_base_model().base_model if hasattr(model, "peft_config") else model.base_model
    head = model.get_output_embeddings()
    with _autocast(device, bf16):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        softcap, logit_scale = head_logit_transform(model)
        logps = fused_logprobs(
            hidden[:, :-1].to(head.weight.device),
            head.weight,
            labels[:, 1:].to(head.weight.device),
            temperature=temperature,
            bias=head.bias,
            softcap=softcap,
            logit_scale=logit_scale,
        )
    return logps.sum(-1).tolist()


class HFSampler:
    """K samples per prompt with `model.generate`, GRPOTrainer's generation config, left-padded batches."""

    name = "hf"

    def __init__(self, model, tokenizer, args, eos_ids, device, bf16=False):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.device, self.bf16 = model, tokenizer, device, bf16
        kwargs = {
            "max_new_tokens": args.max_completion_length,
            "do_sample": True,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": list(eos_ids),
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
            "cache_implementation": args.cache_implementation,
        }
        kwargs.update(args.generation_kwargs or {})
        self.generation_config = GenerationConfig(**kwargs, disable_compile=True)

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], num_samples: int) -> list[list[list[int]]]:
        rows = [ids for ids in prompt_ids for _ in range(num_samples)]
        input_ids, attention_mask = _left_pad(rows, self.tokenizer.pad_token_id, self.device)
        with _autocast(self.device, self.bf16):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        completions = out[:, input_ids.size(1) :].tolist()
        return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))]


class VLLMSampler:
    """K samples per prompt with vLLM's offline engine (`vllm.LLM`) loaded from the teacher's path.

    vLLM only draws the samples; their teacher log-probs are still computed by the HF model (the trainer's scoring
    function), so that the pool's log-probs and the trainer's agree. `dtype` should be the one the HF model scores in:
    vLLM's default ("auto") runs a float32 checkpoint in 16 bits, which would sample from a rounded teacher.
    """

    name = "vllm"

    def __init__(
        self,
        model_name_or_path: str,
        args,
        eos_ids,
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        dtype: str = "auto",
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError("backend='vllm' needs vLLM: `pip install vllm` (or use backend='hf').") from err
        if args.generation_kwargs:
            raise ValueError(
                f"backend='vllm' does not translate `generation_kwargs` {args.generation_kwargs}; use 'hf'."
            )
        self.llm = LLM(
            model=model_name_or_path,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=args.vllm_max_model_length,
            dtype=dtype,
        )
        self._params = lambda n: SamplingParams(
            n=n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k or -1,
            min_p=args.min_p or 0.0,
            repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_completion_length,
            stop_token_ids=list(eos_ids),
            ignore_eos=False,
        )

    def sample(self, prompt_ids: list[list[int]], num_samples: int) -> list[list[list[int]]]:
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, self._params(num_samples), use_tqdm=False)
        return [[list(c.token_ids) for c in out.outputs] for out in outputs]


# ---- building ---------------------------------------------------------------------------------------------------
def _parts_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "parts")


def _read_stamp(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, POOL_STAMP_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
            keys.update(pq.read_table(os.path.join(folder, name), columns=["key"]).column("key").to_pylist())
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


def build_teacher_pool(
    model,
    tokenizer,
    dataset,
    output_dir: str,
    args,
    num_samples: int,
    *,
    batch_size: int = 256,
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
        batch_size: completions per generate call (rows × K); larger batches amortize the per-token overhead.
        backend: `"hf"` (transformers `generate`) or `"vllm"` (offline `vllm.LLM`, needs `model_name_or_path`).
        seed: sampling seed (each batch is seeded from it and its first row, so a rerun draws the same samples).
        progress: show a progress bar on the main process.
        stop_after_batches: stop (as if killed) after this many batches on each process; for tests.

    Under `accelerate launch`, each process draws a disjoint share of the rows; the main process then merges the
    parts. Returns the pool's `datasets.Dataset`.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .teacher import check_privileged_context

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"`backend` must be 'hf' or 'vllm', got {backend!r}.")
    if batch_size < num_samples:
        raise ValueError(f"`batch_size` ({batch_size}) must hold at least the K={num_samples} samples of one row.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    state = PartialState()
    device = state.device
    was_training = model.training
    model = model.to(device).eval()
    # A PEFT model's base teacher is the model with its adapters disabled
    base_weights = model.disable_adapter if hasattr(model, "peft_config") else contextlib.nullcontext
    eos_ids = eos_token_ids(model, tokenizer)
    stamp = pool_stamp(model, tokenizer, args, eos_ids)

    # The stamp is written first: a resumed build must be the same build
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
                "dtype": str(next(model.parameters()).dtype),
                "bf16": bool(args.bf16),
                "rows": None,
                "created": (found or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            },
        )

    # Distinct (prompt, context) rows not yet drawn, split over processes
    column = args.privileged_context_column
    prompts, contexts = dataset["prompt"], dataset[column]
    first_row: dict[str, int] = {}
    for i, (prompt, context) in enumerate(zip(prompts, contexts, strict=True)):
        check_privileged_context(context, column, i, args.allow_empty_privileged_context)
        first_row.setdefault(row_key(prompt, context), i)
    state.wait_for_everyone()
    done = _done_keys(output_dir)
    todo = [(key, row) for key, row in first_row.items() if key not in done]
    mine = todo[state.process_index :: state.num_processes]

    builder = teacher_prompt_builder(tokenizer, args)
    rows = [{"prompt": prompts[r], column: contexts[r]} for _, r in mine]
    teacher_prompts, _ = builder([row["prompt"] for row in rows], rows) if rows else ([], [])
    prompt_ids = tokenize_prompts(tokenizer, teacher_prompts, args.chat_template_kwargs)
    # Longest first: similar lengths share a batch (less padding), and a memory problem shows up at once
    order = sorted(range(len(mine)), key=lambda i: -len(prompt_ids[i]))

    if backend == "vllm":
        # The engine samples in the precision the teacher is scored in below (bf16 autocast, or the model's dtype)
        scored_dtype = "bfloat16" if args.bf16 else str(next(model.parameters()).dtype).removeprefix("torch.")
        sampler = VLLMSampler(
            model_name_or_path or model.config._name_or_path,
            args,
            eos_ids,
            vllm_gpu_memory_utilization,
            seed,
            dtype=scored_dtype,
        )
    else:
        sampler = HFSampler(model, tokenizer, args, eos_ids, device, bf16=bool(args.bf16))
    prompts_per_batch = max(1, batch_size // num_samples)
    bar = tqdm(
        total=len(mine) * num_samples,
        unit="sample",
        desc=f"teacher pool ({sampler.name})",
        disable=not (progress and state.is_main_process),
        dynamic_ncols=True,
    )
    generated, started = 0, time.perf_counter()
    for b, start in enumerate(range(0, len(order), prompts_per_batch)):
        if stop_after_batches is not None and b >= stop_after_batches:
            break
        batch = order[start : start + prompts_per_batch]
        first_key = mine[batch[0]][0]
        torch.manual_seed(int(hashlib.sha256(f"{seed}:{first_key}".encode()).hexdigest()[:8], 16))
        with base_weights():
            samples = sampler.sample([prompt_ids[i] for i in batch], num_samples)
        records = []
        flat_prompts, flat_completions = [], []
        for i, drawn in zip(batch, samples, strict=True):
            drawn = [cut_after_eos(ids, eos_ids) for ids in drawn]
            flat_prompts += [prompt_ids[i]] * num_samples
            flat_completions += drawn
            records.append(
                {
                    "key": mine[i][0],
                    "row": mine[i][1],
                    "completion_ids": drawn,
                    "teacher_prompt_length": len(prompt_ids[i]),
                }
            )
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
        _write_part(output_dir, state.process_index, records)
        generated += sum(len(c) for c in flat_completions)
        bar.update(len(flat_completions))
        bar.set_postfix_str(f"{generated / (time.perf_counter() - started):.0f} tok/s")
    bar.close()
    model.train(was_training)

    state.wait_for_everyone()
    if stop_after_batches is not None and len(_done_keys(output_dir)) < len(first_row):
        return None
    if state.is_main_process:
        merged = _merge_parts(output_dir)
        final = _read_stamp(output_dir)
        final.update(complete=True, rows=len(merged))
        _write_json_atomic(os.path.join(output_dir, POOL_STAMP_FILE), final)
    state.wait_for_everyone()
    dataset_out, _ = load_teacher_pool(output_dir)
    return dataset_out


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
    return load_from_disk(os.path.join(path, "data")), stamp


# ---- use in the trainer -----------------------------------------------------------------------------------------
class TeacherPool:
    """A finished pool as the trainer reads it: K samples per key, taken G_T at a time, unused ones first.

    The i-th visit of a prompt group takes samples `(i·G_T + j) mod K` for its j-th teacher row, so every sample is
    used once before any is reused. Visits are counted per process (the rows of a prompt group sit on one process
    when the per-device batch holds whole groups); they restart from 0 when a run is resumed from a checkpoint.
    """

    def __init__(self, path: str, stride: int = 1):
        self.path = path
        self.stride = stride  # G_T: samples a group takes per visit
        self.dataset, self.stamp = load_teacher_pool(path)
        self.num_samples = int(self.stamp["num_samples"])
        self._index = {key: i for i, key in enumerate(self.dataset["key"])}
        self._completions = self.dataset["completion_ids"]
        self._logps = self.dataset["teacher_logps"]
        self.visits: Counter[str] = Counter()

    def check(self, expected_stamp: dict, num_teacher_generations: int) -> None:
        problems = stamp_mismatches(self.stamp, expected_stamp)
        if problems:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} was drawn from another teacher or with other settings than this "
                "run: " + "; ".join(problems) + ". Rebuild the pool with this run's model and config "
                "(`python -m pbsd_trl.scripts.build_teacher_pool`), or unset `teacher_pool`."
            )
        if self.num_samples < num_teacher_generations:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} holds K={self.num_samples} samples per row, fewer than "
                f"`num_teacher_generations`={num_teacher_generations} taken per prompt. Rebuild it with "
                f"--num_samples >= {num_teacher_generations}."
            )

    def check_covers(self, dataset, column: str, name: str = "train_dataset") -> None:
        """Every row of `dataset` must have samples: fail at construction, naming the first row without."""
        missing = [
            i
            for i, (prompt, context) in enumerate(zip(dataset["prompt"], dataset[column], strict=True))
            if row_key(prompt, context) not in self._index
        ]
        if missing:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} has no samples for {len(missing)} of the {len(dataset)} rows of "
                f"{name} (first: row {missing[0]}). Build the pool from this dataset (rerunning the build command "
                "on the same folder draws only the missing rows)."
            )

    def has(self, key: str) -> bool:
        return key in self._index

    def take(self, key: str, visit: int, position: int) -> tuple[list[int], float]:
        """The sample the `position`-th teacher row of a group takes on the group's `visit`-th visit."""
        if key not in self._index:
            raise TeacherPoolError(
                f"The teacher pool at {self.path} has no samples for a training prompt (key {key})."
            )
        i = self._index[key]
        j = (visit * self.stride + position) % self.num_samples
        return list(self._completions[i][j]), float(self._logps[i][j])

    def draw(self, keys: Sequence[str], positions: Sequence[int], groups: Sequence[int]) -> tuple[list, list]:
        """Samples and teacher log-probs of teacher rows given their key, position in their group and group id.

        Rows of the same group share one visit number; each group seen counts as one visit of its key.
        """
        visit_of_group: dict[int, int] = {}
        for key, group in zip(keys, groups, strict=True):
            if group not in visit_of_group:
                visit_of_group[group] = self.visits[key]
                self.visits[key] += 1
        ids, logps = [], []
        for key, position, group in zip(keys, positions, groups, strict=True):
            sample, logp = self.take(key, visit_of_group[group], position)
            ids.append(sample)
            logps.append(logp)
        return ids, logps


# ---- the example scripts' default -------------------------------------------------------------------------------
def rows_visited(trainer, dataset) -> list[int]:
    """Indices of the dataset rows the run's `max_steps` optimizer steps will draw, in GRPO's sampler order."""
    args = trainer.args
    if args.max_steps is None or args.max_steps <= 0:
        return list(range(len(dataset)))
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    sampler = trainer._get_train_sampler(dataset)
    seen: dict[int, None] = {}
    drawn = 0
    while drawn < needed:
        before = drawn
        for index in sampler:
            seen.setdefault(int(index), None)
            drawn += 1
            if drawn >= needed:
                break
        if drawn == before:  # an empty sampler
            break
    return list(seen)


def use_default_pool(trainer, dataset, pool_root: str | None = None, say=print) -> str | None:
    """The example scripts' choice: draw the base teacher's samples for the rows the run visits into a pool first.

    A pool with K = G_T samples per visited row never draws more teacher samples than the run would draw online (each
    row is visited at least once), draws them in large batches, and spares the rescoring of the teacher's own
    samples: faster end to end whenever it applies, i.e. with the fixed `base` teacher sampled with HF `generate`
    (not vLLM, not DeepSpeed/FSDP-sharded weights). Returns the pool folder, or None when it does not apply.
    """
    args = trainer.args
    if args.teacher_pool is not None:
        return args.teacher_pool
    why_not = None
    if args.teacher_model_kind != "base" or args.teacher_samples_from != "teacher":
        why_not = f"teacher_model_kind={args.teacher_model_kind!r} changes during training"
    elif trainer.use_vllm:
        why_not = "vLLM serves the student's samples (pass a --teacher_pool built beforehand)"
    elif trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        why_not = (
            "the weights are sharded (build one with pbsd_trl.scripts.build_teacher_pool and pass --teacher_pool)"
        )
    if why_not is not None:
        say(f"[pbsd] Teacher samples: drawn in every step ({why_not}).")
        return None
    rows = rows_visited(trainer, dataset)
    subset = dataset.select(rows)
    teacher = trainer.teacher_weights_model()
    stamp = pool_stamp(teacher, trainer._tokenizer, args, trainer.eos_token_ids)
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = os.path.join(pool_root or args.output_dir, f"teacher_pool-{digest}")
    num_samples = args.num_teacher_generations
    start = time.perf_counter()
    pool = build_teacher_pool(teacher, trainer._tokenizer, subset, path, args, num_samples)
    seconds = time.perf_counter() - start
    trainer.use_teacher_pool(path)
    say(
        f"[pbsd] Teacher samples: from a pool of K={num_samples} base-teacher samples for the {len(pool)} training "
        f"prompts the run visits, drawn in {seconds:.0f} s into {path} (reused when the same command is rerun). "
        "Training takes them from it instead of sampling and rescoring the teacher in every step, which is faster end "
        "to end (benchmarks/results/step_cost.md). `--auto_teacher_pool false` samples the teacher in every step."
    )
    return path

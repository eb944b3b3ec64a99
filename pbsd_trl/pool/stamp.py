"""What a pool was drawn from (its stamp), and the fingerprints the trainer checks it against."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..tokens import eos_token_ids


POOL_STAMP_FILE = "pbsd_pool.json"
POOL_FORMAT = 2
# Stamp fields that decide the teacher's sampling distribution and scoring: a pool must agree on all of them
CHECKED_FIELDS = (
    "format",
    "teacher_weights",
    "model_config",
    "dtype",
    "mixed_precision",
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
    from ..teacher.weights import _gathered

    adapters = _adapter_names(model)
    digest = hashlib.sha256()
    tensors = [(n, p) for n, p in model.named_parameters()] + [(n, b) for n, b in model.named_buffers()]
    for name, tensor in tensors:
        parts = name.split(".")
        if adapters and any(part in adapters for part in parts):
            continue
        if "inv_freq" in name:  # RoPE buffers vary with their device; the config they derive from is fingerprinted
            continue
        with _gathered([tensor] if isinstance(tensor, torch.nn.Parameter) else []):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{_canonical_name(name)}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


# Config entries that name, route or describe outputs without changing a log-prob (`dtype` is a stamp field of its own)
_CONFIG_KEYS_IGNORED = frozenset(
    {
        "_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
        "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "output_attentions", "output_hidden_states",
        "return_dict", "torchscript", "id2label", "label2id", "problem_type", "tokenizer_class",
        "task_specific_params", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
        "chunk_size_feed_forward", "_experts_implementation", "initializer_range", "attention_dropout",
    }
)  # fmt: skip


def _base_of(model):
    model = getattr(model, "module", model)  # DDP/DeepSpeed wrapper
    return model.get_base_model() if hasattr(model, "peft_config") else model


def _config_entries(value):
    if isinstance(value, dict):
        return {k: _config_entries(v) for k, v in sorted(value.items()) if k not in _CONFIG_KEYS_IGNORED}
    return [_config_entries(v) for v in value] if isinstance(value, (list, tuple)) else value


def model_config_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the teacher's model configuration: everything in it that changes the log-probs of the same weights
    (RoPE base and scaling, which set the rotary buffers the weights fingerprint skips, norm epsilon, attention
    windows, layer types, …)."""
    entries = _config_entries(_base_of(model).config.to_dict())
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


def weights_dtype(model: torch.nn.Module) -> str:
    """The dtype the teacher's weights are held in (that of its input embeddings)."""
    return str(_base_of(model).get_input_embeddings().weight.dtype)


def mixed_precision(args) -> str:
    """The autocast precision the trainer computes in: `"bf16"`, `"fp16"` or `"no"`."""
    return "bf16" if args.bf16 else "fp16" if getattr(args, "fp16", False) else "no"


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
        "model_config": model_config_fingerprint(teacher_model),
        "dtype": weights_dtype(teacher_model),
        "mixed_precision": mixed_precision(args),
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
            what = {
                "teacher_weights": " (the teacher weights differ)",
                "model_config": " (the model configuration differs, e.g. RoPE scaling: other log-probs)",
                "tokenizer": " (the tokenizer differs)",
            }
            problems.append(
                f"{name}{what.get(name, '')}: pool {found.get(name)!r:.80}, this run {expected.get(name)!r:.80}"
            )
    return problems

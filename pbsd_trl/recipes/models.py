"""A causal LM and its tokenizer, left-padded and with a chat template, also for the built-in tiny models."""

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .tiny import ASSISTANT_TOKEN, END_TOKEN, USER_TOKEN, load_tokenizer


def _is_tiny_tokenizer_dir(path: str) -> bool:
    """Whether `path` is a local directory holding pbsd-trl's character tokenizer (`pbsd_trl.recipes.tiny`)."""
    config = Path(path) / "tokenizer_config.json"
    if not config.is_file():
        return False
    if (Path(path) / "pbsd_trl_base.json").is_file():
        return True
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    specials = set(map(str, data.get("extra_special_tokens") or data.get("additional_special_tokens") or []))
    return {USER_TOKEN, ASSISTANT_TOKEN} <= specials and data.get("eos_token") == END_TOKEN


def load_tokenizer_for(model_name_or_path: str):
    """The tokenizer of a model, left-padded, with a pad token and (for the built-in tiny models) its chat template."""
    if _is_tiny_tokenizer_dir(model_name_or_path):
        # `AutoTokenizer` resolves the tiny character tokenizer to `Qwen2Tokenizer` (from the model config), which
        # silently drops spaces: load it as saved.
        return load_tokenizer(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model_and_tokenizer(model_name_or_path: str, dtype: Any = None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` and [`load_tokenizer_for`]; `dtype` as `from_pretrained` takes it."""
    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=dtype if dtype is not None else "auto", **kwargs
    )
    tokenizer = load_tokenizer_for(model_name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

"""The tiny model's character tokenizer and Qwen2 configuration."""

from __future__ import annotations

import contextlib
import os
import string
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


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


@contextlib.contextmanager
def torch_threads(num_threads: int | None):
    """``torch.set_num_threads(num_threads)`` for the duration of the block (nothing when ``None``): the warm
    start's result and speed depend on the thread count, and the caller's setting comes back afterwards."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

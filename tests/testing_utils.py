"""Helpers shared by the tests (the fixtures built from them are in conftest.py)."""

import importlib.util
import re
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl.chat_template_utils import qwen2_5_chat_template

from pbsd_trl import PBSDConfig, PBSDTrainer
from pbsd_trl.recipes.tiny import build_random_model


TINY_RUN_DEFAULTS = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=8,
    max_steps=3,
    learning_rate=1e-2,
    logging_steps=1,
    report_to=[],
    bf16=False,
    use_cpu=True,
    save_strategy="no",
    seed=0,
)
"""A few CPU steps of 2 prompts x 4 samples on a tiny model: what most trainer tests run."""


TEMPLATE = "{prompt} Reference solution: {privileged_context}"
"""The teacher prompt template of the tests (the student's prompt, then the privileged context)."""


INVISIBLE_CONTEXTS = ["\u200b\u200b", "\x00", "\x1b[0m", "\x1b[31m \x1b[0m", "\ufeff\u2060\u200d", "\u3164"]
"""Privileged contexts with no visible character (zero-width, control, ANSI escapes, a Hangul filler): empty ones."""


def contains_answer(completions, answer, **kwargs):
    """The tests' reward function: 1.0 where a conversational completion contains the row's `answer`."""
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer, strict=True)]


def params_snapshot(model) -> list[torch.Tensor]:
    """Copies of `model`'s parameters, for `params_unchanged`."""
    return [p.detach().clone() for p in model.parameters()]


def params_unchanged(before: list[torch.Tensor], model) -> bool:
    """Whether every parameter of `model` still equals its `params_snapshot` copy `before` (no update happened)."""
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def manual_sequence_logps(
    model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0, score_mask=None
):
    """The independent reference of sequence scoring: a plain `model(...)` forward, full logits, float64 log-softmax
    at `temperature`, summed over `score_mask` (default: the completion mask; tool results attended to, not scored).
    Differentiable: call it under `torch.no_grad()` where no gradient is wanted."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    logits = model(input_ids=input_ids, attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    logps = (logits[:, prompt_ids.size(1) - 1 : -1].double() / temperature).log_softmax(-1)
    scored = completion_mask if score_mask is None else score_mask
    return (logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * scored).sum(-1)


def tiny_pbsd_config(output_dir, **overrides) -> PBSDConfig:
    """`PBSDConfig` of a short CPU test run into `output_dir`: `TINY_RUN_DEFAULTS` updated with `overrides`."""
    return PBSDConfig(**{"output_dir": str(output_dir), **TINY_RUN_DEFAULTS, **overrides})


def save_tiny_model(path, tokenizer, **model_kwargs) -> str:
    """Save `build_random_model(tokenizer, **model_kwargs)` and `tokenizer` into `path`, a model directory."""
    Path(path).mkdir(parents=True, exist_ok=True)
    build_random_model(tokenizer, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_example(name: str):
    """`examples/<name>.py` as a module, imported under another name (`examples/math.py` would shadow `math`)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pbsd_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb_lora_adapters(model, seed: int = 0, std: float = 0.5) -> None:
    """Give every `lora_B` matrix seeded random values: a trained-looking adapter, so that the outputs with and
    without it differ (a fresh LoRA adapter is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


TOOL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<unk>",
]


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def tool_tokenizer():
    """Character-level tokenizer with Qwen2.5's special tokens and chat template (which TRL can parse tool calls of)."""
    vocab = {token: i for i, token in enumerate(TOOL_SPECIAL_TOKENS + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOOL_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=qwen2_5_chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    # The system text and tool schema the template renders are ~700 characters: one token per fixed piece keeps the
    # prompts short enough for a CPU test
    header = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tools=[multiply], tokenize=False)
    header = header[: header.index("<|im_start|>user")]
    pieces = re.split("|".join(re.escape(t) for t in TOOL_SPECIAL_TOKENS), header)
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces if len(p) > 8])
    return tokenizer


class ScriptedAnswerTrainer(PBSDTrainer):
    """`PBSDTrainer` whose every generation call returns `12` then EOS: agent and environment tests whose point is not
    what the model writes (a random model's tokens may open a tool call at random)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        answer = self._tokenizer("12", add_special_tokens=False)["input_ids"] + [self._tokenizer.eos_token_id]
        return [list(answer) for _ in prompt_ids], None

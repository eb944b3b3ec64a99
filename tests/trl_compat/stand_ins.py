"""Offline stand-ins for the hub ids TRL's tests load: tiny random models and local datasets.

`trl-internal-testing/tiny-<Arch>For<Head>[-suffix]` becomes a randomly initialized `<Arch>For<Head>` of a few
thousand parameters, built from its transformers config class, with a character-level tokenizer carrying the chat
template TRL ships for that model family (so TRL's tool-call parsing recognizes it). The models are written into a
Hugging Face hub cache layout, so `from_pretrained("trl-internal-testing/…")` resolves them with `HF_HUB_OFFLINE=1`.
`trl-internal-testing/zen` (the Zen of Python, in TRL's dataset formats) is rebuilt from `this`.

These stand-ins make the tests runnable here; they are not the hub's models (vocabulary, weights and tokenizer
differ), so a test whose assertion depends on the real checkpoint can behave differently.
"""

import codecs
import hashlib
import re
import string
from pathlib import Path

from datasets import Dataset, DatasetDict
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from trl import chat_template_utils as templates


ORG = "trl-internal-testing"
_HEADS = {
    "ForCausalLM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "ForSequenceClassification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}
# (chat template, end-of-turn token) per model-type prefix; longest prefix wins
_FAMILIES = {
    "qwen2": ("qwen2_5_chat_template", "<|im_end|>"),
    "qwen3": ("qwen3_chat_template", "<|im_end|>"),
    "llama": ("llama3_2_chat_template", "<|eot_id|>"),
    "gemma": ("gemma_chat_template", "<end_of_turn>"),
    "gpt_oss": ("gptoss_chat_template", "<|return|>"),
    "phi3": ("phi3_chat_template", "<|end|>"),
    "cohere": ("cohere_chat_template", "<|END_OF_TURN_TOKEN|>"),
}
_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=2048,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    sliding_window=64,
)


def hub_ids(test_source: str) -> list[str]:
    return sorted(set(re.findall(rf'"({ORG}/[^"]+)"', test_source)))


def _family(model_type: str) -> tuple[str, str]:
    matches = [prefix for prefix in _FAMILIES if model_type.startswith(prefix)]
    return _FAMILIES[max(matches, key=len)] if matches else _FAMILIES["qwen2"]


def char_tokenizer(chat_template: str, eos: str) -> PreTrainedTokenizerFast:
    """One token per printable character, plus every `<…>` marker the chat template writes as a special token."""
    markers = sorted(set(re.findall(r"<\|?[A-Za-z_/][A-Za-z_0-9]*\|?>", chat_template)) | {eos, "<|pad|>", "<unk>"})
    vocab = {token: i for i, token in enumerate(markers + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in markers])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token=eos,
        unk_token="<unk>",
        chat_template=chat_template,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def build_model(repo_id: str, out_dir: Path) -> bool:
    """Write a stand-in for `repo_id` into `out_dir`; False when the id names no causal-LM/classifier we can build."""
    match = re.fullmatch(rf"{ORG}/tiny-(\w+?)(ForCausalLM|ForSequenceClassification)(?:-.+)?", repo_id)
    if not match:
        return False
    arch = match[1] + match[2]
    model_type = next((t for t, name in _HEADS[match[2]].items() if name == arch), None)
    if model_type is None:
        return False
    import transformers

    template_name, eos = _family(model_type)
    tokenizer = char_tokenizer(getattr(templates, template_name), eos)
    config = AutoConfig.for_model(model_type)
    overrides = {k: v for k, v in _TINY.items() if hasattr(config, k)}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        num_labels=1,
        **overrides,
    )
    model = getattr(transformers, arch)(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return True


def write_hub_cache(repo_ids: list[str], cache_dir: Path) -> dict[str, bool]:
    """Stand-ins in hub-cache layout (`models--org--name/{refs/main, snapshots/<sha>/}`); returns which were built."""
    built = {}
    for repo_id in repo_ids:
        root = cache_dir / f"models--{repo_id.replace('/', '--')}"
        sha = hashlib.sha1(repo_id.encode()).hexdigest()
        snapshot = root / "snapshots" / sha
        if snapshot.exists():
            built[repo_id] = True
            continue
        built[repo_id] = build_model(repo_id, snapshot)
        if built[repo_id]:
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / "main").write_text(sha)
    return built


def zen_lines() -> list[str]:
    import this  # noqa: F401  (prints the Zen once; the text is rot13 in `this.s`)

    return [line for line in codecs.decode(this.s, "rot13").splitlines()[2:] if line.strip()]


def zen(config_name: str) -> DatasetDict:
    """TRL's `zen` dataset formats used by the GRPO tests, from the Zen of Python (train: 17 rows, test: 2)."""
    lines = zen_lines()
    rows = []
    for line in lines:
        words = line.split()
        prompt, completion = " ".join(words[: len(words) // 2]), " " + " ".join(words[len(words) // 2 :])
        if config_name == "standard_prompt_only":
            rows.append({"prompt": prompt})
        elif config_name == "conversational_prompt_only":
            rows.append({"prompt": [{"role": "user", "content": prompt}]})
        elif config_name == "standard_prompt_completion":
            rows.append({"prompt": prompt, "completion": completion})
        elif config_name == "conversational_prompt_completion":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        elif config_name == "standard_language_modeling":
            rows.append({"text": line})
        elif config_name == "conversational_language_modeling":
            rows.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
            )
        else:
            raise FileNotFoundError(f"No offline stand-in for trl-internal-testing/zen config {config_name!r}")
    return DatasetDict(train=Dataset.from_list(rows[:-2]), test=Dataset.from_list(rows[-2:]))

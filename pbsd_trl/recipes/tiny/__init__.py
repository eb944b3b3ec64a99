"""A tiny offline base model for trying PBSD on a laptop CPU.

Everything is built from code, nothing is downloaded:

- :func:`build_char_tokenizer`: a character-level tokenizer over printable ASCII with a chat template
  (``<|user|>...<|assistant|>...<|end|>``) that works with TRL's conversational prompt path.
- :func:`tiny_model_config` / :func:`build_random_model`: a ~1M-parameter Qwen2 causal LM (and an even
  smaller one for unit tests).
- :func:`warm_start`: a short SFT from random initialization on the built-in tasks
  (:mod:`pbsd_trl.recipes.data`), half in student format (question -> a guess of what only the privileged context says,
  then everything else right) and half in teacher format (question + privileged context, a hint -> solution). It
  leaves a student that is right part of the time and a teacher (the same network with the hint in its prompt)
  that is right most of the time and still computes its answer: the setting self-distillation is for.
- :func:`get_base_model`: the warm-started model of a task, as a directory for ``from_pretrained``. The default
  recipe's models ship inside the package (``pbsd_trl/recipes/base_models/<task>``, checksummed), so every machine gets
  the same weights: the warm start's float trajectory depends on the CPU's kernels and thread count, so two
  machines building "the same" model get different ones. Other recipes (or ``build=True``) are built once and
  cached (``$PBSD_TRL_CACHE`` or ``~/.cache/pbsd_trl``).

The shipped copies were produced by the committed command

```bash
python -m pbsd_trl.recipes.tiny build math --output_dir pbsd_trl/recipes/base_models/math --num_threads 1
python -m pbsd_trl.recipes.tiny build tool_use --output_dir pbsd_trl/recipes/base_models/tool_use --num_threads 1
```

which also records, in each ``pbsd_trl_base.json``, the SHA-256 of every file (checked on every load), the
machine and the held-out quality of the result.

Example:

```python
from transformers import AutoModelForCausalLM
from pbsd_trl.recipes.tiny import get_base_model, load_tokenizer

path = get_base_model("math")  # the shipped copy: instant, no build
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = load_tokenizer(path)
```
"""

from .model import (
    ASSISTANT_TOKEN,
    CHARACTERS,
    CHAT_TEMPLATE,
    END_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TEST_MODEL_OVERRIDES,
    UNK_TOKEN,
    USER_TOKEN,
    build_char_tokenizer,
    build_random_model,
    load_tokenizer,
    tiny_model_config,
)
from .sft import DEFAULT_WARM_START_STEPS, warm_start
from .shipped import (
    BASE_MODEL_VERSION,
    MANIFEST_FILE,
    SHIPPED_BASE_MODELS_DIR,
    BaseModelChecksumError,
    base_model_quality,
    build_base_model,
    default_cache_dir,
    get_base_model,
    verify_base_model,
)


__all__ = [
    "ASSISTANT_TOKEN",
    "CHARACTERS",
    "END_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "USER_TOKEN",
    "BASE_MODEL_VERSION",
    "CHAT_TEMPLATE",
    "MANIFEST_FILE",
    "BaseModelChecksumError",
    "DEFAULT_WARM_START_STEPS",
    "SHIPPED_BASE_MODELS_DIR",
    "TEST_MODEL_OVERRIDES",
    "base_model_quality",
    "build_base_model",
    "build_char_tokenizer",
    "build_random_model",
    "default_cache_dir",
    "get_base_model",
    "load_tokenizer",
    "tiny_model_config",
    "verify_base_model",
    "warm_start",
]

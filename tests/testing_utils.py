"""Helpers shared by the tests (the fixtures built from them are in conftest.py)."""

import importlib.util
from pathlib import Path

import torch

from pbsd_trl import PBSDConfig
from pbsd_trl.tiny import build_random_model


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

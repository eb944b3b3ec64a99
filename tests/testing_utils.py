"""Helpers shared by the tests (the fixtures built from them are in conftest.py)."""

import importlib.util
from pathlib import Path

from pbsd_trl.tiny import build_random_model


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

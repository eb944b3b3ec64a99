"""Fixtures shared by the tests."""

import pytest
from testing_utils import save_tiny_model

from pbsd_trl.recipes.tiny import build_char_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """pbsd-trl's character tokenizer (`pbsd_trl.recipes.tiny`)."""
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A directory holding a random `size="test"` tiny model (seed 0) and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer, size="test", seed=0)

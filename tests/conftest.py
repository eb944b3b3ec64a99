"""Fixtures shared by the tests."""

import pytest
from testing_utils import TEMPLATE, contains_answer, save_tiny_model, tiny_pbsd_config

from pbsd_trl import PBSDTrainer
from pbsd_trl.recipes.tiny import build_char_tokenizer, build_random_model


@pytest.fixture(scope="session")
def tokenizer():
    """pbsd-trl's character tokenizer (`pbsd_trl.recipes.tiny`)."""
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A directory holding a random `size="test"` tiny model (seed 0) and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer, size="test", seed=0)


@pytest.fixture
def tiny_trainer(tmp_path, tokenizer):
    """Factory of the tests' `PBSDTrainer`: `tiny_trainer(train_dataset, reward_funcs=contains_answer, *, args=None,
    model=None, **trainer_kwargs)` on `model` (default: a fresh `build_random_model(tokenizer)`) with the `tokenizer`
    fixture; `args` defaults to `tiny_pbsd_config(tmp_path)` with the tests' teacher prompt template."""

    def make(train_dataset, reward_funcs=contains_answer, *, args=None, model=None, **trainer_kwargs):
        if args is None:
            args = tiny_pbsd_config(tmp_path, teacher_prompt_template=TEMPLATE)
        if model is None:
            model = build_random_model(tokenizer)
        return PBSDTrainer(
            model, reward_funcs, args=args, train_dataset=train_dataset, processing_class=tokenizer, **trainer_kwargs
        )

    return make

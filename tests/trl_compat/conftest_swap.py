"""pytest plugin for TRL's GRPO tests: offline datasets, and with PBSD_TRL_COMPAT_TRAINER=pbsd, PBSD swapped in.

The swap is what a user does: `GRPOConfig` → `PBSDConfig`, `GRPOTrainer` → `PBSDTrainer`, and a privileged-context
column added to the datasets. Nothing else of the tests changes.
"""

import importlib
import importlib.util
import os

import datasets
import pytest
import stand_ins
from trl import GRPOConfig

from pbsd_trl import PBSDConfig, PBSDTrainer


def _availability_check(name):
    # TRL's testing_utils.py of a newer/older checkout may import an `is_<package>_available` helper the installed trl
    # lacks (e.g. `is_joblib_available`); answer it the way TRL's helpers do, by whether the package is importable.
    if name.startswith("is_") and name.endswith("_available"):
        package = name[len("is_") : -len("_available")]
        return lambda *args, **kwargs: importlib.util.find_spec(package) is not None
    raise AttributeError(f"module 'trl.import_utils' has no attribute {name!r}")


_import_utils = importlib.import_module("trl.import_utils")  # `trl` is a lazy module: attribute access fails
if not hasattr(_import_utils, "__getattr__"):
    _import_utils.__getattr__ = _availability_check

PRIVILEGED_CONTEXT = "A reference answer: keep it short."
_real_load_dataset = datasets.load_dataset


def load_dataset(path, name=None, *args, split=None, **kwargs):
    if path == f"{stand_ins.ORG}/zen":
        data = stand_ins.zen(name)
        data = data[split] if split else data
        if kwargs.get("streaming"):
            data = (
                data.to_iterable_dataset()
                if split
                else datasets.IterableDatasetDict({key: value.to_iterable_dataset() for key, value in data.items()})
            )
    else:
        data = _real_load_dataset(path, name, *args, split=split, **kwargs)
    # the user's swap: the data gets its privileged-context column where it is loaded (so the datasets a test
    # later hands to the trainer or to `evaluate()` are the ones it loaded)
    return _with_context(data) if os.environ.get("PBSD_TRL_COMPAT_TRAINER") == "pbsd" else data


def _with_context(dataset):
    if dataset is None:
        return None
    if isinstance(dataset, dict):
        return type(dataset)({key: _with_context(value) for key, value in dataset.items()})
    columns = getattr(dataset, "column_names", None)
    if columns is None and isinstance(dataset, datasets.IterableDataset):  # a mapped stream: schema unknown
        columns = list(next(iter(dataset), {}))
    if "privileged_context" in (columns or []):
        return dataset
    if isinstance(dataset, datasets.Dataset):
        return dataset.add_column("privileged_context", [PRIVILEGED_CONTEXT] * len(dataset))
    return dataset.map(lambda row: {**row, "privileged_context": PRIVILEGED_CONTEXT})


def _bf16_ok() -> bool:
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    return torch.cuda.is_available() and is_torch_bf16_gpu_available()


# Where the machine has no bf16 (CPU-only hosts), the configs' `bf16=None` default resolves to fp32, in both runs
# alike. Module-level classes: the trainers pickle their config.
class FP32GRPOConfig(GRPOConfig):
    def __post_init__(self):
        if self.bf16 is None and not _bf16_ok():
            self.bf16 = False
        super().__post_init__()


class FP32PBSDConfig(PBSDConfig):
    def __post_init__(self):
        if self.bf16 is None and not _bf16_ok():
            self.bf16 = False
        super().__post_init__()


class SwappedTrainer(PBSDTrainer):
    def __init__(self, *args, train_dataset=None, eval_dataset=None, **kwargs):
        super().__init__(
            *args, train_dataset=_with_context(train_dataset), eval_dataset=_with_context(eval_dataset), **kwargs
        )


@pytest.fixture(autouse=True)
def _offline_and_swap(request, monkeypatch):
    module = request.module
    if hasattr(module, "load_dataset"):
        monkeypatch.setattr(module, "load_dataset", load_dataset)
    pbsd = os.environ.get("PBSD_TRL_COMPAT_TRAINER") == "pbsd"
    if hasattr(module, "GRPOConfig"):
        monkeypatch.setattr(module, "GRPOConfig", FP32PBSDConfig if pbsd else FP32GRPOConfig)
    if pbsd and hasattr(module, "GRPOTrainer"):
        monkeypatch.setattr(module, "GRPOTrainer", SwappedTrainer)

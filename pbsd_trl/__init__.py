"""pbsd-trl: Preference-Based Self-Distillation for Hugging Face TRL."""

__version__ = "0.1.0"

from .config import PBSDConfig
from .trainer import PBSDTrainer


__all__ = ["PBSDConfig", "PBSDTrainer", "__version__"]

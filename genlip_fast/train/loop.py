"""Former home of the single-process loop; the trainer (FSDP2, any number of ranks) lives in ``trainer.py``."""

from .distributed import pick_device
from .trainer import build_model_config, caption_heldout, ensure_demo_data, param_groups, train

__all__ = ["build_model_config", "caption_heldout", "ensure_demo_data", "param_groups", "pick_device", "train"]

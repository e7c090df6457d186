"""The GenLIP reference model (plain PyTorch; fused ops plug in through ``attn_backend`` / ``ce_backend``)."""

from .config import PAPER_PARAMS, PRESETS, ModelConfig, get_preset
from .model import GenLIP, count_parameters

__all__ = ["GenLIP", "ModelConfig", "PAPER_PARAMS", "PRESETS", "count_parameters", "get_preset"]

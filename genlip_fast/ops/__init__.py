"""Fused ops, importable into any model. Each has ``impl="auto" | "triton" | "reference"``."""

from .linear_cross_entropy import linear_cross_entropy
from .mrope import apply_mrope, mrope_position_ids, sample_position_ids
from .prefix_lm_attention import prefix_lm_attention

__all__ = ["apply_mrope", "linear_cross_entropy", "mrope_position_ids", "prefix_lm_attention", "sample_position_ids"]

"""Modules on the fused ops, for models of your own (GenLIP's model is built from them).

- :class:`GatedPrefixLMAttention`: q/k/v/o projections, optional per-head q/k RMS norm, grouped-query attention,
  MRoPE and the sigmoid output gate (elementwise, headwise or none), on the packed prefix-LM attention.
- :class:`LinearCrossEntropy`: an LM head whose loss never materialises the logits.

This floor imports only ``genlip_fast.ops``.
"""

from .attention import GATES, AttendFn, GatedPrefixLMAttention
from .loss import LinearCrossEntropy

__all__ = ["AttendFn", "GATES", "GatedPrefixLMAttention", "LinearCrossEntropy"]

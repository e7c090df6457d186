"""Let ViT Speak: KV-cache captioning, the patch-semantics readout and the vision-encoder module."""

from .generate import KVCache, Sampling, generate, sample_next, top_p_filter

__all__ = ["KVCache", "Sampling", "generate", "sample_next", "top_p_filter"]

"""genlip_fast: fast, exact GenLIP pretraining (packed prefix-LM attention with MRoPE and gate, fused LM head)."""

__version__ = "0.1.0"

"""genlip_fast: fast, exact GenLIP pretraining (packed prefix-LM attention with MRoPE and gate, fused LM head).

``genlip_fast.load_encoder(path, dtype=..., device=...)`` gives the vision encoder of a checkpoint (imported on
first use, so ``import genlip_fast`` stays light).
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load_encoder":
        from .speak.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'genlip_fast' has no attribute {name!r}")


__all__ = ["load_encoder"]

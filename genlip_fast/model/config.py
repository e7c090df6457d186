"""Model configuration and the paper's presets (Table 1), plus tiny presets for tests and the demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CHOICES = {
    "gate": ("elementwise", "headwise", "none"),
    "drop_path_mode": ("sample", "pack"),
    "drop_path_schedule": ("linear", "constant"),
}


@dataclass
class ModelConfig:
    """One GenLIP transformer over ``[image patches | caption tokens]``."""

    dim: int = 1152
    """Model width."""
    n_layers: int = 27
    """Number of transformer blocks."""
    n_heads: int = 16
    """Attention heads; head_dim = dim // n_heads."""
    ffn_dim: int = 3072
    """SwiGLU hidden width."""
    vocab_size: int = 151936
    """Text vocabulary (embedding and LM head rows); 151,936 = the Qwen3 model vocab."""
    text_embed_dim: int | None = None
    """Width of the text embedding and LM-head input when smaller than dim (with linear maps in and out)."""
    patch_size: int = 16
    """Square patch side in pixels (the conv patch embedding's kernel and stride)."""
    in_channels: int = 3
    """Image channels."""
    mrope_section: tuple[int, int, int] = (12, 12, 12)
    """Rotary frequencies per (t, h, w) axis (chunked: sums to head_dim // 2; interleaved: bounds h and w)."""
    mrope_interleaved: bool = True
    """Interleaved frequency layout (the authors') or chunked (Qwen2-VL)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    gate: str = "elementwise"
    """Attention output gate: 'elementwise' (one per head and channel), 'headwise' (one per head) or 'none'."""
    layer_scale_init: float = 0.1
    """Initial value of both layer scales in each block."""
    drop_path: float = 0.1
    """Stochastic depth rate (of the last block under the linear schedule)."""
    drop_path_mode: str = "sample"
    """What one drop-path draw removes: 'sample' (every token of one packed sample) or 'pack' (the whole pack: the
    authors' code drops whole packed rows, one 16K pack each)."""
    drop_path_schedule: str = "linear"
    """'linear': rates rise from 0 at the first block to drop_path at the last; 'constant': drop_path in every block
    (the authors')."""
    mlp_bias: bool = False
    """Biases on the three SwiGLU linears (the authors' code has them; the paper presets leave them out)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    attn_backend: str = "auto"
    """Attention implementation: 'auto' | 'triton' | 'reference' | 'flex'."""
    ce_backend: str = "auto"
    """LM head + cross-entropy implementation: 'auto' | 'triton' | 'reference'."""

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        from ..ops.mrope.positions import mrope_axis_map

        mrope_axis_map(self.head_dim, self.mrope_section, self.mrope_interleaved)  # raises on a bad section
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# The authors' model code: MLP biases, one constant drop-path rate, whole packed rows dropped.
AUTHORS_CODE = dict(mlp_bias=True, drop_path_mode="pack", drop_path_schedule="constant")

PRESETS: dict[str, ModelConfig] = {
    # Table 1.
    "L/16": ModelConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, mrope_section=(8, 12, 12), drop_path=0.1),
    "So/16": ModelConfig(dim=1152, n_layers=27, n_heads=16, ffn_dim=3072, mrope_section=(12, 12, 12), drop_path=0.1),
    "g/16": ModelConfig(dim=1536, n_layers=40, n_heads=24, ffn_dim=4096, mrope_section=(16, 16, 16), drop_path=0.2),
    # The authors' released model JSONs (configs/model_configs/genlip/*.json; DESIGN.md): So/16 is Table 1's shape,
    # L/16 and g/16 are not (L/16: 1152 wide, FFN 2752, text width 1024; g/16: 16 heads of 96, text width 1024).
    "L/16-official": ModelConfig(dim=1152, n_layers=24, n_heads=16, ffn_dim=2752, text_embed_dim=1024,
                                 mrope_section=(8, 12, 12), drop_path=0.1, **AUTHORS_CODE),
    "So/16-official": ModelConfig(dim=1152, n_layers=27, n_heads=16, ffn_dim=3072, mrope_section=(12, 12, 12),
                                  drop_path=0.1, **AUTHORS_CODE),
    "g/16-official": ModelConfig(dim=1536, n_layers=40, n_heads=16, ffn_dim=4096, text_embed_dim=1024,
                                 mrope_section=(16, 16, 16), drop_path=0.2, **AUTHORS_CODE),
    # Tiny presets: vocab is replaced by the tokenizer's size where they are used.
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=352, vocab_size=512, mrope_section=(4, 6, 6),
                        drop_path=0.0),
    "tiny-hd72": ModelConfig(dim=144, n_layers=2, n_heads=2, ffn_dim=256, vocab_size=512,
                             mrope_section=(12, 12, 12), drop_path=0.0),
    "tiny-textproj": ModelConfig(dim=96, n_layers=2, n_heads=2, ffn_dim=192, vocab_size=512, text_embed_dim=64,
                                 mrope_section=(8, 8, 8), gate="headwise", mrope_interleaved=False, drop_path=0.1),
}

# What Table 1 lists, for the parameter-count report.
PAPER_PARAMS = {"L/16": 0.3e9, "So/16": 0.4e9, "g/16": 1.1e9}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else dataclasses.replace(PRESETS[name])

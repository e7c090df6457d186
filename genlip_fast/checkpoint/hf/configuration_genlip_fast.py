"""Configuration of a GenLIP vision encoder exported by genlip_fast (``python -m genlip_fast.convert export-hf``).

Imports only the standard library and transformers (4.57 and later, 5.x included: the versions the tests run), as
remote code must.
"""

try:  # transformers 5 renamed the base class; 4.x has only the old name
    from transformers import PreTrainedConfig
except ImportError:
    from transformers import PretrainedConfig as PreTrainedConfig

CHOICES = {
    "gate": ("elementwise", "headwise", "none"),
    "norm_type": ("layernorm", "rmsnorm"),
    "hidden_act": ("silu",),
}


class GenLIPVisionConfig(PreTrainedConfig):
    r"""The vision tower of GenLIP ("Let ViT Speak", arXiv 2605.00809): a ViT over 16x16 patches without absolute
    positions, with multimodal rotary positions (MRoPE, image token at grid (row, col) -> position (0, row, col)),
    a sigmoid output gate in every attention, SwiGLU MLPs and layer scales.

    Args:
        hidden_size: width d of every token.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads H.
        num_key_value_heads: key/value heads (grouped-query attention; default H).
        head_dim: channels per head (default d // H).
        intermediate_size: SwiGLU hidden width.
        hidden_act: the MLP activation ("silu": SwiGLU).
        patch_size: square patch side p in pixels.
        num_channels: image channels C (a patch is C * p * p values, flattened (c, y, x)).
        image_size: the square side a fixed-size caller feeds (what LLaVA-style code reads); the tower itself takes
            any grid.
        norm_type: "layernorm" or "rmsnorm" (block and final norms).
        layer_norm_eps: epsilon of every norm.
        qk_norm: RMS-normalise each head's q and k (learned scale) before rotary.
        attention_bias: biases on the q/k/v/o projections.
        mlp_bias: biases on the three SwiGLU linears.
        gate: "elementwise" (q_proj yields per head [q_h | g_h], one gate per head and channel), "headwise" (one
            gate per head, after all heads' q) or "none".
        layer_scale_init_value: initial per-channel layer scale of both residual branches; None: no layer scales.
        rope_theta: rotary base.
        mrope_section: (t, h, w) rotary frequencies per position axis.
        mrope_interleaved: frequency i takes h when i % 3 == 1 and i < 3 * s_h, w when i % 3 == 2 and i < 3 * s_w,
            t otherwise (GenLIP's layout); False: contiguous t | h | w runs (Qwen2-VL's).
        initializer_range: std of the normal init of freshly made weights.
    """

    model_type = "genlip_fast_vision"

    def __init__(self, hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=None,
                 head_dim=None, intermediate_size=3072, hidden_act="silu", patch_size=16, num_channels=3,
                 image_size=512, norm_type="layernorm", layer_norm_eps=1e-6, qk_norm=False, attention_bias=True,
                 mlp_bias=False, gate="elementwise", layer_scale_init_value=0.1, rope_theta=10000.0,
                 mrope_section=(12, 12, 12), mrope_interleaved=True, initializer_range=0.02, **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.image_size = image_size
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.gate = gate
        self.layer_scale_init_value = layer_scale_init_value
        self.rope_theta = rope_theta
        self.mrope_section = [int(s) for s in mrope_section]
        self.mrope_interleaved = mrope_interleaved
        self.initializer_range = initializer_range
        self._check()
        super().__init__(**kwargs)

    def _check(self):
        """One ValueError naming the field, for a config this tower cannot run."""
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"GenLIPVisionConfig.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"GenLIPVisionConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"GenLIPVisionConfig.head_dim must be even (rotary pairs), got {self.head_dim}")
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
            raise ValueError(f"GenLIPVisionConfig.mrope_section must be three non-negative ints (t, h, w), "
                             f"got {self.mrope_section}")
        if not self.mrope_interleaved and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"GenLIPVisionConfig.mrope_section {self.mrope_section} must sum to head_dim // 2 = "
                             f"{self.head_dim // 2} when mrope_interleaved is false")


__all__ = ["GenLIPVisionConfig"]

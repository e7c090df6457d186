"""GenLIP's vision tower for transformers, as exported by genlip_fast (``python -m genlip_fast.convert export-hf``).

    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    out = model(**processor(images, return_tensors="pt"), output_hidden_states=True)
    out.last_hidden_state   # final-norm features: (N, d) for flat patches, (B, L, d) for (B, C, H, W) pixels
    out.pooler_output       # (num_images, d): mean over each image's patches
    out.hidden_states       # (embeddings, block 1, ..., block L) outputs, each shaped like last_hidden_state

Two input forms: Qwen2-VL's (``pixel_values (N, C*p*p)`` = every image's patches in a row, with ``image_grid_thw
(num_images, 3)`` = (1, rows, cols) per image) for native aspect ratios, and ``(B, C, H, W)`` pixels for fixed-size
callers. Each image attends only to its own patches: images of one call are padded to the longest and run through
PyTorch's scaled_dot_product_attention with a key mask (none when all have one size), so it runs on CPU and on any
GPU. Imports only torch and transformers.

Shapes: B images, L patches per image (padded), d width, H query and H_kv key/value heads of D channels.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_genlip_fast import GenLIPVisionConfig


def make_norm(config, dim):
    if config.norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


def mrope_cos_sin(config, grids, length, device):
    """cos and sin ``(B, L, D)`` float32 for images of ``grids`` [(rows, cols), ...], padded to ``length``.

    Patch (r, c) sits at position (t, h, w) = (0, r, c); rotary frequency i turns with the axis ``axis[i]`` picks
    (interleaved: h at i % 3 == 1 below 3 * s_h, w at i % 3 == 2 below 3 * s_w, t elsewhere; chunked: runs of
    s_t, s_h, s_w); both halves of a head share the frequencies (rotate-half)."""
    D = config.head_dim
    i = torch.arange(D // 2, device=device)
    s_t, s_h, s_w = config.mrope_section
    if config.mrope_interleaved:
        axis = torch.where((i % 3 == 1) & (i < 3 * s_h), 1, torch.where((i % 3 == 2) & (i < 3 * s_w), 2, 0))
    else:
        axis = (i >= s_t).long() + (i >= s_t + s_h).long()
    inv_freq = (1.0 / config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)).float()
    pos = torch.zeros(len(grids), length, 3, device=device)  # (B, L, 3); padding keeps position 0
    for b, (rows, cols) in enumerate(grids):
        r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        pos[b, : rows * cols, 1], pos[b, : rows * cols, 2] = r.reshape(-1).float(), c.reshape(-1).float()
    angles = pos[..., axis] * inv_freq  # (B, L, D/2): frequency i reads its own axis
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotate-half rotary on ``x (B, L, heads, D)``, in float32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, :, None] + torch.cat([-x2, x1], dim=-1) * sin[:, :, None]).to(x.dtype)


class GenLIPAttention(nn.Module):
    """``o_proj(sigmoid(gate) * Attention(rope(q), rope(k), v))``; q_proj yields q and the gate logits from one
    matmul: per head ``[q_h | g_h]`` (elementwise gate) or all heads' q then one logit per head (headwise)."""

    def __init__(self, config):
        super().__init__()
        d, H, D = config.hidden_size, config.num_attention_heads, config.head_dim
        self.H, self.H_kv, self.D, self.gate = H, config.num_key_value_heads, D, config.gate
        gate_width = {"elementwise": H * D, "headwise": H, "none": 0}[config.gate]
        self.q_proj = nn.Linear(d, H * D + gate_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.H_kv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.H_kv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=config.attention_bias)
        self.q_norm = nn.RMSNorm(D, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(D, eps=config.layer_norm_eps) if config.qk_norm else None

    def forward(self, x, cos, sin, key_mask):
        B, L, _ = x.shape
        H, D = self.H, self.D
        qg = self.q_proj(x)
        if self.gate == "elementwise":
            q, g = qg.view(B, L, H, 2 * D).split(D, dim=-1)  # (B, L, H, D) each
        else:
            q = qg[..., : H * D].view(B, L, H, D)
            g = qg[..., H * D:].view(B, L, H, 1) if self.gate == "headwise" else None
        k = self.k_proj(x).view(B, L, self.H_kv, D)
        v = self.v_proj(x).view(B, L, self.H_kv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.H_kv != H:  # each key/value head serves H / H_kv consecutive query heads
            k, v = k.repeat_interleave(H // self.H_kv, dim=2), v.repeat_interleave(H // self.H_kv, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=key_mask)  # (B, H, L, D); key_mask (B, 1, 1, L) or None
        o = o.transpose(1, 2)  # (B, L, H, D)
        if g is not None:
            o = (o.float() * torch.sigmoid(g.float())).to(o.dtype)
        return self.o_proj(o.reshape(B, L, H * D))


class GenLIPMLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config):
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.w1 = nn.Linear(d, f, bias=bias)  # gate
        self.w3 = nn.Linear(d, f, bias=bias)  # up
        self.w2 = nn.Linear(f, d, bias=bias)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GenLIPBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``x += ls1 * attn(norm1 x)``; ``x += ls2 * mlp(norm2 x)`` (no scales without layer scale).

    A ``GradientCheckpointingLayer``: transformers' checkpointing switches (``gradient_checkpointing_enable``, 5.x's
    ``activation_checkpointing_enable(every_n_layers=...)``) act on it, with ``x`` passed positionally as reentrant
    checkpointing needs."""

    def __init__(self, config):
        super().__init__()
        d, ls = config.hidden_size, config.layer_scale_init_value
        self.norm1 = make_norm(config, d)
        self.attn = GenLIPAttention(config)
        self.ls1 = nn.Parameter(torch.full((d,), float(ls))) if ls is not None else None
        self.norm2 = make_norm(config, d)
        self.mlp = GenLIPMLP(config)
        self.ls2 = nn.Parameter(torch.full((d,), float(ls))) if ls is not None else None

    def forward(self, x, cos, sin, key_mask):
        a = self.attn(self.norm1(x), cos, sin, key_mask)
        x = x + (a if self.ls1 is None else self.ls1 * a)
        m = self.mlp(self.norm2(x))
        return x + (m if self.ls2 is None else self.ls2 * m)


class GenLIPVisionModel(PreTrainedModel):
    config_class = GenLIPVisionConfig
    base_model_prefix = "genlip_vision"
    main_input_name = "pixel_values"
    _no_split_modules = ["GenLIPBlock"]
    _input_embed_layer = "patch_embed"  # get_input_embeddings(): enable_input_require_grads hooks its output
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        p, C = config.patch_size, config.num_channels
        # Applied to each patch as a (C, p, p) image: called as a module, so hooks on it run (transformers'
        # enable_input_require_grads, accelerate's device placement).
        self.patch_embed = nn.Conv2d(C, config.hidden_size, p, stride=p)
        self.blocks = nn.ModuleList(GenLIPBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GenLIPBlock) and module.ls1 is not None:
            nn.init.constant_(module.ls1, self.config.layer_scale_init_value)
            nn.init.constant_(module.ls2, self.config.layer_scale_init_value)

    def patchify(self, pixel_values):
        """``(B, C, H, W)`` with H, W multiples of p -> ``(B, H/p * W/p, C*p*p)``, patches row-major, each (c, y, x)."""
        B, C, Hpx, Wpx = pixel_values.shape
        p = self.config.patch_size
        if C != self.config.num_channels or Hpx % p or Wpx % p:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected (B, {self.config.num_channels}, "
                             f"H, W) with H and W multiples of the patch size {p}")
        x = pixel_values.reshape(B, C, Hpx // p, p, Wpx // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (Hpx // p) * (Wpx // p), C * p * p)

    def forward(self, pixel_values, image_grid_thw=None, output_hidden_states=None, return_dict=None,
                output_attentions=None):
        """
        Args:
            pixel_values: ``(N, C*p*p)`` patches of every image in a row (with ``image_grid_thw``), or ``(B, C, H, W)``.
            image_grid_thw: ``(num_images, 3)`` int, (1, rows, cols) per image, rows * cols patches each.
            output_hidden_states: also return the embeddings and every block's output (before the final norm).
            output_attentions: not supported (the attention runs fused, without its weights).
        Returns:
            ``BaseModelOutputWithPooling``; ``last_hidden_state`` and each hidden state ``(N, d)`` for flat patches,
            ``(B, L, d)`` for pixels; ``pooler_output (num_images, d)`` the mean over each image's patches.
        """
        if output_attentions:
            raise ValueError("GenLIPVisionModel does not return attention weights (output_attentions)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        flat = pixel_values.dim() == 2
        if flat:
            if image_grid_thw is None:
                raise ValueError("flat pixel_values (N, C*p*p) need image_grid_thw (num_images, 3)")
            grids_thw = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
            if any(t != 1 for t, _, _ in grids_thw):
                raise ValueError(f"image_grid_thw {grids_thw}: one frame per image (t = 1) only")
            grids = [(h, w) for _, h, w in grids_thw]
            lengths = [h * w for h, w in grids]
            if sum(lengths) != pixel_values.shape[0]:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw says "
                                 f"{sum(lengths)}")
            patches = nn.utils.rnn.pad_sequence(list(pixel_values.split(lengths)), batch_first=True)  # (B, L, Cpp)
        else:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be (N, C*p*p) or (B, C, H, W), got {tuple(pixel_values.shape)}")
            p = self.config.patch_size
            grids = [(pixel_values.shape[2] // p, pixel_values.shape[3] // p)] * pixel_values.shape[0]
            lengths = [h * w for h, w in grids]
            patches = self.patchify(pixel_values)
        B, L, _ = patches.shape
        p, C = self.config.patch_size, self.config.num_channels
        x = self.patch_embed(patches.reshape(B * L, C, p, p).to(self.patch_embed.weight.dtype))  # (B*L, d, 1, 1)
        x = x.reshape(B, L, -1)  # (B, L, d)
        cos, sin = mrope_cos_sin(self.config, grids, L, x.device)
        valid = torch.arange(L, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]  # (B, L)
        key_mask = None if min(lengths) == L else valid[:, None, None, :]  # padding keys are never attended to

        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, cos, sin, key_mask)
            if output_hidden_states:
                hidden.append(x)
        last = self.norm(x)
        valid = valid.to(last.device)  # under a device_map the blocks may end on another device than they began
        counts = torch.tensor(lengths, device=last.device, dtype=torch.float32)[:, None]
        pooled = ((last.float() * valid[..., None]).sum(1) / counts).to(last.dtype)  # (B, d)

        if flat:  # back to one row per patch, padding dropped
            last = last[valid]
            hidden = [h[valid.to(h.device)] for h in hidden] if hidden is not None else None
        hidden = tuple(hidden) if hidden is not None else None
        if not return_dict:
            return tuple(v for v in (last, pooled, hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


__all__ = ["GenLIPVisionModel"]

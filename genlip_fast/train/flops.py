"""Useful training FLOPs of a packed batch, and the GPU peaks MFU is measured against.

What counts (one multiply-add = 2 FLOPs; training = forward + backward, the backward doing twice the forward's
matrix work — weight gradient and input gradient):

- every linear layer of every block on every real token (padding excluded), by its exact shape: q_proj (with the
  gate's extra width), k_proj, v_proj, o_proj and the three SwiGLU matrices: ``6 * weights * tokens``;
- attention on the query-key pairs the prefix-LM mask lets through, per sample: with P image and L text tokens,
  ``P*P + L*P + L*(L+1)/2`` pairs, each ``2*D`` FLOPs for QK^T and ``2*D`` for PV per head, times 3 for training;
- the patch embedding on image tokens (forward + weight gradient only: its input is data, ``4 * patch_dim * d``);
- the optional text maps (``text_embed_dim``): the input map on text tokens, the output map on loss rows;
- the LM head on loss rows only (the rows the loss is computed on): ``6 * text_dim * vocab``.

Not counted: norms, softmax, rotary, gate multiply, embedding lookups, the loss itself, and any recomputation
(activation checkpointing, attention backward recompute). So MFU here is model FLOPs utilisation, not hardware.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.batch import PackedBatch
from ..model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by device-name fragment; the first fragment found wins, so
# the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name (``torch.cuda.get_device_name()``); None when unknown or CPU."""
    if not device_name:
        return None
    for fragment, peak in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return peak
    return None


def block_linear_weights(cfg: ModelConfig) -> int:
    """Weights one token passes through in one block's linear layers (biases excluded)."""
    d, hd = cfg.dim, cfg.n_heads * cfg.head_dim
    gate = {"elementwise": hd, "headwise": cfg.n_heads, "none": 0}[cfg.gate]
    attn = d * (hd + gate) + 2 * d * hd + hd * d
    mlp = 3 * d * cfg.ffn_dim
    return attn + mlp


def prefix_lm_pairs(image_tokens: int, text_tokens: int) -> int:
    """Query-key pairs one sample's prefix-LM mask lets through (image block full, text causal, text sees image)."""
    p, t = image_tokens, text_tokens
    return p * p + t * p + t * (t + 1) // 2


def training_flops(cfg: ModelConfig, seqlens: Sequence[int], prefix_lens: Sequence[int],
                   num_loss_tokens: int) -> float:
    """Useful FLOPs of one forward + backward over a pack.

    Args:
        cfg: the model's configuration (shapes only).
        seqlens: ``(n,)`` tokens per sample (image + prompt + caption), padding excluded.
        prefix_lens: ``(n,)`` image tokens per sample.
        num_loss_tokens: rows that carry the loss (the LM head runs on these only).
    """
    seqlens = [int(s) for s in seqlens]
    prefix_lens = [int(p) for p in prefix_lens]
    tokens = sum(seqlens)
    image = sum(prefix_lens)
    text = tokens - image
    text_dim = cfg.text_embed_dim or cfg.dim
    pairs = sum(prefix_lm_pairs(p, s - p) for s, p in zip(seqlens, prefix_lens))

    fwd = 0.0
    fwd += 2.0 * block_linear_weights(cfg) * tokens * cfg.n_layers
    fwd += 4.0 * cfg.n_heads * cfg.head_dim * pairs * cfg.n_layers
    if cfg.text_embed_dim and cfg.text_embed_dim != cfg.dim:
        fwd += 2.0 * text_dim * cfg.dim * (text + num_loss_tokens)
    fwd += 2.0 * text_dim * cfg.vocab_size * num_loss_tokens
    patch = 2.0 * cfg.patch_dim * cfg.dim * image
    return 3.0 * fwd + 2.0 * patch


def pack_flops(cfg: ModelConfig, batch: PackedBatch) -> float:
    """:func:`training_flops` of a :class:`PackedBatch` (reads its host-side lengths; call before moving it)."""
    seqlens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    return training_flops(cfg, seqlens, batch.prefix_lens.tolist(), batch.num_loss_tokens)


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of ``device``; None on CPU or an unknown GPU (MFU is then reported as n/a)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


__all__ = ["PEAK_BF16_FLOPS", "block_linear_weights", "device_peak_flops", "pack_flops", "peak_flops",
           "prefix_lm_pairs", "training_flops"]

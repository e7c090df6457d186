"""FlexAttention baseline for the benchmarks (GPU only): the same packed prefix-LM attention through
``torch.nn.attention.flex_attention`` with a block mask built from sample ids and prefix lengths.

Rotary and gate are applied outside the attention with plain PyTorch, and q/k/v are moved from the ``(T, H, D)``
layout a projection produces to FlexAttention's ``(1, H, T, D)`` and back — costs a user of FlexAttention pays,
so they are inside the measured time. Everything is imported lazily: importing this module touches nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..mrope.positions import mrope_cos_sin


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def prefix_lm_block_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, total_tokens: int,
                         block_size: int = 128):
    """FlexAttention ``BlockMask`` for a pack: same sample, and key ``j < prefix or j <= i`` (local indices).

    Padding tokens (past ``cu_seqlens[-1]``) belong to no sample and see nothing. Built once per pack."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = cu_seqlens.device
    cu = cu_seqlens.long()
    idx = torch.arange(total_tokens, device=device)
    seq = torch.searchsorted(cu, idx, right=True) - 1  # sample id; == num_samples on padding
    valid = idx < cu[-1]
    seq = torch.where(valid, seq, torch.full_like(seq, -1))
    safe = seq.clamp(min=0)
    local = idx - cu[safe]
    prefix = prefix_lens.long()[safe]

    def mask_mod(b, h, q_idx, kv_idx):
        same = (seq[q_idx] == seq[kv_idx]) & (seq[q_idx] >= 0)
        return same & ((local[kv_idx] < prefix[kv_idx]) | (kv_idx <= q_idx))

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=total_tokens, KV_LEN=total_tokens, device=device,
                             BLOCK_SIZE=block_size)


_MASK_CACHE: list = []  # [(cu_seqlens, prefix_lens, T, versions, mask)]: the last pack's mask


def cached_block_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, total_tokens: int):
    """The pack's block mask, built once and reused while the same ``cu_seqlens``/``prefix_lens`` tensors come back
    (every layer of one forward passes the same ones). The cache holds the tensors, so their ids stay theirs."""
    versions = (cu_seqlens._version, prefix_lens._version)
    if _MASK_CACHE:
        cu, pl, T, ver, mask = _MASK_CACHE[0]
        if cu is cu_seqlens and pl is prefix_lens and T == total_tokens and ver == versions:
            return mask
    mask = prefix_lm_block_mask(cu_seqlens, prefix_lens, total_tokens)
    _MASK_CACHE[:] = [(cu_seqlens, prefix_lens, total_tokens, versions, mask)]
    return mask


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, None, :] + rot * sin[:, None, :]).to(x.dtype)


def prefix_lm_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask,
    *,
    gate: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = True,
    rope_theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Same result as :func:`genlip_fast.ops.prefix_lm_attention` with a mask from :func:`prefix_lm_block_mask`.

    q ``(T, H, D)``, k, v ``(T, H_kv, D)`` with ``H % H_kv == 0`` (grouped-query attention); returns ``(T, H, D)``."""
    if position_ids is not None:
        cos, sin = mrope_cos_sin(position_ids, q.shape[-1], mrope_section, mrope_interleaved, rope_theta)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, T, D)
    gqa = k.shape[1] != q.shape[1]
    out = _compiled_flex()(qh, kh, vh, block_mask=block_mask, scale=softmax_scale, enable_gqa=gqa)
    out = out[0].transpose(0, 1)  # (T, H, D)
    if gate is not None:
        g = torch.sigmoid(gate.float())
        out = (out.float() * (g if g.dim() == 3 else g[..., None])).to(q.dtype)
    return out


__all__ = ["cached_block_mask", "prefix_lm_block_mask", "prefix_lm_attention_flex"]

"""Packed prefix-LM attention with MRoPE and a sigmoid output gate."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._dispatch import resolve_impl


def prefix_lm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    mrope_section: Sequence[int] | None = None,
    mrope_interleaved: bool = True,
    rope_theta: float = 10000.0,
    softmax_scale: float | None = None,
    max_seqlen: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``out = sigmoid(gate) * softmax(mask(rope(q) rope(k)^T * scale)) v`` over a pack of samples.

    Args:
        q: ``(total_tokens, num_heads, head_dim)``; k, v: ``(total_tokens, num_kv_heads, head_dim)`` with
            ``num_heads % num_kv_heads == 0`` (grouped-query attention: query head ``h`` reads key/value head
            ``h // (num_heads // num_kv_heads)``; ``num_kv_heads = 1`` is multi-query attention). fp32 / fp16 /
            bf16, one dtype; may be strided views (e.g. slices of one fused projection) — they are not copied.
        cu_seqlens: ``(num_samples + 1,)`` int32, sample boundaries; tokens past ``cu_seqlens[-1]`` are padding and
            get zeros.
        prefix_lens: ``(num_samples,)`` int32, image tokens at the start of each sample. ``prefix_lens == seqlens``
            is full bidirectional attention (encoder use); ``0`` is causal.
        gate: pre-sigmoid logits, ``(total_tokens, num_heads, head_dim)`` (elementwise) or
            ``(total_tokens, num_heads)`` (headwise); None = no gate.
        position_ids: ``(3, total_tokens)`` int MRoPE positions (t, h, w); None = no rotary.
        mrope_section: e.g. ``(12, 12, 12)``, sums to ``head_dim // 2``.
        mrope_interleaved: interleaved frequency layout (default) or the chunked Qwen2-VL layout.
        softmax_scale: default ``head_dim ** -0.5``.
        max_seqlen: longest sample (host int); lets the fused kernel size its grid without reading ``cu_seqlens``
            back from the device. Computed (one sync) when omitted.
        impl: ``"auto"`` | ``"triton"`` | ``"reference"`` | ``"flex"`` (FlexAttention with rope and gate outside
            it; a GPU baseline).

    Inside one sample (here 3 image tokens, 3 text tokens)::

        k: i i i t t t
        i  x x x . . .
        i  x x x . . .
        i  x x x . . .
        t  x x x x . .
        t  x x x x x .
        t  x x x x x x

    Returns ``(total_tokens, num_heads, head_dim)`` in q's dtype.
    """
    which = resolve_impl(impl, q, k, v, extra=("flex",))
    kwargs = dict(
        gate=gate,
        position_ids=position_ids,
        mrope_section=mrope_section,
        mrope_interleaved=mrope_interleaved,
        rope_theta=rope_theta,
        softmax_scale=softmax_scale,
    )
    if which == "reference":
        from .reference import prefix_lm_attention_reference

        return prefix_lm_attention_reference(q, k, v, cu_seqlens, prefix_lens, **kwargs)
    if which == "flex":
        from .flex import cached_block_mask, prefix_lm_attention_flex

        mask = cached_block_mask(cu_seqlens, prefix_lens, q.shape[0])
        return prefix_lm_attention_flex(q, k, v, mask, **kwargs)
    from .function import prefix_lm_attention_triton

    return prefix_lm_attention_triton(q, k, v, cu_seqlens, prefix_lens, max_seqlen=max_seqlen, **kwargs)


__all__ = ["prefix_lm_attention"]

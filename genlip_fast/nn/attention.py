"""Gated prefix-LM attention over a packed batch, as a module: projections, optional per-head q/k RMS norm,
grouped-query attention, MRoPE and the sigmoid output gate, on the fused op.

Shapes: T tokens in a pack, d model width, H query heads and H_kv key/value heads of D channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..ops import prefix_lm_attention

GATES = ("elementwise", "headwise", "none")

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(q, k, v, gate) -> out``: attention on unrotated ``q (T, H, D)``, ``k, v (T, H_kv, D)`` and the gate logits
(``(T, H, D)``, ``(T, H)`` or None), returning ``(T, H, D)``. Passed to :meth:`GatedPrefixLMAttention.forward` in
place of the packed attention, e.g. to keep a KV cache (``genlip_fast.speak``)."""


class GatedPrefixLMAttention(nn.Module):
    """``o_proj(sigmoid(gate) * PrefixLMAttn(rope(norm(q)), rope(norm(k)), v))`` over a pack of samples.

    ``q_proj`` maps d to the query heads and, with a gate, the gate logits from the same input: per head
    ``[q_h | g_h]`` (elementwise: one logit per head and channel, the GenLIP and Qwen3-Next layout) or one extra
    logit per head after all heads' q (headwise). ``k_proj`` and ``v_proj`` make ``n_kv_heads`` heads; each serves
    ``n_heads // n_kv_heads`` consecutive query heads (GQA; 1 key/value head is MQA).

    Args:
        dim: model width d (input and output).
        n_heads: query heads H.
        n_kv_heads: key/value heads H_kv, dividing H (default H).
        head_dim: channels per head D, even, at most 256 (default d // H).
        gate: ``"elementwise"`` | ``"headwise"`` | ``"none"``.
        qk_norm: RMS-normalise each head's q and k over its D channels, with a learned scale (Qwen3), before rotary.
        bias: biases on the four projections.
        mrope_section: ``(t, h, w)`` rotary frequencies per position axis; None = no rotary.
        mrope_interleaved: the interleaved frequency layout (GenLIP, Qwen3-VL) or the chunked one (Qwen2-VL).
        rope_theta: rotary base.
        norm_eps: epsilon of the q/k norms.
        impl: the attention op's ``impl``: ``"auto"`` | ``"triton"`` | ``"reference"`` | ``"flex"``.
    """

    def __init__(self, dim: int, n_heads: int, *, n_kv_heads: int | None = None, head_dim: int | None = None,
                 gate: str = "elementwise", qk_norm: bool = False, bias: bool = True,
                 mrope_section: Sequence[int] | None = None, mrope_interleaved: bool = True,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = dim // n_heads if head_dim is None else head_dim
        if gate not in GATES:
            raise ValueError(f"gate must be one of {list(GATES)}, got {gate!r}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must divide n_heads = {n_heads}, got {n_kv_heads}")
        if head_dim < 2 or head_dim % 2 or head_dim > 256:
            raise ValueError(f"head_dim must be even and in [2, 256], got {head_dim}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.gate = gate
        self.mrope_section = None if mrope_section is None else tuple(int(s) for s in mrope_section)
        self.mrope_interleaved, self.rope_theta, self.impl = bool(mrope_interleaved), float(rope_theta), impl
        H, D = n_heads, head_dim
        gate_width = {"elementwise": H * D, "headwise": H, "none": 0}[gate]
        self.q_proj = nn.Linear(dim, H * D + gate_width, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(H * D, dim, bias=bias)
        self.q_norm = nn.RMSNorm(D, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(D, eps=norm_eps) if qk_norm else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x (T, d)`` -> unrotated ``q (T, H, D)``, ``k, v (T, H_kv, D)`` (after the q/k norms) and the gate
        logits (``(T, H, D)``, ``(T, H)`` or None). Without q/k norms, q and gate are strided views of one
        projection output (the fused op reads them in place)."""
        T, H, D = x.shape[0], self.n_heads, self.head_dim
        qg = self.q_proj(x)  # (T, H*D + gate)
        if self.gate == "elementwise":
            qg = qg.view(T, H, 2 * D)
            q, gate = qg[..., :D], qg[..., D:]
        else:
            q = qg[:, : H * D].view(T, H, D)
            gate = qg[:, H * D:] if self.gate == "headwise" else None  # (T, H)
        k = self.k_proj(x).view(T, self.n_kv_heads, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, self.v_proj(x).view(T, self.n_kv_heads, D), gate

    def packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                         cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                         position_ids: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """The gated prefix-LM attention of :meth:`project`'s outputs, with this module's rotary: ``(T, H, D)``.
        Rotary is applied when both ``position_ids`` and ``mrope_section`` are given."""
        rope = position_ids is not None and self.mrope_section is not None
        return prefix_lm_attention(
            q, k, v, cu_seqlens, prefix_lens,
            gate=gate,
            position_ids=position_ids if rope else None,
            mrope_section=self.mrope_section if rope else None,
            mrope_interleaved=self.mrope_interleaved,
            rope_theta=self.rope_theta,
            max_seqlen=max_seqlen,
            impl=self.impl,
        )

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                prefix_lens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                max_seqlen: int | None = None, *, attend: AttendFn | None = None) -> torch.Tensor:
        """``x (T, d)`` -> ``(T, d)``.

        Args:
            x: the normalised hidden states of one pack.
            cu_seqlens: ``(n + 1,)`` int32 sample boundaries; tokens past ``cu_seqlens[-1]`` are padding.
            prefix_lens: ``(n,)`` int32 bidirectional prefix (image tokens) per sample; ``= seqlens`` is full
                attention, ``0`` causal.
            position_ids: ``(3, T)`` int MRoPE positions (t, h, w).
            max_seqlen: the longest sample (host int); saves the fused op a device-to-host read.
            attend: replaces the packed attention (then ``cu_seqlens`` and the rest are not read).
        """
        q, k, v, gate = self.project(x)
        if attend is not None:
            o = attend(q, k, v, gate)
        elif cu_seqlens is None or prefix_lens is None:
            raise ValueError("GatedPrefixLMAttention needs cu_seqlens and prefix_lens (or an attend function)")
        else:
            o = self.packed_attention(q, k, v, gate, cu_seqlens, prefix_lens, position_ids, max_seqlen)
        return self.o_proj(o.reshape(x.shape[0], -1))

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, gate={self.gate}, "
                f"qk_norm={self.q_norm is not None}, mrope_section={self.mrope_section}, impl={self.impl}")


__all__ = ["AttendFn", "GATES", "GatedPrefixLMAttention"]

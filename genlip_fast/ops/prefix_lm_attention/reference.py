"""Plain-PyTorch packed prefix-LM attention with MRoPE and the sigmoid gate — the correctness oracle.

Runs on CPU, imports no Triton. Optimised code never imports this module; tests and benchmarks do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..mrope.reference import apply_mrope_reference


def prefix_lm_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
    """Dense ``(T, T)`` bool mask, True where query row may attend key column.

    Inside sample ``s`` (tokens ``cu[s]:cu[s+1]``, the first ``prefix_lens[s]`` are image tokens), query ``i`` sees
    key ``j`` iff ``j < prefix or j <= i`` (local indices). Nothing crosses samples; padding rows see nothing.
    Example, two samples: (prefix 2, 4 tokens) and (prefix 1, 2 tokens) and one pad::

        k: 0 1 2 3 4 5 6
      q0   x x . . . . .     image tokens: all image tokens
      q1   x x . . . . .
      q2   x x x . . . .     text tokens: all image tokens + earlier text
      q3   x x x x . . .
      q4   . . . . x . .     second sample
      q5   . . . . x x .
      q6   . . . . . . .     padding
    """
    cu = cu_seqlens.tolist()
    T = cu[-1] if total_tokens is None else total_tokens
    mask = torch.zeros(T, T, dtype=torch.bool)
    for s, p in enumerate(prefix_lens.tolist()):
        a, b = cu[s], cu[s + 1]
        i = torch.arange(b - a)
        mask[a:b, a:b] = (i[None, :] < p) | (i[None, :] <= i[:, None])
    return mask.to(cu_seqlens.device)


def prefix_lm_attention_reference(
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
) -> torch.Tensor:
    """``sigmoid(gate) * softmax(mask(rope(q) rope(k)^T * scale)) v``, sample by sample.

    Shapes: q ``(T, H, D)``; k, v ``(T, H_kv, D)`` with ``H % H_kv == 0`` (grouped-query attention: query head
    ``h`` reads key/value head ``h // (H // H_kv)``); cu_seqlens ``(n + 1,)`` int32; prefix_lens ``(n,)`` int32;
    gate ``(T, H, D)`` or ``(T, H)``; position_ids ``(3, T)``. Tokens past ``cu_seqlens[-1]`` (padding) get zeros.
    Matmuls run in the input dtype, softmax in float32 (as PyTorch's own low-precision attention does), so calling it
    on bf16 inputs measures PyTorch's own rounding and on fp32 inputs gives the oracle.
    """
    T, H, D = q.shape
    H_kv = k.shape[1] if k.dim() == 3 else 0
    if k.shape != (T, H_kv, D) or v.shape != k.shape or not (H_kv == H or H_kv and H % H_kv == 0):
        raise ValueError(f"k and v must be (T, H_kv, D) with H % H_kv == 0 for q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if position_ids is not None:
        if mrope_section is None:
            raise ValueError("position_ids given without mrope_section")
        q = apply_mrope_reference(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
        k = apply_mrope_reference(k, position_ids, mrope_section, mrope_interleaved, rope_theta)
    if H_kv != H:  # each key/value head serves H // H_kv consecutive query heads; autograd sums their gradients
        k, v = k.repeat_interleave(H // H_kv, dim=1), v.repeat_interleave(H // H_kv, dim=1)
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    cu = cu_seqlens.tolist()
    parts = []
    for s, p in enumerate(prefix_lens.tolist()):
        a, b = cu[s], cu[s + 1]
        if b == a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        scores = torch.matmul(qs, ks.transpose(-1, -2)).float() * scale
        i = torch.arange(b - a, device=q.device)
        allowed = (i[None, :] < p) | (i[None, :] <= i[:, None])
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        parts.append((a, b, torch.matmul(probs.to(v.dtype), vs).float().transpose(0, 1)))
    for a, b, o in parts:
        out[a:b] = o
    if gate is not None:
        g = gate.float()
        out = out * torch.sigmoid(g if g.dim() == 3 else g[..., None])
        if cu[-1] < T:  # sigmoid(gate) * 0 is already 0 on padding; keep it explicit for clarity
            out[cu[-1]:] = 0
    return out.to(q.dtype)

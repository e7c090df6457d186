"""Triton kernels for MRoPE (rotate-half convention, per-frequency position axis).

``_rope_cos_sin`` and ``_sincos`` are shared with the fused attention, which rotates q and k in registers as it
loads them; ``_apply_mrope_kernel`` is the standalone rotation (and, with ``INVERSE``, its transpose for the
backward).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sincos(x):
    """``(cos(x), sin(x))`` in fp32 from FMA-pipe arithmetic only.

    ``tl.cos``/``tl.sin`` lower to libdevice calls with a local-memory slow path; in the attention inner loop they
    would cost more than the tile's two matmuls. Here: Cody-Waite reduction by pi/2 (three-part constant, exact
    products for |x| < 2^13 * pi/2), then minimax polynomials on [-pi/4, pi/4] (Cephes sinf/cosf), about 1 ulp there.
    """
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - k * 1.5703125
    r = r - k * 4.837512969970703125e-4
    r = r - k * 7.54978995489188216e-8
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quad = k.to(tl.int32) & 3
    swap = (quad & 1) != 0
    sin_v = tl.where(swap, c, s)
    cos_v = tl.where(swap, s, c)
    sin_v = tl.where(quad >= 2, -sin_v, sin_v)
    cos_v = tl.where((quad == 1) | (quad == 2), -cos_v, cos_v)
    return cos_v, sin_v


@triton.jit
def _rope_cos_sin(Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin ``(BLOCK, BLOCK_HALF)`` fp32 for global token indices ``tok`` (int64)."""
    f = tl.arange(0, BLOCK_HALF)
    f_mask = f < HALF
    # Padded frequencies get inv_freq 0: angle 0, cos 1, sin 0, so padded (zero) channels stay zero.
    inv = tl.load(InvFreq + f, mask=f_mask, other=0.0)
    axis = tl.load(Axis + f, mask=f_mask, other=0)
    # Only three position axes exist, so load three rows and select instead of gathering per channel.
    p_t = tl.load(Pos + tok * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    p_h = tl.load(Pos + stride_pa + tok * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    p_w = tl.load(Pos + 2 * stride_pa + tok * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    pos = tl.where(axis[None, :] == 0, p_t[:, None], tl.where(axis[None, :] == 1, p_h[:, None], p_w[:, None]))
    # Same fp32 product as the reference (position * inv_freq), so both see the same angle.
    return _sincos(pos * inv[None, :])


@triton.jit
def _apply_mrope_kernel(
    X, Y, Pos, InvFreq, Axis,
    stride_xt, stride_xh, stride_xd,
    stride_yt, stride_yh, stride_yd,
    stride_pa, stride_pt, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, INVERSE: tl.constexpr,
):
    """``Y = R X`` (or ``R^T X`` with ``INVERSE``, the backward) for one block of tokens of one head.

    The two rotate-half halves are loaded separately, so the rotation is elementwise and cos/sin are computed once
    per frequency; non-power-of-two halves (head dim 72 -> 36) are padded with masks."""
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half needs an even head dim")
    tl.static_assert(BLOCK_HALF >= HEAD_DIM // 2)
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = offs < total_tokens
    tok = offs.to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    mask = ok[:, None] & (d[None, :] < HALF)
    x_ptr = X + head * stride_xh + tok[:, None] * stride_xt + d[None, :] * stride_xd
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cos, sin = _rope_cos_sin(Pos, stride_pa, stride_pt, tok, ok, InvFreq, Axis, HALF, BLOCK_HALF)
    if INVERSE:
        sin = -sin
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    y_ptr = Y + head * stride_yh + tok[:, None] * stride_yt + d[None, :] * stride_yd
    tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)

"""Triton kernels for packed prefix-LM attention with MRoPE and a sigmoid output gate.

Layout conventions shared by every kernel here:

* q, k, v, gate, out: ``(T, H, D)`` with explicit strides (q/k/v may be slices of one fused projection).
* Tiles are scheduled per sample from ``cu_seqlens`` (grid axis 1 = sample, axis 2 = head, axis 0 = block inside the
  sample); one extra "sample" past the last one zeroes the padding rows ``[cu_seqlens[-1], T)``, so outputs can be
  allocated with ``torch.empty`` and nothing reads ``cu_seqlens`` back on the host.
* q and k are read as their two rotate-half halves ``x[:, :D/2]`` and ``x[:, D/2:]``, each padded to a power of two
  ``BLOCK_HALF``. Rotate-half pairs channel ``c`` with ``c + D/2``, so holding the halves in separate registers makes
  the rotation elementwise, lets cos/sin be computed once per frequency (not per channel), and pads head dim 72 to
  2 x 64 without copying anything. ``q k^T`` is then two dots, ``q1 k1^T + q2 k2^T``.
* The rotation is applied in registers as tiles are loaded (never stored); the backward recomputes it and rotates
  the gradients back with the transpose (``dx = R^T dx_rot``).
* Softmax runs in base 2: ``log2(e)`` is folded into ``QK_SCALE``, and the saved LSE is ``m + log2(l)`` in that base.
* Mask inside one sample (local indices): query ``i`` sees key ``j`` iff ``j < prefix or j <= i``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..mrope.kernels import _rope_cos_sin


@triton.jit
def _load_halves(X, tok, tok_mask, stride_t, stride_d, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Both rotate-half halves of rows ``tok`` of one head of X, ``(BLOCK, BLOCK_HALF)`` each, zero padded."""
    d = tl.arange(0, BLOCK_HALF)
    mask = tok_mask[:, None] & (d[None, :] < HALF)
    ptr = X + tok[:, None] * stride_t + d[None, :] * stride_d
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF * stride_d, mask=mask, other=0.0)
    return x1, x2


@triton.jit
def _sample_span(CuSeqlens, PrefixLens, sample):
    """``(first token, length, image tokens)`` of one sample; a prefix longer than the sample means all of it."""
    bos = tl.load(CuSeqlens + sample)
    seqlen = tl.load(CuSeqlens + sample + 1) - bos
    return bos, seqlen, tl.minimum(tl.load(PrefixLens + sample), seqlen)


@triton.jit
def _load_rows(X, tok, tok_mask, stride_t, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``tok`` of one head of X, ``(BLOCK, BLOCK_D)``, zero past ``HEAD_DIM`` and on masked rows."""
    d = tl.arange(0, BLOCK_D)
    return tl.load(X + tok[:, None] * stride_t + d[None, :] * stride_d,
                   mask=tok_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rotated(X, tok, tok_mask, stride_t, stride_d, Pos, stride_pa, stride_pt, InvFreq, Axis,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROPE: tl.constexpr):
    """Both halves of rows ``tok``, rotated by MRoPE when ``ROPE`` (computed here, never stored)."""
    x1, x2 = _load_halves(X, tok, tok_mask, stride_t, stride_d, HALF, BLOCK_HALF)
    if ROPE:
        cos, sin = _rope_cos_sin(Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis, HALF, BLOCK_HALF)
        x1, x2 = _rotate(x1, x2, cos, sin)
    return x1, x2


@triton.jit
def _store_halves(X, tok, tok_mask, stride_t, stride_d, x1, x2, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    d = tl.arange(0, BLOCK_HALF)
    mask = tok_mask[:, None] & (d[None, :] < HALF)
    ptr = X + tok[:, None] * stride_t + d[None, :] * stride_d
    tl.store(ptr, x1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF * stride_d, x2.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x1, x2, cos, sin):
    """``x * cos + rotate_half(x) * sin`` on the halves, in fp32, returned in x's dtype (as the reference rounds)."""
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    return (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)


@triton.jit
def _unrotate(d1, d2, cos, sin):
    """``R^T`` applied to fp32 gradients of the rotated halves: the gradient w.r.t. the unrotated input."""
    return d1 * cos + d2 * sin, d2 * cos - d1 * sin


@triton.jit
def _zero_rows(X, stride_t, stride_d, start, total, pid, num_pid,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zero rows ``[start, total)`` of one head of X; the programs of grid axis 0 share them round-robin."""
    offs_m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=X.dtype.element_ty)
    for m0 in range(start + pid * BLOCK_M, total, num_pid * BLOCK_M):
        tok = (m0 + offs_m).to(tl.int64)
        mask = (tok < total)[:, None] & (d[None, :] < HEAD_DIM)
        tl.store(X + tok[:, None] * stride_t + d[None, :] * stride_d, zero, mask=mask)


# ----------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q1, q2, K, V, Pos, InvFreq, Axis,
               stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
               bos, seqlen, prefix, offs_m, lo, hi, QK_SCALE,
               HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key blocks ``[lo, hi)`` (local). ``MASK=False`` only for tiles that are fully visible
    and inside the sample, so the common case pays no mask arithmetic."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n_idx = n0 + offs_n
        n_ok = n_idx < seqlen
        tok = (bos + n_idx).to(tl.int64)
        k1, k2 = _load_rotated(K, tok, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt,
                               InvFreq, Axis, HALF, BLOCK_HALF, ROPE)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        s = s * QK_SCALE
        if MASK:
            ok = ((n_idx[None, :] < prefix) | (n_idx[None, :] <= offs_m[:, None])) & n_ok[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, tok, n_ok, stride_vt, stride_vd, HEAD_DIM, BLOCK_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefix_lm_attn_fwd_kernel(
    Q, K, V, G, Out, OutU, Lse, CuSeqlens, PrefixLens, Pos, InvFreq, Axis,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_gt, stride_gh, stride_gd,
    stride_ot, stride_oh, stride_od,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, QK_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATE_MODE: tl.constexpr,  # 0 none, 1 elementwise (T, H, D), 2 headwise (T, H)
    ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (query block, sample, head) tile: ``Out = sigmoid(G) * softmax(mask(rope(q) rope(k)^T)) v``.

    Also writes ``Lse`` ``(H, T)`` fp32 (base-2 log-sum-exp) and, when gated, ``OutU`` = the ungated output, which is
    what the backward needs (recovering it as Out / sigmoid(G) would lose precision where the gate is near 0).
    """
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(BLOCK_HALF >= HEAD_DIM // 2 and BLOCK_HALF >= 16, "BLOCK_HALF pads D/2 to a dot-able size")
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    sample = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    Out += head * stride_oh
    OutU += head * stride_oh
    if sample == num_samples:
        # The extra program column owns the padding rows past the last sample.
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(Out, stride_ot, stride_od, pad_start, total_tokens, pid_m, tl.num_programs(0),
                   HEAD_DIM, BLOCK_D, BLOCK_M)
        if GATE_MODE != 0:
            _zero_rows(OutU, stride_ot, stride_od, pad_start, total_tokens, pid_m, tl.num_programs(0),
                       HEAD_DIM, BLOCK_D, BLOCK_M)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:  # grid is sized for the longest sample
        return
    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen
    tok_m = (bos + offs_m).to(tl.int64)
    q1, q2 = _load_rotated(Q, tok_m, m_ok, stride_qt, stride_qd, Pos, stride_pa, stride_pt,
                           InvFreq, Axis, HALF, BLOCK_HALF, ROPE)

    # A finite floor instead of -inf: a row whose first tile is fully masked then gives exp2(-inf - floor) = 0
    # rather than exp2(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys [0, full_end) are visible to every row of this block (j < prefix, or j <= first row) and inside the
    # sample: no mask. Keys [full_end, kv_end) need it. Keys past max(prefix, last row) are never visible: skipped.
    full_end = (tl.minimum(seqlen, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seqlen, tl.maximum(prefix, m0 + BLOCK_M))
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, K, V, Pos, InvFreq, Axis,
                               stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                               bos, seqlen, prefix, offs_m, 0, full_end, QK_SCALE,
                               HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, ROPE, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q1, q2, K, V, Pos, InvFreq, Axis,
                               stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                               bos, seqlen, prefix, offs_m, full_end, kv_end, QK_SCALE,
                               HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, ROPE, True, DOT_PREC)
    # Every real row sees key 0, so l_i >= 1 there; rows past the sample are never stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(Lse + head * stride_lh + bos + offs_m, m_i + tl.log2(l_safe), mask=m_ok)

    d = tl.arange(0, BLOCK_D)
    o_mask = m_ok[:, None] & (d[None, :] < HEAD_DIM)
    o_off = tok_m[:, None] * stride_ot + d[None, :] * stride_od
    if GATE_MODE == 1:
        g = tl.load(G + head * stride_gh + tok_m[:, None] * stride_gt + d[None, :] * stride_gd,
                    mask=o_mask, other=0.0).to(tl.float32)
        tl.store(OutU + o_off, o.to(OutU.dtype.element_ty), mask=o_mask)
        o = o * tl.sigmoid(g)
    elif GATE_MODE == 2:
        g = tl.load(G + head * stride_gh + tok_m * stride_gt, mask=m_ok, other=0.0).to(tl.float32)
        tl.store(OutU + o_off, o.to(OutU.dtype.element_ty), mask=o_mask)
        o = o * tl.sigmoid(g)[:, None]
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------------- backward


@triton.jit
def _prefix_lm_attn_bwd_preprocess_kernel(
    DO, OutU, G, DOU, Delta, DG,
    stride_dot, stride_doh, stride_dod,
    stride_ot, stride_oh, stride_od,
    stride_gt, stride_gh, stride_gd,
    stride_dgt, stride_dgh, stride_dgd,
    stride_ut, stride_uh, stride_ud,
    stride_lh, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GATE_MODE: tl.constexpr,
):
    """Per token block and head: ``dO_u = dO * sigmoid(g)`` (the gradient of the ungated output), the softmax
    correction ``Delta = rowsum(dO_u * O_u)`` (fp32, ``(H, T)``), and the gate gradient
    ``dG = dO * O_u * s (1 - s)`` (summed over D when headwise). Padding rows have ``O_u = 0``, so they get 0."""
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < total_tokens
    tok = offs.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (d[None, :] < HEAD_DIM)
    do = tl.load(DO + head * stride_doh + tok[:, None] * stride_dot + d[None, :] * stride_dod, mask=mask, other=0.0)
    o = tl.load(OutU + head * stride_oh + tok[:, None] * stride_ot + d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    if GATE_MODE == 0:
        dou = do
    else:
        if GATE_MODE == 1:
            g = tl.load(G + head * stride_gh + tok[:, None] * stride_gt + d[None, :] * stride_gd,
                        mask=mask, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dg = do.to(tl.float32) * o * sg * (1.0 - sg)
            tl.store(DG + head * stride_dgh + tok[:, None] * stride_dgt + d[None, :] * stride_dgd,
                     dg.to(DG.dtype.element_ty), mask=mask)
            # Rounded to dO's dtype: the attention backward's dots take it as a low-precision operand.
            dou = (do.to(tl.float32) * sg).to(DOU.dtype.element_ty)
        else:
            g = tl.load(G + head * stride_gh + tok * stride_gt, mask=ok, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dg = tl.sum(do.to(tl.float32) * o, 1) * sg * (1.0 - sg)
            tl.store(DG + head * stride_dgh + tok * stride_dgt, dg.to(DG.dtype.element_ty), mask=ok)
            dou = (do.to(tl.float32) * sg[:, None]).to(DOU.dtype.element_ty)
        tl.store(DOU + head * stride_uh + tok[:, None] * stride_ut + d[None, :] * stride_ud, dou, mask=mask)
    delta = tl.sum(dou.to(tl.float32) * o, 1)
    tl.store(Delta + head * stride_lh + tok, delta, mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Q, DOU, Lse, Delta, Pos, InvFreq, Axis,
                    stride_qt, stride_qd, stride_ut, stride_ud, stride_pa, stride_pt,
                    bos, seqlen, prefix, offs_n, lo, hi, QK_SCALE,
                    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK (rotated frame) and dV of one key block over query blocks ``[lo, hi)``, working on the
    transposed tile ``S^T = k q^T`` so the accumulators stay row-major in keys."""
    HALF: tl.constexpr = HEAD_DIM // 2
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen
        tok = (bos + offs_m).to(tl.int64)
        q1, q2 = _load_rotated(Q, tok, m_ok, stride_qt, stride_qd, Pos, stride_pa, stride_pt,
                               InvFreq, Axis, HALF, BLOCK_HALF, ROPE)
        do = _load_rows(DOU, tok, m_ok, stride_ut, stride_ud, HEAD_DIM, BLOCK_D)
        lse = tl.load(Lse + tok, mask=m_ok, other=0.0)
        delta = tl.load(Delta + tok, mask=m_ok, other=0.0)
        st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PREC)
        pt = tl.exp2(st * QK_SCALE - lse[None, :])
        if MASK:
            ok = ((offs_n[:, None] < prefix) | (offs_n[:, None] <= offs_m[None, :])) & m_ok[None, :]
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PREC)
        dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PREC)
    return dk1, dk2, dv


@triton.jit
def _prefix_lm_attn_bwd_dkdv_kernel(
    Q, K, V, DOU, Lse, Delta, DK, DV, CuSeqlens, PrefixLens, Pos, InvFreq, Axis,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (key block, sample, head): dK and dV by iterating the query blocks of the same sample that see it.
    Each program owns its rows of dK/dV outright, so the result is deterministic (no atomics)."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(BLOCK_HALF >= HEAD_DIM // 2 and BLOCK_HALF >= 16, "BLOCK_HALF pads D/2 to a dot-able size")
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    sample = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    DK += head * stride_dkh
    DV += head * stride_dvh
    if sample == num_samples:
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(DK, stride_dkt, stride_dkd, pad_start, total_tokens, pid_n, tl.num_programs(0),
                   HEAD_DIM, BLOCK_D, BLOCK_N)
        _zero_rows(DV, stride_dvt, stride_dvd, pad_start, total_tokens, pid_n, tl.num_programs(0),
                   HEAD_DIM, BLOCK_D, BLOCK_N)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    DOU += head * stride_uh
    Lse += head * stride_lh
    Delta += head * stride_lh

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seqlen
    tok_n = (bos + offs_n).to(tl.int64)
    k1, k2 = _load_rotated(K, tok_n, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt,
                           InvFreq, Axis, HALF, BLOCK_HALF, ROPE)
    d = tl.arange(0, BLOCK_D)
    nd_mask = n_ok[:, None] & (d[None, :] < HEAD_DIM)
    v = _load_rows(V, tok_n, n_ok, stride_vt, stride_vd, HEAD_DIM, BLOCK_D)
    dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    n1 = n0 + BLOCK_N
    # Which query rows see this key block: all of them if it starts inside the prefix, else rows >= n0.
    q_lo = tl.where(n0 < prefix, 0, (n0 // BLOCK_M) * BLOCK_M)
    # Query blocks starting before row n1 - 1 may miss some of these keys (unless the whole block is prefix):
    # masked. After them every row sees every key: unmasked, except a last block running past the sample end.
    diag_hi = tl.where(n1 <= prefix, q_lo, tl.cdiv(n1 - 1, BLOCK_M) * BLOCK_M)
    m_ceil = tl.cdiv(seqlen, BLOCK_M) * BLOCK_M
    diag_hi = tl.minimum(diag_hi, m_ceil)
    full_hi = tl.maximum(diag_hi, (seqlen // BLOCK_M) * BLOCK_M)
    dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Q, DOU, Lse, Delta, Pos, InvFreq, Axis,
                                   stride_qt, stride_qd, stride_ut, stride_ud, stride_pa, stride_pt,
                                   bos, seqlen, prefix, offs_n, q_lo, diag_hi, QK_SCALE,
                                   HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_M, ROPE, True, DOT_PREC)
    dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Q, DOU, Lse, Delta, Pos, InvFreq, Axis,
                                   stride_qt, stride_qd, stride_ut, stride_ud, stride_pa, stride_pt,
                                   bos, seqlen, prefix, offs_n, diag_hi, full_hi, QK_SCALE,
                                   HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_M, ROPE, False, DOT_PREC)
    dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, Q, DOU, Lse, Delta, Pos, InvFreq, Axis,
                                   stride_qt, stride_qd, stride_ut, stride_ud, stride_pa, stride_pt,
                                   bos, seqlen, prefix, offs_n, full_hi, m_ceil, QK_SCALE,
                                   HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_M, ROPE, True, DOT_PREC)
    dk1 = dk1 * SM_SCALE
    dk2 = dk2 * SM_SCALE
    if ROPE:
        # cos/sin recomputed rather than kept live through the loop: registers are the scarce resource there.
        cos, sin = _rope_cos_sin(Pos, stride_pa, stride_pt, tok_n, n_ok, InvFreq, Axis, HALF, BLOCK_HALF)
        dk1, dk2 = _unrotate(dk1, dk2, cos, sin)
    _store_halves(DK, tok_n, n_ok, stride_dkt, stride_dkd, dk1, dk2, HALF, BLOCK_HALF)
    tl.store(DV + tok_n[:, None] * stride_dvt + d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, K, V, Pos, InvFreq, Axis,
                  stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                  bos, seqlen, prefix, offs_m, lo, hi, QK_SCALE,
                  HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n_idx = n0 + offs_n
        n_ok = n_idx < seqlen
        tok = (bos + n_idx).to(tl.int64)
        k1, k2 = _load_rotated(K, tok, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt,
                               InvFreq, Axis, HALF, BLOCK_HALF, ROPE)
        v = _load_rows(V, tok, n_ok, stride_vt, stride_vd, HEAD_DIM, BLOCK_D)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PREC)
        p = tl.exp2(s * QK_SCALE - lse[:, None])
        if MASK:
            ok = ((n_idx[None, :] < prefix) | (n_idx[None, :] <= offs_m[:, None])) & n_ok[None, :]
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PREC)
    return dq1, dq2


@triton.jit
def _prefix_lm_attn_bwd_dq_kernel(
    Q, K, V, DOU, Lse, Delta, DQ, CuSeqlens, PrefixLens, Pos, InvFreq, Axis,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud,
    stride_dqt, stride_dqh, stride_dqd,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (query block, sample, head): dQ by iterating the visible key blocks, with the same two-stage
    (unmasked, then masked) split as the forward."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(BLOCK_HALF >= HEAD_DIM // 2 and BLOCK_HALF >= 16, "BLOCK_HALF pads D/2 to a dot-able size")
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    sample = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    DQ += head * stride_dqh
    if sample == num_samples:
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(DQ, stride_dqt, stride_dqd, pad_start, total_tokens, pid_m, tl.num_programs(0),
                   HEAD_DIM, BLOCK_D, BLOCK_M)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    Q += head * stride_qh
    K += head * stride_kh
    V += head * stride_vh
    DOU += head * stride_uh
    Lse += head * stride_lh
    Delta += head * stride_lh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen
    tok_m = (bos + offs_m).to(tl.int64)
    q1, q2 = _load_rotated(Q, tok_m, m_ok, stride_qt, stride_qd, Pos, stride_pa, stride_pt,
                           InvFreq, Axis, HALF, BLOCK_HALF, ROPE)
    do = _load_rows(DOU, tok_m, m_ok, stride_ut, stride_ud, HEAD_DIM, BLOCK_D)
    lse = tl.load(Lse + tok_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + tok_m, mask=m_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], dtype=tl.float32)
    full_end = (tl.minimum(seqlen, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seqlen, tl.maximum(prefix, m0 + BLOCK_M))
    dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, K, V, Pos, InvFreq, Axis,
                             stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                             bos, seqlen, prefix, offs_m, 0, full_end, QK_SCALE,
                             HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, ROPE, False, DOT_PREC)
    dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse, delta, K, V, Pos, InvFreq, Axis,
                             stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                             bos, seqlen, prefix, offs_m, full_end, kv_end, QK_SCALE,
                             HEAD_DIM, BLOCK_HALF, BLOCK_D, BLOCK_N, ROPE, True, DOT_PREC)
    dq1 = dq1 * SM_SCALE
    dq2 = dq2 * SM_SCALE
    if ROPE:
        cos, sin = _rope_cos_sin(Pos, stride_pa, stride_pt, tok_m, m_ok, InvFreq, Axis, HALF, BLOCK_HALF)
        dq1, dq2 = _unrotate(dq1, dq2, cos, sin)
    _store_halves(DQ, tok_m, m_ok, stride_dqt, stride_dqd, dq1, dq2, HALF, BLOCK_HALF)

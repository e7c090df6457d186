"""Triton backward kernels of the packed prefix-LM attention; layouts and helpers as in ``kernels.py``.

Two algorithms: the default two-kernel backward (dK/dV over key blocks, then dQ over query blocks; each program
owns the rows it writes, so results are bitwise reproducible), and the one-pass backward (variant ``onepass``,
FlashAttention-2 style: the key-block kernel also adds each block's dQ contribution to an fp32 buffer with
atomics, so the sum's order, and its last bits, vary run to run).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import (
    _RUNTIME_INTS,
    _kv_head,
    _load_qk,
    _load_v,
    _rows,
    _sample_span,
    _scores,
    _tile_coords,
    _visible,
    _visible_t,
    _write_qk,
    _write_v,
    _zero_rows,
)


@triton.jit
def _rows_ptr(X, head, tok, d, stride_t, stride_h, stride_d, ALIGN: tl.constexpr):
    """Pointers to columns ``d`` of rows ``tok`` of head ``head`` of a ``(T, H, D)`` tensor."""
    rows = tl.multiple_of(tok[:, None] * stride_t, [ALIGN, 1])
    return X + tl.multiple_of(head * stride_h, ALIGN) + rows + d[None, :] * stride_d


@triton.jit(do_not_specialize=["total_tokens"])
def _prefix_lm_attn_bwd_preprocess_kernel(
    DO, OutU, G, DOU, Delta, DG,
    stride_dot, stride_doh, stride_dod,
    stride_ot, stride_oh, stride_od,
    stride_gt, stride_gh, stride_gd,
    stride_dgt, stride_dgh, stride_dgd,
    stride_ut, stride_uh, stride_ud,
    stride_lh, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, GATE_MODE: tl.constexpr,
    ALIGN: tl.constexpr,
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
    do = tl.load(_rows_ptr(DO, head, tok, d, stride_dot, stride_doh, stride_dod, ALIGN), mask=mask, other=0.0)
    o = tl.load(_rows_ptr(OutU, head, tok, d, stride_ot, stride_oh, stride_od, ALIGN), mask=mask,
                other=0.0).to(tl.float32)
    if GATE_MODE == 0:
        dou = do
    else:
        if GATE_MODE == 1:
            g = tl.load(_rows_ptr(G, head, tok, d, stride_gt, stride_gh, stride_gd, ALIGN), mask=mask,
                        other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dg = do.to(tl.float32) * o * sg * (1.0 - sg)
            tl.store(_rows_ptr(DG, head, tok, d, stride_dgt, stride_dgh, stride_dgd, ALIGN),
                     dg.to(DG.dtype.element_ty), mask=mask)
            # Rounded to dO's dtype: the attention backward's dots take it as a low-precision operand.
            dou = (do.to(tl.float32) * sg).to(DOU.dtype.element_ty)
        else:
            g = tl.load(G + head * stride_gh + tok * stride_gt, mask=ok, other=0.0).to(tl.float32)
            sg = tl.sigmoid(g)
            dg = tl.sum(do.to(tl.float32) * o, 1) * sg * (1.0 - sg)
            tl.store(DG + head * stride_dgh + tok * stride_dgt, dg.to(DG.dtype.element_ty), mask=ok)
            dou = (do.to(tl.float32) * sg[:, None]).to(DOU.dtype.element_ty)
        tl.store(_rows_ptr(DOU, head, tok, d, stride_ut, stride_uh, stride_ud, ALIGN), dou, mask=mask)
    delta = tl.sum(dou.to(tl.float32) * o, 1)
    tl.store(Delta + head * stride_lh + tok, delta, mask=ok)


# ------------------------------------------------------------------------------------ key blocks: dK, dV (, dQ)


@triton.jit
def _query_heads(Q, DOU, DQ, Lse, Delta, head, stride_qh, stride_uh, stride_dqh, stride_lh, ALIGN: tl.constexpr):
    """The query-side pointers moved to query head ``head``."""
    return (Q + tl.multiple_of(head * stride_qh, ALIGN), DOU + tl.multiple_of(head * stride_uh, ALIGN),
            DQ + tl.multiple_of(head * stride_dqh, ALIGN), Lse + head * stride_lh, Delta + head * stride_lh)


@triton.jit
def _load_q_rows(Q, DOU, Lse, Delta, m0, bos, seqlen, stride_qt, stride_qd, stride_ut, stride_ud, Pos, stride_pa,
                 stride_pt, InvFreq, Axis, HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr,
                 V_A: tl.constexpr, V_B: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr,
                 ROPE: tl.constexpr, ALIGN: tl.constexpr):
    """What both backward passes read of query block ``m0`` of one head: ``(offs_m, m_ok, tok, qa, qb, doa, dob,
    lse, delta)``."""
    offs_m, m_ok, tok = _rows(m0, bos, seqlen, BLOCK_M)
    qa, qb = _load_qk(Q, tok, m_ok, stride_qt, stride_qd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                      HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, ALIGN)
    doa, dob = _load_v(DOU, tok, m_ok, stride_ut, stride_ud, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
    lse = tl.load(Lse + tok, mask=m_ok, other=0.0)
    delta = tl.load(Delta + tok, mask=m_ok, other=0.0)
    return offs_m, m_ok, tok, qa, qb, doa, dob, lse, delta


@triton.jit
def _bwd_kv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos, InvFreq, Axis,
                 stride_qt, stride_qd, stride_ut, stride_ud, stride_dqt, stride_dqd, stride_pa, stride_pt,
                 bos, seqlen, prefix, offs_n, first_row, m0, QK_SCALE, SM_SCALE,
                 HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr,
                 V_B: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
                 DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, ALIGN: tl.constexpr,
                 ONEPASS: tl.constexpr):
    """One query block ``m0`` of one query head (Q, DOU, DQ, Lse, Delta point at it) against this key block."""
    offs_m, m_ok, tok, qa, qb, doa, dob, lse, delta = _load_q_rows(
        Q, DOU, Lse, Delta, m0, bos, seqlen, stride_qt, stride_qd, stride_ut, stride_ud, Pos, stride_pa, stride_pt,
        InvFreq, Axis, HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_M, SPLIT, ROPE, ALIGN)
    st = tl.dot(ka, tl.trans(qa), input_precision=DOT_PREC)
    st = tl.dot(kb, tl.trans(qb), st, input_precision=DOT_PREC)
    pt = tl.exp2(st * QK_SCALE - lse[None, :])
    if MASK:
        pt = tl.where(_visible_t(offs_n, offs_m, prefix, seqlen, first_row, ROW_BOUND), pt, 0.0)
    ptc = pt.to(doa.dtype)
    dva = tl.dot(ptc, doa, dva, input_precision=DOT_PREC)
    dpt = tl.dot(va, tl.trans(doa), input_precision=DOT_PREC)
    if SPLIT:
        dvb = tl.dot(ptc, dob, dvb, input_precision=DOT_PREC)
        dpt = tl.dot(vb, tl.trans(dob), dpt, input_precision=DOT_PREC)
    dst = (pt * (dpt - delta[None, :])).to(qa.dtype)
    dka = tl.dot(dst, qa, dka, input_precision=DOT_PREC)
    dkb = tl.dot(dst, qb, dkb, input_precision=DOT_PREC)
    if ONEPASS:
        ds = tl.trans(dst)
        dqa = tl.dot(ds, ka, input_precision=DOT_PREC) * SM_SCALE
        dqb = tl.dot(ds, kb, input_precision=DOT_PREC) * SM_SCALE
        _write_qk(DQ, tok, m_ok, stride_dqt, stride_dqd, dqa, dqb, Pos, stride_pa, stride_pt, InvFreq, Axis,
                  HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, True, ALIGN)
    return dka, dkb, dva, dvb


@triton.jit
def _bwd_kv_inner(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos, InvFreq, Axis,
                  stride_qt, stride_qh, stride_qd, stride_ut, stride_uh, stride_ud, stride_dqt, stride_dqh,
                  stride_dqd, stride_lh, stride_pa, stride_pt,
                  bos, seqlen, prefix, offs_n, first_row, lo, hi, QK_SCALE, SM_SCALE,
                  HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr,
                  V_B: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
                  DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, ALIGN: tl.constexpr,
                  ONEPASS: tl.constexpr, GROUP: tl.constexpr):
    """Accumulate dK (rotated frame) and dV of one key block over query blocks ``[lo, hi)`` (multiples of
    BLOCK_M) of each of the ``GROUP`` query heads from the one Q, DOU, DQ, Lse and Delta point at, working on the
    transposed tile ``S^T = k q^T`` so the accumulators stay row-major in keys. ``ONEPASS``: also add this key
    block's share of dQ, ``dS k * scale``, to the fp32 buffer DQ (atomics; rotated frame).

    Grouped-query attention runs the (head, query block) pairs as one flat loop, head by head (a fixed order: the
    same sum every run): one loop like multi-head attention's, which the compiler pipelines the same way (a loop
    over heads around the block loop spills registers on sm_90 at head dim 128)."""
    if GROUP == 1:
        for m0 in range(lo, hi, BLOCK_M):
            dka, dkb, dva, dvb = _bwd_kv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos,
                                              InvFreq, Axis, stride_qt, stride_qd, stride_ut, stride_ud, stride_dqt,
                                              stride_dqd, stride_pa, stride_pt, bos, seqlen, prefix, offs_n,
                                              first_row, m0, QK_SCALE, SM_SCALE, HEAD_DIM, QK_A, QK_B, V_A, V_B,
                                              BLOCK_M, ROPE, MASK, DOT_PREC, SPLIT, ROW_BOUND, ALIGN, ONEPASS)
    else:
        blocks = (hi - lo) // BLOCK_M
        for it in range(0, GROUP * blocks):
            g = it // blocks
            m0 = lo + (it - g * blocks) * BLOCK_M
            Qg, DOUg, DQg, Lseg, Deltag = _query_heads(Q, DOU, DQ, Lse, Delta, g.to(tl.int64), stride_qh,
                                                       stride_uh, stride_dqh, stride_lh, ALIGN)
            dka, dkb, dva, dvb = _bwd_kv_tile(dka, dkb, dva, dvb, ka, kb, va, vb, Qg, DOUg, DQg, Lseg, Deltag, Pos,
                                              InvFreq, Axis, stride_qt, stride_qd, stride_ut, stride_ud, stride_dqt,
                                              stride_dqd, stride_pa, stride_pt, bos, seqlen, prefix, offs_n,
                                              first_row, m0, QK_SCALE, SM_SCALE, HEAD_DIM, QK_A, QK_B, V_A, V_B,
                                              BLOCK_M, ROPE, MASK, DOT_PREC, SPLIT, ROW_BOUND, ALIGN, ONEPASS)
    return dka, dkb, dva, dvb


@triton.jit
def _bwd_kv_block(
    Q, K, V, DOU, Lse, Delta, DK, DV, DQ, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
    stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr, ONEPASS: tl.constexpr,
):
    """The body of both key-block kernels: one (key block, sample, key/value head) program, which sums dK and dV
    over the ``GROUP`` query heads that read this key/value head (grouped-query attention), one after another."""
    tl.static_assert(not (ONEPASS and ROPE), "the one-pass backward runs on pre-rotated q and k (variant rope_once)")
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(QK_A >= 16 and QK_B >= 16 and QK_A + QK_B >= HEAD_DIM, "q/k blocks cover the head")
    sample, blk, num_pad = _tile_coords(Tiles, tile_cap, TILE_LIST, TILE_ROW)
    kv_head = tl.program_id(2).to(tl.int64)
    DK += tl.multiple_of(kv_head * stride_dkh, ALIGN)
    DV += tl.multiple_of(kv_head * stride_dvh, ALIGN)
    if sample == num_samples:
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(DK, stride_dkt, stride_dkd, pad_start, total_tokens, blk, num_pad,
                   HEAD_DIM, V_A, V_B, SPLIT, BLOCK_N, ALIGN)
        _zero_rows(DV, stride_dvt, stride_dvd, pad_start, total_tokens, blk, num_pad,
                   HEAD_DIM, V_A, V_B, SPLIT, BLOCK_N, ALIGN)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    n0 = blk * BLOCK_N
    if n0 >= seqlen:
        return
    # Where the query-side pointers move to the group's first query head changes register allocation (sm_90 ptxas
    # -v): before the key block is loaded, MHA's configs are spill-free (after it, hd80's 32x128 w8 s2 at D 72
    # spills 8/16 B); after it, GQA's are (before it, 32x64 w8 s3 at D 128 spills 8/16 B).
    head0 = kv_head * GROUP
    if GROUP == 1:
        Q, DOU, DQ, Lse, Delta = _query_heads(Q, DOU, DQ, Lse, Delta, head0, stride_qh, stride_uh, stride_dqh,
                                              stride_lh, ALIGN)
    K += tl.multiple_of(kv_head * stride_kh, ALIGN)
    V += tl.multiple_of(kv_head * stride_vh, ALIGN)

    offs_n, n_ok, tok_n = _rows(n0, bos, seqlen, BLOCK_N)
    ka, kb = _load_qk(K, tok_n, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                      HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, ALIGN)
    va, vb = _load_v(V, tok_n, n_ok, stride_vt, stride_vd, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
    dka = tl.zeros([BLOCK_N, QK_A], dtype=tl.float32)
    dkb = tl.zeros([BLOCK_N, QK_B], dtype=tl.float32)
    dva = tl.zeros([BLOCK_N, V_A], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_N, V_B], dtype=tl.float32)

    n1 = n0 + BLOCK_N
    # Which query rows see this key block: all of them if it starts inside the prefix, else rows >= n0.
    first_row = tl.where(offs_n < prefix, 0, offs_n)  # per key: the first query row that sees it
    q_lo = tl.where(n0 < prefix, 0, (n0 // BLOCK_M) * BLOCK_M)
    # Query blocks starting before row n1 - 1 may miss some of these keys (unless the whole block is prefix):
    # masked. After them every row sees every key: unmasked, except a last block running past the sample end.
    diag_hi = tl.where(n1 <= prefix, q_lo, tl.cdiv(n1 - 1, BLOCK_M) * BLOCK_M)
    m_ceil = tl.cdiv(seqlen, BLOCK_M) * BLOCK_M
    diag_hi = tl.minimum(diag_hi, m_ceil)
    full_hi = tl.maximum(diag_hi, (seqlen // BLOCK_M) * BLOCK_M)
    if GROUP != 1:
        Q, DOU, DQ, Lse, Delta = _query_heads(Q, DOU, DQ, Lse, Delta, head0, stride_qh, stride_uh, stride_dqh,
                                              stride_lh, ALIGN)
    dka, dkb, dva, dvb = _bwd_kv_inner(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos, InvFreq,
                                       Axis, stride_qt, stride_qh, stride_qd, stride_ut, stride_uh, stride_ud,
                                       stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_pa, stride_pt, bos,
                                       seqlen, prefix, offs_n, first_row, q_lo, diag_hi, QK_SCALE, SM_SCALE, HEAD_DIM,
                                       QK_A, QK_B, V_A, V_B, BLOCK_M, ROPE, True, DOT_PREC, SPLIT, ROW_BOUND, ALIGN,
                                       ONEPASS, GROUP)
    dka, dkb, dva, dvb = _bwd_kv_inner(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos, InvFreq,
                                       Axis, stride_qt, stride_qh, stride_qd, stride_ut, stride_uh, stride_ud,
                                       stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_pa, stride_pt, bos,
                                       seqlen, prefix, offs_n, first_row, diag_hi, full_hi, QK_SCALE, SM_SCALE, HEAD_DIM,
                                       QK_A, QK_B, V_A, V_B, BLOCK_M, ROPE, False, DOT_PREC, SPLIT, ROW_BOUND, ALIGN,
                                       ONEPASS, GROUP)
    dka, dkb, dva, dvb = _bwd_kv_inner(dka, dkb, dva, dvb, ka, kb, va, vb, Q, DOU, DQ, Lse, Delta, Pos, InvFreq,
                                       Axis, stride_qt, stride_qh, stride_qd, stride_ut, stride_uh, stride_ud,
                                       stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_pa, stride_pt, bos,
                                       seqlen, prefix, offs_n, first_row, full_hi, m_ceil, QK_SCALE, SM_SCALE, HEAD_DIM,
                                       QK_A, QK_B, V_A, V_B, BLOCK_M, ROPE, True, DOT_PREC, SPLIT, ROW_BOUND, ALIGN,
                                       ONEPASS, GROUP)
    _write_qk(DK, tok_n, n_ok, stride_dkt, stride_dkd, dka * SM_SCALE, dkb * SM_SCALE, Pos, stride_pa, stride_pt,
              InvFreq, Axis, HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, False, ALIGN)
    _write_v(DV, tok_n, n_ok, stride_dvt, stride_dvd, dva, dvb, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _prefix_lm_attn_bwd_dkdv_kernel(
    Q, K, V, DOU, Lse, Delta, DK, DV, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """One (key block, sample, key/value head): dK and dV by iterating the query blocks of the same sample that see
    it, for each query head of the group. Each program owns its rows of dK/dV outright, so the result is
    deterministic (no atomics)."""
    _bwd_kv_block(Q, K, V, DOU, Lse, Delta, DK, DV, DK, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
                  stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                  stride_ut, stride_uh, stride_ud, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh,
                  stride_dvd, 0, 0, 0, stride_lh, stride_pa, stride_pt,
                  total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
                  HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_M, BLOCK_N, ROPE, DOT_PREC,
                  SPLIT, ROW_BOUND, TILE_LIST, TILE_ROW, ALIGN, GROUP, False)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _prefix_lm_attn_bwd_onepass_kernel(
    Q, K, V, DOU, Lse, Delta, DK, DV, DQ, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud,
    stride_dkt, stride_dkh, stride_dkd,
    stride_dvt, stride_dvh, stride_dvd,
    stride_dqt, stride_dqh, stride_dqd,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """One-pass backward (variant ``onepass``): the dK/dV program of one key block also adds its dQ share to the
    zero-initialised fp32 ``DQ`` ``(T, H, D)`` with atomics — 5 dots per tile pair instead of the two-kernel
    backward's 7, at the price of run-to-run bit differences in dQ. DQ stays in the rotated frame; the launcher
    un-rotates (and casts) it once. Runs on pre-rotated q and k: with rotation in the tile it spills registers in every
    config tried for sm_90."""
    _bwd_kv_block(Q, K, V, DOU, Lse, Delta, DK, DV, DQ, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
                  stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                  stride_ut, stride_uh, stride_ud, stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh,
                  stride_dvd, stride_dqt, stride_dqh, stride_dqd, stride_lh, stride_pa, stride_pt,
                  total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
                  HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_M, BLOCK_N, ROPE, DOT_PREC,
                  SPLIT, ROW_BOUND, TILE_LIST, TILE_ROW, ALIGN, GROUP, True)


# -------------------------------------------------------------------------------------------- query blocks: dQ


@triton.jit
def _bwd_dq_inner(dqa, dqb, qa, qb, doa, dob, lse, delta, K, V, Pos, InvFreq, Axis,
                  stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                  bos, seqlen, prefix, offs_m, row_end, lo, hi, QK_SCALE,
                  HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr,
                  V_B: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
                  DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, ALIGN: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        n_idx, n_ok, tok = _rows(n0, bos, seqlen, BLOCK_N)
        s, ka, kb = _scores(qa, qb, K, tok, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                            HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, DOT_PREC, ALIGN)
        va, vb = _load_v(V, tok, n_ok, stride_vt, stride_vd, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
        p = tl.exp2(s * QK_SCALE - lse[:, None])
        if MASK:
            p = tl.where(_visible(offs_m, n_idx, prefix, seqlen, row_end, ROW_BOUND), p, 0.0)
        dp = tl.dot(doa, tl.trans(va), input_precision=DOT_PREC)
        if SPLIT:
            dp = tl.dot(dob, tl.trans(vb), dp, input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(ka.dtype)
        dqa = tl.dot(ds, ka, dqa, input_precision=DOT_PREC)
        dqb = tl.dot(ds, kb, dqb, input_precision=DOT_PREC)
    return dqa, dqb


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _prefix_lm_attn_bwd_dq_kernel(
    Q, K, V, DOU, Lse, Delta, DQ, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ut, stride_uh, stride_ud,
    stride_dqt, stride_dqh, stride_dqd,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, tile_cap, QK_SCALE, SM_SCALE,
    HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """One (query block, sample, head): dQ by iterating the visible key blocks, with the same two-stage
    (unmasked, then masked) split as the forward."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(QK_A >= 16 and QK_B >= 16 and QK_A + QK_B >= HEAD_DIM, "q/k blocks cover the head")
    sample, blk, num_pad = _tile_coords(Tiles, tile_cap, TILE_LIST, TILE_ROW)
    head = tl.program_id(2).to(tl.int64)
    DQ += tl.multiple_of(head * stride_dqh, ALIGN)
    if sample == num_samples:
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(DQ, stride_dqt, stride_dqd, pad_start, total_tokens, blk, num_pad,
                   HEAD_DIM, V_A, V_B, SPLIT, BLOCK_M, ALIGN)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    m0 = blk * BLOCK_M
    if m0 >= seqlen:
        return
    kv_head = _kv_head(head, GROUP)
    Q += tl.multiple_of(head * stride_qh, ALIGN)
    K += tl.multiple_of(kv_head * stride_kh, ALIGN)
    V += tl.multiple_of(kv_head * stride_vh, ALIGN)
    DOU += tl.multiple_of(head * stride_uh, ALIGN)
    Lse += head * stride_lh
    Delta += head * stride_lh

    offs_m, m_ok, tok_m, qa, qb, doa, dob, lse, delta = _load_q_rows(
        Q, DOU, Lse, Delta, m0, bos, seqlen, stride_qt, stride_qd, stride_ut, stride_ud, Pos, stride_pa, stride_pt,
        InvFreq, Axis, HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_M, SPLIT, ROPE, ALIGN)
    dqa = tl.zeros([BLOCK_M, QK_A], dtype=tl.float32)
    dqb = tl.zeros([BLOCK_M, QK_B], dtype=tl.float32)
    row_end = tl.minimum(seqlen, tl.maximum(prefix, offs_m + 1))
    full_end = (tl.minimum(seqlen, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seqlen, tl.maximum(prefix, m0 + BLOCK_M))
    dqa, dqb = _bwd_dq_inner(dqa, dqb, qa, qb, doa, dob, lse, delta, K, V, Pos, InvFreq, Axis,
                             stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                             bos, seqlen, prefix, offs_m, row_end, 0, full_end, QK_SCALE,
                             HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_N, ROPE, False, DOT_PREC, SPLIT, ROW_BOUND, ALIGN)
    dqa, dqb = _bwd_dq_inner(dqa, dqb, qa, qb, doa, dob, lse, delta, K, V, Pos, InvFreq, Axis,
                             stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                             bos, seqlen, prefix, offs_m, row_end, full_end, kv_end, QK_SCALE,
                             HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_N, ROPE, True, DOT_PREC, SPLIT, ROW_BOUND, ALIGN)
    _write_qk(DQ, tok_m, m_ok, stride_dqt, stride_dqd, dqa * SM_SCALE, dqb * SM_SCALE, Pos, stride_pa, stride_pt,
              InvFreq, Axis, HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, False, ALIGN)

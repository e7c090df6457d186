"""Triton kernels for packed prefix-LM attention with MRoPE and a sigmoid output gate: shared helpers and the forward
(the backward kernels are in ``kernels_bwd.py``).

Layout conventions shared by every kernel here:

* q, gate, out: ``(T, H, D)``, k, v: ``(T, H_kv, D)`` with explicit strides (q/k/v may be slices of one fused
  projection). Grouped-query attention: query head ``h`` reads key/value head ``h // GROUP`` (``GROUP = H / H_kv``,
  constexpr); the key-block backward runs one program per key/value head and sums dK/dV over its ``GROUP`` query
  heads in registers (no atomics).
* Tiles are scheduled per sample from ``cu_seqlens``: either a grid ``(block inside the sample, sample, head)``
  sized for the longest sample, or (``TILE_LIST``) a flat list of the real ``(sample, block)`` pairs that the host
  built on the device, longest sample first, with grid ``(list capacity, 1, head)``. Programs past the real
  tiles (the extra grid column, or the list's spare entries) zero the padding rows ``[cu_seqlens[-1], T)``, so
  outputs can be allocated with ``torch.empty`` and nothing reads ``cu_seqlens`` back on the host.
* Every ``q k^T`` is two dots over two column blocks, ``s = a_q a_k^T + b_q b_k^T``; which channels the blocks
  hold is the head layout (``SPLIT``, constexpr):

  - halves (default): a = ``x[:, :D/2]``, b = ``x[:, D/2:]``, each padded to ``QK_A = QK_B`` (a power of two).
    Rotate-half pairs channel ``c`` with ``c + D/2``, so the rotation is elementwise between a and b. v and dO
    are one block padded to ``V_A`` (72 -> 128: 1.78x the tensor work of the real 72).
  - split (``SPLIT``, variant ``hd80``, non-power-of-two D only): 72 = 64 + 8 read as blocks of 64 and 16. v/dO:
    ``[0, V_A)`` and ``[V_A, D)`` padded to ``V_B``. q/k without in-tile rope: the same. q/k with in-tile rope:
    each half splits the same way (36 = 32 + 4) and a = ``join(x[:, 0:32], x[:, 36:68])``, b = ``join(x[:, 32:36],
    x[:, 68:72])`` (padded to 8 + 8): channel pairs stay in one thread, so the rotation stays elementwise, and the
    dot does not care about the (shared) channel order. dq/dk are split back the same way before they are stored.
* MRoPE is applied in registers as q/k tiles are loaded (``ROPE``, never stored); the backward recomputes it and
  rotates the gradients back with the transpose (``dx = R^T dx_rot``). With variant ``rope_once`` the launcher
  rotates q and k once instead and the kernels run with ``ROPE=False``.
* Softmax runs in base 2: ``log2(e)`` is folded into ``QK_SCALE``, and the saved LSE is ``m + log2(l)`` in that base.
* Mask inside one sample (local indices): query ``i`` sees key ``j`` iff ``j < prefix or j <= i``, i.e. iff
  ``j < max(i + 1, prefix)``: one contiguous key span per row (``ROW_BOUND`` masks with that bound alone).
* ``ALIGN``: the launcher checked that every row and head stride is a multiple of ``ALIGN`` elements and says so
  with ``tl.multiple_of``; Triton only knows "divisible by 16" by itself, and a head stride of 72 is not, which
  would leave every K/V/dO access a 2-byte load.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..mrope.kernels import _rope_cos_sin

# Integers that change from pack to pack: not specialised (a pack of one sample, or a count divisible by 16, would
# otherwise compile the kernels again).
_RUNTIME_INTS = ["total_tokens", "num_samples", "tile_cap"]

# --------------------------------------------------------------------------------------------- where a tile is


@triton.jit
def _tile_coords(Tiles, tile_cap, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr):
    """``(sample, block, padding programs)`` of this program. ``sample == num_samples`` means: zero padding rows,
    as program ``block`` of ``padding programs``. The tile list row is ``[total, samples[cap], blocks[cap]]``."""
    if TILE_LIST:
        row = Tiles + TILE_ROW * (1 + 2 * tile_cap)
        t = tl.program_id(0)
        total = tl.load(row)
        return tl.load(row + 1 + t), tl.load(row + 1 + tile_cap + t), tl.num_programs(0) - total
    else:
        return tl.program_id(1), tl.program_id(0), tl.num_programs(0)


@triton.jit
def _sample_span(CuSeqlens, PrefixLens, sample):
    """``(first token, length, image tokens)`` of one sample; a prefix longer than the sample means all of it."""
    bos = tl.load(CuSeqlens + sample)
    seqlen = tl.load(CuSeqlens + sample + 1) - bos
    return bos, seqlen, tl.minimum(tl.load(PrefixLens + sample), seqlen)


@triton.jit
def _rows(start, bos, seqlen, BLOCK: tl.constexpr):
    """``(local index, inside the sample, global token as int64)`` of the ``BLOCK`` rows from ``start``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < seqlen, (bos + offs).to(tl.int64)


@triton.jit
def _kv_head(head, GROUP: tl.constexpr):
    """The k/v head that query head ``head`` reads: ``GROUP = H // H_kv`` consecutive query heads share one
    (grouped-query attention; 1 is multi-head attention)."""
    return head // GROUP


@triton.jit
def _visible(offs_m, offs_n, prefix, seqlen, row_end, ROW_BOUND: tl.constexpr):
    """``(BLOCK_M, BLOCK_N)`` mask: query row ``offs_m`` sees key ``offs_n`` (local indices)."""
    if ROW_BOUND:
        return offs_n[None, :] < row_end[:, None]
    else:
        return ((offs_n[None, :] < prefix) | (offs_n[None, :] <= offs_m[:, None])) & (offs_n < seqlen)[None, :]


@triton.jit
def _visible_t(offs_n, offs_m, prefix, seqlen, first_row, ROW_BOUND: tl.constexpr):
    """``(BLOCK_N, BLOCK_M)`` mask, transposed: key ``offs_n`` is seen by query row ``offs_m``."""
    m_ok = (offs_m < seqlen)[None, :]
    if ROW_BOUND:
        return (offs_m[None, :] >= first_row[:, None]) & m_ok
    else:
        return ((offs_n[:, None] < prefix) | (offs_n[:, None] <= offs_m[None, :])) & m_ok


# ------------------------------------------------------------------------------------------ loads and stores


@triton.jit
def _load_cols(X, rows, tok_mask, stride_d, OFF: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """Columns ``[OFF, OFF + WIDTH)`` of the rows at offsets ``rows``, ``(rows, BLOCK)``, zero padded."""
    d = tl.arange(0, BLOCK)
    return tl.load(X + rows + (OFF + d[None, :]) * stride_d, mask=tok_mask[:, None] & (d[None, :] < WIDTH),
                   other=0.0)


@triton.jit
def _write_cols(X, rows, tok_mask, stride_d, x, OFF: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                ATOMIC: tl.constexpr):
    """Store (in X's dtype) or, with ``ATOMIC``, add (fp32) ``x`` into columns ``[OFF, OFF + WIDTH)``."""
    d = tl.arange(0, BLOCK)
    ptr = X + rows + (OFF + d[None, :]) * stride_d
    mask = tok_mask[:, None] & (d[None, :] < WIDTH)
    if ATOMIC:
        tl.atomic_add(ptr, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, x.to(X.dtype.element_ty), mask=mask)


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
def _rope_pair(x1, x2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis,
               F0: tl.constexpr, NF: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate (or, ``INVERSE``, un-rotate) paired columns by frequencies ``[F0, F0 + NF)``, padded to BLOCK."""
    cos, sin = _rope_cos_sin(Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq + F0, Axis + F0, NF, BLOCK)
    if INVERSE:
        return _unrotate(x1, x2, cos, sin)
    else:
        return _rotate(x1, x2, cos, sin)


@triton.jit
def _interleave(x1, x2):
    return tl.reshape(tl.join(x1, x2), (x1.shape[0], 2 * x1.shape[1]))


@triton.jit
def _deinterleave(x):
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _load_qk(X, tok, tok_mask, stride_t, stride_d, Pos, stride_pa, stride_pt, InvFreq, Axis,
             HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, SPLIT: tl.constexpr,
             ROPE: tl.constexpr, ALIGN: tl.constexpr):
    """q or k rows ``tok`` as the two column blocks ``(a, b)`` of the head layout (module docstring), rotated when
    ROPE."""
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.multiple_of(tok[:, None] * stride_t, [ALIGN, 1])
    if SPLIT and ROPE:
        HA: tl.constexpr = QK_A // 2
        a1 = _load_cols(X, rows, tok_mask, stride_d, 0, HA, HA)
        a2 = _load_cols(X, rows, tok_mask, stride_d, HALF, HA, HA)
        b1 = _load_cols(X, rows, tok_mask, stride_d, HA, HALF - HA, QK_B // 2)
        b2 = _load_cols(X, rows, tok_mask, stride_d, HALF + HA, HALF - HA, QK_B // 2)
        a1, a2 = _rope_pair(a1, a2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis, 0, HA, HA, False)
        b1, b2 = _rope_pair(b1, b2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis,
                            HA, HALF - HA, QK_B // 2, False)
        return _interleave(a1, a2), _interleave(b1, b2)
    elif SPLIT:
        return (_load_cols(X, rows, tok_mask, stride_d, 0, QK_A, QK_A),
                _load_cols(X, rows, tok_mask, stride_d, QK_A, HEAD_DIM - QK_A, QK_B))
    else:
        d = tl.arange(0, QK_A)
        mask = tok_mask[:, None] & (d[None, :] < HALF)
        ptr = X + rows + d[None, :] * stride_d
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + HALF * stride_d, mask=mask, other=0.0)
        if ROPE:
            x1, x2 = _rope_pair(x1, x2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis, 0, HALF, QK_A, False)
        return x1, x2


@triton.jit
def _write_qk(X, tok, tok_mask, stride_t, stride_d, da, db, Pos, stride_pa, stride_pt, InvFreq, Axis,
              HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, SPLIT: tl.constexpr,
              ROPE: tl.constexpr, ATOMIC: tl.constexpr, ALIGN: tl.constexpr):
    """The inverse of :func:`_load_qk` for fp32 gradients ``(da, db)``: back to channel order, un-rotated when ROPE,
    and stored; with ``ATOMIC`` added instead (the one-pass backward's dQ, which runs on pre-rotated q/k)."""
    tl.static_assert(not (ATOMIC and ROPE), "atomic dQ is summed in the rotated frame and un-rotated once, after")
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.multiple_of(tok[:, None] * stride_t, [ALIGN, 1])
    if SPLIT and ROPE:
        HA: tl.constexpr = QK_A // 2
        a1, a2 = _deinterleave(da)
        b1, b2 = _deinterleave(db)
        # cos/sin recomputed rather than kept live through the loop: registers are the scarce resource there.
        a1, a2 = _rope_pair(a1, a2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis, 0, HA, HA, True)
        b1, b2 = _rope_pair(b1, b2, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis,
                            HA, HALF - HA, QK_B // 2, True)
        _write_cols(X, rows, tok_mask, stride_d, a1, 0, HA, HA, False)
        _write_cols(X, rows, tok_mask, stride_d, a2, HALF, HA, HA, False)
        _write_cols(X, rows, tok_mask, stride_d, b1, HA, HALF - HA, QK_B // 2, False)
        _write_cols(X, rows, tok_mask, stride_d, b2, HALF + HA, HALF - HA, QK_B // 2, False)
    elif SPLIT:
        _write_cols(X, rows, tok_mask, stride_d, da, 0, QK_A, QK_A, ATOMIC)
        _write_cols(X, rows, tok_mask, stride_d, db, QK_A, HEAD_DIM - QK_A, QK_B, ATOMIC)
    else:
        if ROPE:
            da, db = _rope_pair(da, db, Pos, stride_pa, stride_pt, tok, tok_mask, InvFreq, Axis, 0, HALF, QK_A, True)
        _write_cols(X, rows, tok_mask, stride_d, da, 0, HALF, QK_A, ATOMIC)
        _write_cols(X, rows, tok_mask, stride_d, db, HALF, HALF, QK_B, ATOMIC)


@triton.jit
def _load_v(X, tok, tok_mask, stride_t, stride_d, HEAD_DIM: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
            SPLIT: tl.constexpr, ALIGN: tl.constexpr):
    """v / dO / gate rows ``tok`` as ``(a, b)``: with SPLIT ``[0, V_A)`` and ``[V_A, D)`` padded to V_B; otherwise
    the whole head padded to V_A, returned twice (b is then never used)."""
    rows = tl.multiple_of(tok[:, None] * stride_t, [ALIGN, 1])
    if SPLIT:
        return (_load_cols(X, rows, tok_mask, stride_d, 0, V_A, V_A),
                _load_cols(X, rows, tok_mask, stride_d, V_A, HEAD_DIM - V_A, V_B))
    else:
        x = _load_cols(X, rows, tok_mask, stride_d, 0, HEAD_DIM, V_A)
        return x, x


@triton.jit
def _write_v(X, tok, tok_mask, stride_t, stride_d, xa, xb, HEAD_DIM: tl.constexpr, V_A: tl.constexpr,
             V_B: tl.constexpr, SPLIT: tl.constexpr, ALIGN: tl.constexpr):
    rows = tl.multiple_of(tok[:, None] * stride_t, [ALIGN, 1])
    if SPLIT:
        _write_cols(X, rows, tok_mask, stride_d, xa, 0, V_A, V_A, False)
        _write_cols(X, rows, tok_mask, stride_d, xb, V_A, HEAD_DIM - V_A, V_B, False)
    else:
        _write_cols(X, rows, tok_mask, stride_d, xa, 0, HEAD_DIM, V_A, False)


@triton.jit
def _scores(qa, qb, K, tok, tok_mask, stride_kt, stride_kd, Pos, stride_pa, stride_pt, InvFreq, Axis,
            HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
            DOT_PREC: tl.constexpr, ALIGN: tl.constexpr):
    """Load the key rows ``tok`` and return ``(q k^T, ka, kb)``, the scores summed over both column blocks."""
    ka, kb = _load_qk(K, tok, tok_mask, stride_kt, stride_kd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                      HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, ALIGN)
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
    return tl.dot(qb, tl.trans(kb), s, input_precision=DOT_PREC), ka, kb


@triton.jit
def _zero_rows(X, stride_t, stride_d, start, total, pid, num_pid,
               HEAD_DIM: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Zero rows ``[start, total)`` of one head of X; ``num_pid`` programs share them round-robin."""
    offs = tl.arange(0, BLOCK)
    za = tl.zeros([BLOCK, V_A], dtype=tl.float32)
    zb = tl.zeros([BLOCK, V_B], dtype=tl.float32)
    for m0 in range(start + pid * BLOCK, total, num_pid * BLOCK):
        tok = (m0 + offs).to(tl.int64)
        _write_v(X, tok, tok < total, stride_t, stride_d, za, zb, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)


# ----------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc_a, acc_b, l_i, m_i, qa, qb, K, V, Pos, InvFreq, Axis,
               stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
               bos, seqlen, prefix, offs_m, row_end, lo, hi, QK_SCALE,
               HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr,
               V_B: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASK: tl.constexpr,
               DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, ALIGN: tl.constexpr):
    """Online softmax over key blocks ``[lo, hi)`` (local). ``MASK=False`` only for tiles that are fully visible
    and inside the sample, so the common case pays no mask arithmetic."""
    for n0 in range(lo, hi, BLOCK_N):
        n_idx, n_ok, tok = _rows(n0, bos, seqlen, BLOCK_N)
        s, ka, kb = _scores(qa, qb, K, tok, n_ok, stride_kt, stride_kd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                            HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, DOT_PREC, ALIGN)
        s = s * QK_SCALE
        if MASK:
            s = tl.where(_visible(offs_m, n_idx, prefix, seqlen, row_end, ROW_BOUND), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        va, vb = _load_v(V, tok, n_ok, stride_vt, stride_vd, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
        acc_a = tl.dot(p.to(va.dtype), va, acc_a * alpha[:, None], input_precision=DOT_PREC)
        if SPLIT:
            acc_b = tl.dot(p.to(vb.dtype), vb, acc_b * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _prefix_lm_attn_fwd_kernel(
    Q, K, V, G, Out, OutU, Lse, CuSeqlens, PrefixLens, Pos, InvFreq, Axis, Tiles,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_gt, stride_gh, stride_gd,
    stride_ot, stride_oh, stride_od,
    stride_lh, stride_pa, stride_pt,
    total_tokens, num_samples, tile_cap, QK_SCALE,
    HEAD_DIM: tl.constexpr, QK_A: tl.constexpr, QK_B: tl.constexpr, V_A: tl.constexpr, V_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATE_MODE: tl.constexpr,  # 0 none, 1 elementwise (T, H, D), 2 headwise (T, H)
    ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    SPLIT: tl.constexpr, ROW_BOUND: tl.constexpr, TILE_LIST: tl.constexpr, TILE_ROW: tl.constexpr,
    ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """One (query block, sample, head) tile: ``Out = sigmoid(G) * softmax(mask(rope(q) rope(k)^T)) v``.

    Also writes ``Lse`` ``(H, T)`` fp32 (base-2 log-sum-exp) and, when gated, ``OutU`` = the ungated output, which is
    what the backward needs (recovering it as Out / sigmoid(G) would lose precision where the gate is near 0).
    """
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "tl.dot needs tile sides that are multiples of 16")
    tl.static_assert(HEAD_DIM % 2 == 0, "rotate-half splits the head in two equal halves")
    tl.static_assert(QK_A >= 16 and QK_B >= 16 and QK_A + QK_B >= HEAD_DIM, "q/k blocks cover the head")
    sample, blk, num_pad = _tile_coords(Tiles, tile_cap, TILE_LIST, TILE_ROW)
    head = tl.program_id(2).to(tl.int64)
    Out += tl.multiple_of(head * stride_oh, ALIGN)
    OutU += tl.multiple_of(head * stride_oh, ALIGN)
    if sample == num_samples:
        pad_start = tl.load(CuSeqlens + num_samples)
        _zero_rows(Out, stride_ot, stride_od, pad_start, total_tokens, blk, num_pad,
                   HEAD_DIM, V_A, V_B, SPLIT, BLOCK_M, ALIGN)
        if GATE_MODE != 0:
            _zero_rows(OutU, stride_ot, stride_od, pad_start, total_tokens, blk, num_pad,
                       HEAD_DIM, V_A, V_B, SPLIT, BLOCK_M, ALIGN)
        return
    bos, seqlen, prefix = _sample_span(CuSeqlens, PrefixLens, sample)
    m0 = blk * BLOCK_M
    if m0 >= seqlen:  # the (block, sample) grid is sized for the longest sample
        return
    kv_head = _kv_head(head, GROUP)
    Q += tl.multiple_of(head * stride_qh, ALIGN)
    K += tl.multiple_of(kv_head * stride_kh, ALIGN)
    V += tl.multiple_of(kv_head * stride_vh, ALIGN)

    offs_m, m_ok, tok_m = _rows(m0, bos, seqlen, BLOCK_M)
    qa, qb = _load_qk(Q, tok_m, m_ok, stride_qt, stride_qd, Pos, stride_pa, stride_pt, InvFreq, Axis,
                      HEAD_DIM, QK_A, QK_B, SPLIT, ROPE, ALIGN)

    # A finite floor instead of -inf: a row whose first tile is fully masked then gives exp2(-inf - floor) = 0
    # rather than exp2(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, V_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, V_B], dtype=tl.float32)
    # Keys [0, full_end) are visible to every row of this block (j < prefix, or j <= first row) and inside the
    # sample: no mask. Keys [full_end, kv_end) need it. Keys past max(prefix, last row) are never visible: skipped.
    row_end = tl.minimum(seqlen, tl.maximum(prefix, offs_m + 1))
    full_end = (tl.minimum(seqlen, tl.maximum(prefix, m0 + 1)) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seqlen, tl.maximum(prefix, m0 + BLOCK_M))
    acc_a, acc_b, l_i, m_i = _fwd_inner(acc_a, acc_b, l_i, m_i, qa, qb, K, V, Pos, InvFreq, Axis,
                                        stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                                        bos, seqlen, prefix, offs_m, row_end, 0, full_end, QK_SCALE,
                                        HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_N, ROPE, False, DOT_PREC,
                                        SPLIT, ROW_BOUND, ALIGN)
    acc_a, acc_b, l_i, m_i = _fwd_inner(acc_a, acc_b, l_i, m_i, qa, qb, K, V, Pos, InvFreq, Axis,
                                        stride_kt, stride_kd, stride_vt, stride_vd, stride_pa, stride_pt,
                                        bos, seqlen, prefix, offs_m, row_end, full_end, kv_end, QK_SCALE,
                                        HEAD_DIM, QK_A, QK_B, V_A, V_B, BLOCK_N, ROPE, True, DOT_PREC,
                                        SPLIT, ROW_BOUND, ALIGN)
    # Every real row sees key 0, so l_i >= 1 there; rows past the sample are never stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_a = acc_a / l_safe[:, None]
    o_b = acc_b / l_safe[:, None]
    tl.store(Lse + head * stride_lh + bos + offs_m, m_i + tl.log2(l_safe), mask=m_ok)

    if GATE_MODE == 1:
        G += tl.multiple_of(head * stride_gh, ALIGN)
        ga, gb = _load_v(G, tok_m, m_ok, stride_gt, stride_gd, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
        _write_v(OutU, tok_m, m_ok, stride_ot, stride_od, o_a, o_b, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
        o_a = o_a * tl.sigmoid(ga.to(tl.float32))
        if SPLIT:
            o_b = o_b * tl.sigmoid(gb.to(tl.float32))
    elif GATE_MODE == 2:
        g = tl.load(G + head * stride_gh + tok_m * stride_gt, mask=m_ok, other=0.0).to(tl.float32)
        _write_v(OutU, tok_m, m_ok, stride_ot, stride_od, o_a, o_b, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)
        o_a = o_a * tl.sigmoid(g)[:, None]
        o_b = o_b * tl.sigmoid(g)[:, None]
    _write_v(Out, tok_m, m_ok, stride_ot, stride_od, o_a, o_b, HEAD_DIM, V_A, V_B, SPLIT, ALIGN)

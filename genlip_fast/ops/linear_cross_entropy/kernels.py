"""Triton kernels for the LM head + cross entropy, with the ``(N, V)`` logits never stored whole.

Layout conventions shared by every kernel here:

* hidden ``H (N, D)``, weight ``W (V, D)``, bias ``B (V,)``, targets ``T (N,)`` int64; every tensor is addressed
  through explicit strides, and every row / vocab offset is widened to int64 before it meets a stride
  (16K rows x 152K vocab overflows int32).
* A logits tile ``z = H[rows] @ W[cols]^T (+ B[cols])`` is ``(BLOCK_N, BLOCK_V)``, accumulated in fp32 over ``D`` in
  ``BLOCK_D`` steps on tensor cores. The W operand is loaded as the transposed ``(BLOCK_D, BLOCK_V)`` tile straight
  from ``W``'s strides, so no transposed copy of the weight ever exists.
* Soft-capping ``z = c * tanh(a / c)`` is applied in registers; its derivative ``1 - (z / c)^2`` is recomputed from
  the capped value, so nothing extra is kept between forward and backward.
* Exponentials run in base 2 with ``log2(e)`` folded in. Differences are taken *before* the scale
  (``exp2((z - m) * LOG2E)``): with logits around 1e4 the difference of two nearby fp32 numbers is exact, whereas
  ``z * LOG2E - m * LOG2E`` would round both products first.

Forward: grid ``(row blocks, vocab splits)``. ``N`` alone gives too few row blocks to fill a GPU (4,400 rows are 35
blocks of 128), so the vocab is cut into ``CHUNK_V``-wide splits too; each program runs an online logsumexp over
its split and writes a partial ``(max, sum of exp, target logit)`` per row, and ``_lce_combine_kernel`` merges the
splits in a fixed order (deterministic, no atomics).

Backward: ``_lce_bwd_dlogits_kernel`` recomputes one logits tile per program and writes
``dz = g * (softmax - onehot) * softcap'`` for one vocab chunk into a small workspace; the host then turns that chunk
into ``dH += dz @ W_chunk`` and ``dW_chunk = dz^T @ H`` with two dense matmuls. A tile of ``dH`` or ``dW`` is
``BLOCK x D`` wide (128 x 1152 fp32 would be 590 KB, more than a whole register file), so accumulating them inside
the kernel would mean recomputing the logits once per ``D`` slice or using atomics; the chunked workspace keeps the
work at 4 matmuls' worth, the memory at one ``(N, chunk)`` buffer and the result deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # No libdevice: tanh(x) = 1 - 2 / (exp(2x) + 1). exp2 overflows to inf for x > ~44, where 2 / inf = 0 gives
    # exactly 1, and underflows to 0 for x < ~-44, giving exactly -1, so large |x| never makes a NaN.
    e = tl.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D, softcap,
                 stride_hn, stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(BLOCK_N, BLOCK_V)`` fp32 logits for rows ``rows64`` and vocab entries ``cols64`` (both int64)."""
    ks = tl.arange(0, BLOCK_D)
    h_ptr = H + rows64[:, None] * stride_hn + ks[None, :] * stride_hd
    w_ptr = W + cols64[None, :] * stride_wv + ks[:, None] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        k_mask = (k + ks) < D
        # Masked rows / columns / channels load 0, so they add nothing to the product.
        h = tl.load(h_ptr, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptr += BLOCK_D * stride_hd
        w_ptr += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(H, W, B, T, M_part, S_part, Z_part,
                    N, V, D, softcap,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    CHUNK_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial logsumexp of rows ``[pid_n * BLOCK_N, +BLOCK_N)`` over vocab split ``[split * CHUNK_V, +CHUNK_V)``.

    Writes, at ``split * N + row`` of each partial buffer: the running max ``m`` (natural units), the sum of
    ``exp(z - m)`` and the target logit if the target falls inside this split (else 0, so the splits' values can be
    summed exactly).
    """
    tl.static_assert(BLOCK_N >= 16 and BLOCK_V >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(CHUNK_V % BLOCK_V == 0, "a vocab split must hold whole vocab blocks")
    pid_n = tl.program_id(0)
    split = tl.program_id(1)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    # Rows past N get target -1, which matches no vocab column.
    tgt = tl.load(T + rows64, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = split.to(tl.int64) * CHUNK_V
    v_hi = tl.minimum(v_lo + CHUNK_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols64 = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols64 < v_hi
        z = _logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D, softcap,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        # The first block of a split always holds a real column, so m is finite from the first iteration on and
        # later all-padding blocks (max -inf) leave it unchanged: no (-inf) - (-inf) NaN.
        m_new = tl.maximum(m, tl.max(z, 1))
        p = tl.exp2((z - m_new[:, None]) * LOG2E)
        s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(p, 1)
        m = m_new
        zt += tl.sum(tl.where(cols64[None, :] == tgt[:, None], z, 0.0), 1)

    out = split.to(tl.int64) * N + rows64
    tl.store(M_part + out, m, mask=row_mask)
    tl.store(S_part + out, s, mask=row_mask)
    tl.store(Z_part + out, zt, mask=row_mask)


@triton.jit
def _lce_combine_kernel(M_part, S_part, Z_part, T, Loss, Lse,
                        N, NUM_SPLITS, ignore_index,
                        BLOCK: tl.constexpr):
    """Merge the vocab splits in split order: ``lse = logsumexp``, ``loss = lse - z_target`` (0 on ignored rows)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)

    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for k in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(M_part + k * N + rows64, mask=row_mask, other=0.0))
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    zt = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, NUM_SPLITS):
        off = k * N + rows64
        m_k = tl.load(M_part + off, mask=row_mask, other=0.0)
        s += tl.load(S_part + off, mask=row_mask, other=1.0) * tl.exp2((m_k - m) * LOG2E)
        # Only the split holding the target wrote a non-zero value: the sum is exact.
        zt += tl.load(Z_part + off, mask=row_mask, other=0.0)
    lse = m + tl.log2(s) * LN2

    tgt = tl.load(T + rows64, mask=row_mask, other=0).to(tl.int64)
    loss = tl.where(tgt != ignore_index, lse - zt, 0.0)
    tl.store(Loss + rows64, loss, mask=row_mask)
    tl.store(Lse + rows64, lse, mask=row_mask)


@triton.jit
def _lce_bwd_dlogits_kernel(H, W, B, T, Lse, G, DZ,
                            N, D, v_lo, v_hi, softcap,
                            stride_hn, stride_hd, stride_wv, stride_wd, stride_zn, stride_zv,
                            HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DZ[row, col - v_lo] = G[row] * (softmax - onehot)[row, col] * softcap'`` for vocab ``[v_lo, v_hi)``.

    ``G`` is the per-row upstream gradient, already 0 on ignored rows (so their onehot never counts).
    """
    tl.static_assert(BLOCK_N >= 16 and BLOCK_V >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    # Row blocks vary fastest, so programs running together share one W tile and all of H stays hot in L2.
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    cols64 = v_lo + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    col_mask = cols64 < v_hi

    z = _logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D, softcap,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(Lse + rows64, mask=row_mask, other=0.0)
    g = tl.load(G + rows64, mask=row_mask, other=0.0)
    tgt = tl.load(T + rows64, mask=row_mask, other=-1).to(tl.int64)

    p = tl.exp2((z - lse[:, None]) * LOG2E)
    dz = tl.where(cols64[None, :] == tgt[:, None], p - 1.0, p)
    if HAS_SOFTCAP:
        t = z / softcap
        dz = dz * (1.0 - t * t)
    dz = dz * g[:, None]

    ptr = DZ + rows64[:, None] * stride_zn + (cols64 - v_lo)[None, :] * stride_zv
    tl.store(ptr, dz.to(DZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

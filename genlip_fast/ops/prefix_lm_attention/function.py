"""Host side of the fused prefix-LM attention: launchers, the custom op pair (forward / backward) and autograd.

``torch.library.custom_op`` (not ``triton_op``: it also runs under the CPU interpreter) makes the forward and the
backward one opaque op each, so ``torch.compile`` traces through the model without graph breaks. Nothing here
reads device memory back on the host when ``max_seqlen`` is given (the tile lists of variant ``tile_list`` are
built on the device with fixed shapes).

The kernel variant (``variants.py``) is read once per call in :func:`prefix_lm_attention_triton` and passed to both
ops as a string, so the backward always matches its forward.

This module deliberately avoids ``from __future__ import annotations``: ``custom_op`` reads the schema from the real
annotation objects.
"""

import functools
from typing import Optional

import torch
import triton

from ..mrope.positions import mrope_freq_table
from .launch import _KERNELS, _TILE_AXIS, Launch, _configs, _fixed, _run, _tile_list, layout_class
from .variants import Variant, current_variant, parse_variant

_LOG2E = 1.4426950408889634
# Rows x padded half-width per program of the rotation pass: 4096 (the MRoPE op's own choice) spills at D = 72 when
# un-rotating (sm_90, 56-116 B); 2048 does not.
ROPE_PASS_ELEMENTS = 2048
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------- shared pieces


@functools.lru_cache(maxsize=64)
def _freq_tables(head_dim: int, section: tuple, interleaved: bool, theta: float, device: torch.device):
    # Cached per device: building them is a host-to-device copy, which would stall the stream on every call.
    return mrope_freq_table(head_dim, section, interleaved, theta, device=device)


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _layout(head_dim: int, split: bool, rope: bool) -> dict:
    """Column-block constexprs of the head layout (``kernels.py`` docstring). ``split`` (variant hd80) changes head
    dims that are a power of two plus at most 16 (72 = 64 + 8, 80, 40, 48): a power of two is unpadded as two halves
    already, and a wider rest (96 = 64 + 32) spills registers on sm_90 in too many configs to be worth a table."""
    D, half = head_dim, head_dim // 2
    va = _pow2_floor(D)
    if not split or D == va or D - va > 16:
        bh = max(16, triton.next_power_of_2(half))
        return dict(SPLIT=False, QK_A=bh, QK_B=bh, V_A=max(16, triton.next_power_of_2(D)), V_B=16)
    if rope:  # each half as a power of two + the rest, joined pairwise: 72 -> (32 + 32) + (4 + 4 -> 8 + 8)
        ha = _pow2_floor(half)
        return dict(SPLIT=True, QK_A=2 * ha, QK_B=2 * max(8, triton.next_power_of_2(half - ha)), V_A=va, V_B=16)
    return dict(SPLIT=True, QK_A=va, QK_B=16, V_A=va, V_B=16)


def _align(*tensors) -> int:
    """Largest power of two <= 8 dividing every row and head stride of the (T, H, D) tensors given."""
    a = 8
    for t in tensors:
        for s in t.stride()[:2]:
            while s % a:
                a //= 2
    return a


def _check_inputs(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved):
    if q.dim() != 3:
        raise ValueError(f"q must be (total_tokens, num_heads, head_dim), got shape {tuple(q.shape)}")
    T, H, D = q.shape
    H_kv = k.shape[1] if k.dim() == 3 else 0
    if k.shape != (T, H_kv, D) or v.shape != k.shape or not (H_kv == H or H_kv and H % H_kv == 0):
        raise ValueError(f"k and v must be (T, H_kv, D) with H % H_kv == 0 (grouped-query attention) for q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if D % 2 or not 2 <= D <= 256:
        raise ValueError(f"head_dim must be even and at most 256 (rotate-half halves), got {D}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be (num_samples + 1,) int32, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    if prefix_lens.shape != (cu_seqlens.numel() - 1,) or prefix_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"prefix_lens must be (num_samples,) = ({cu_seqlens.numel() - 1},) int32, "
            f"got {tuple(prefix_lens.shape)} {prefix_lens.dtype}"
        )
    if gate is not None:
        if gate.shape not in ((T, H, D), (T, H)):
            raise ValueError(f"gate must be (T, H, D) = {(T, H, D)} or (T, H) = {(T, H)}, got {tuple(gate.shape)}")
        if gate.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"gate must be a float tensor, got {gate.dtype}")
    if position_ids is not None:
        if position_ids.shape != (3, T) or position_ids.dtype.is_floating_point:
            raise ValueError(
                f"position_ids must be (3, {T}) integer, got {tuple(position_ids.shape)} {position_ids.dtype}"
            )
        if mrope_section is None:
            raise ValueError("position_ids given without mrope_section")
        if len(mrope_section) != 3 or min(mrope_section) < 0:
            raise ValueError(f"mrope_section must be three non-negative ints (t, h, w), got {mrope_section}")
        if not mrope_interleaved and sum(mrope_section) != D // 2:
            raise ValueError(f"chunked mrope_section {mrope_section} must sum to head_dim // 2 = {D // 2}")
    tensors = [t for t in (q, k, v, cu_seqlens, prefix_lens, gate, position_ids) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _gate_mode(gate: Optional[torch.Tensor]) -> int:
    return 0 if gate is None else (1 if gate.dim() == 3 else 2)


def _gate_strides(gate: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if gate is None:
        return 0, 0, 0
    return (gate.stride(0), gate.stride(1), gate.stride(2) if gate.dim() == 3 else 0)


def _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta):
    """(Pos, InvFreq, Axis, stride_pa, stride_pt); dummies pointing at q when rotary is off."""
    if position_ids is None:
        return q, q, q, 0, 0
    inv, axis = _freq_tables(q.shape[-1], tuple(int(s) for s in mrope_section), bool(mrope_interleaved),
                             float(rope_theta), q.device)
    return position_ids, inv, axis, position_ids.stride(0), position_ids.stride(1)


def _rotate_into(x: torch.Tensor, y: torch.Tensor, rope: tuple, inverse: bool) -> torch.Tensor:
    """``y = R x`` (``R^T x`` when ``inverse``) with MRoPE, one elementwise pass (x may be y: it runs in place,
    and x may be fp32 while y is 16-bit). Variant ``rope_once`` rotates q/k and un-rotates dq/dk this way."""
    T, H, D = x.shape
    pos, inv, axis, spa, spt = rope

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), H)

    half = triton.next_power_of_2(D // 2)
    _run(Launch("rope", _KERNELS["rope"], grid, (x, y, pos, inv, axis, *x.stride(), *y.stride(), spa, spt, T),
                dict(HEAD_DIM=D, BLOCK_HALF=half, INVERSE=inverse), _fixed("rope", BLOCK_T=ROPE_PASS_ELEMENTS // half)))
    return y


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would be a silent precision drop); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_launch(name: str, variant: Variant, q, cu_seqlens, max_seqlen: int, make_args, consts: dict):
    """Launch one of the tiled attention kernels with the variant's grid: per sample sized for ``max_seqlen``, or
    a tile list; over the query heads, or (key-block kernels) the key/value heads, each of which loops over its
    ``GROUP`` query heads. ``make_args(tiles, tile_cap)`` gives the positional arguments."""
    T, H, _ = q.shape
    if name in ("dkdv", "onepass"):
        H //= consts["GROUP"]
    num_samples = cu_seqlens.numel() - 1
    configs, blocks = _configs(name, q.dtype == torch.float32, variant, layout_class(consts), consts["GROUP"] > 1)
    axis, descending = _TILE_AXIS[name]
    if variant.tile_list:
        tiles, cap = _tile_list(cu_seqlens, T, blocks, descending)

        def grid(meta):
            return (triton.cdiv(T, meta[axis]) + num_samples + 1, 1, H)
    else:
        tiles, cap = cu_seqlens, 0  # never read

        def grid(meta):
            return (max(1, triton.cdiv(max_seqlen, meta[axis])), num_samples + 1, H)

    _run(Launch(name, _KERNELS[name], grid, make_args(tiles, cap), consts, list(configs),
                reset=("DQ",) if name == "onepass" else ()))


def prefix_lm_attention_forward(
    q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
    softmax_scale, max_seqlen, variant="default",
):
    """Run the fused forward. Returns ``(out, out_ungated, lse, q_rot, k_rot)``: out ``(T, H, D)`` in q's dtype;
    out_ungated the same before the gate (an empty tensor when there is no gate); lse ``(H, T)`` fp32, base 2;
    q_rot, k_rot the rotated q and k of variant ``rope_once`` (what its backward reads), else empty tensors."""
    var = parse_variant(variant)
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    out_u = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if gate is not None else q.new_empty(0)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    q_rot, k_rot = q.new_empty(0), k.new_empty(0)  # two tensors: custom op outputs may not alias
    if T == 0 or H == 0:
        return out, out_u, lse, q_rot, k_rot
    group = H // k.shape[1]
    rope = _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
    in_tile = position_ids is not None
    if in_tile and var.rope_once:
        q_rot = _rotate_into(q, torch.empty((T, H, D), dtype=q.dtype, device=q.device), rope, inverse=False)
        k_rot = _rotate_into(k, torch.empty(k.shape, dtype=k.dtype, device=q.device), rope, inverse=False)
        q, k, in_tile = q_rot, k_rot, False
    g = gate if gate is not None else q
    ou = out_u if gate is not None else out
    mode = _gate_mode(gate)
    consts = dict(HEAD_DIM=D, **_layout(D, var.hd80, in_tile), GATE_MODE=mode, ROPE=in_tile,
                  DOT_PREC=_dot_prec(q.dtype), ROW_BOUND=var.fit_tiles, TILE_LIST=var.tile_list, GROUP=group,
                  ALIGN=_align(q, k, v, out, *([gate] if mode == 1 else [])))
    _attention_launch("fwd", var, q, cu_seqlens, max_seqlen, lambda tiles, cap: (
        q, k, v, g, out, ou, lse, cu_seqlens, prefix_lens, *rope[:3], tiles,
        *q.stride(), *k.stride(), *v.stride(), *_gate_strides(gate), *out.stride(),
        lse.stride(0), *rope[3:], T, prefix_lens.numel(), cap, softmax_scale * _LOG2E), consts)
    return out, out_u, lse, q_rot, k_rot


def prefix_lm_attention_backward(
    dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved,
    rope_theta, softmax_scale, max_seqlen, variant="default",
):
    """Gradients ``(dq, dk, dv, dgate)`` (dk, dv ``(T, H_kv, D)`` like k, v: each summed over its group of query
    heads inside the kernel); ``out_u`` is the ungated forward output (the output itself when there is
    no gate); dgate is an empty tensor when there is no gate. With variant ``rope_once`` (and rotary), q and k are
    the forward's rotated ``q_rot`` and ``k_rot``."""
    var = parse_variant(variant)
    T, H, D = q.shape
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=q.device) if gate is not None else q.new_empty(0)
    if T == 0 or H == 0:
        return dq, dk, dv, dgate
    if dout.shape != (T, H, D):
        raise ValueError(f"grad_out must be {(T, H, D)}, got {tuple(dout.shape)}")
    mode = _gate_mode(gate)
    block_d = triton.next_power_of_2(D)
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    # With a gate the attention backward runs on dO * sigmoid(g), written once here; without one it reads dO.
    dou = torch.empty((T, H, D), dtype=dout.dtype, device=q.device) if gate is not None else dout
    g = gate if gate is not None else q
    dg = dgate if gate is not None else q
    dgst = _gate_strides(dgate) if gate is not None else (0, 0, 0)

    def grid_pre(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), H)

    _run(Launch("pre", _KERNELS["pre"], grid_pre,
                (dout, out_u, g, dou, delta, dg, *dout.stride(), *out_u.stride(), *_gate_strides(gate), *dgst,
                 *dou.stride(), delta.stride(0), T),
                dict(HEAD_DIM=D, BLOCK_D=block_d, GATE_MODE=mode,
                     ALIGN=_align(dout, out_u, dou, *([gate, dgate] if mode == 1 else []))),
                _fixed("pre", BLOCK_M=max(16, 4096 // block_d))))

    rope = _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
    rotated = position_ids is not None and var.rope_once  # q, k are q_rot, k_rot: un-rotate dq, dk at the end
    in_tile = position_ids is not None and not rotated
    consts = dict(HEAD_DIM=D, **_layout(D, var.hd80, in_tile), ROPE=in_tile, DOT_PREC=_dot_prec(q.dtype),
                  ROW_BOUND=var.fit_tiles, TILE_LIST=var.tile_list, GROUP=H // k.shape[1])
    scales = (softmax_scale * _LOG2E, softmax_scale)
    common = (cu_seqlens, prefix_lens, *rope[:3])
    if var.onepass:
        dq_acc = torch.zeros((T, H, D), dtype=torch.float32, device=q.device)
        _attention_launch("onepass", var, q, cu_seqlens, max_seqlen, lambda tiles, cap: (
            q, k, v, dou, lse, delta, dk, dv, dq_acc, *common, tiles,
            *q.stride(), *k.stride(), *v.stride(), *dou.stride(), *dk.stride(), *dv.stride(), *dq_acc.stride(),
            lse.stride(0), *rope[3:], T, prefix_lens.numel(), cap, *scales),
            dict(consts, ALIGN=_align(q, k, v, dou, dk, dv, dq_acc)))
        if position_ids is not None:
            _rotate_into(dq_acc, dq, rope, inverse=True)
        else:
            dq.copy_(dq_acc)
    else:
        _attention_launch("dkdv", var, q, cu_seqlens, max_seqlen, lambda tiles, cap: (
            q, k, v, dou, lse, delta, dk, dv, *common, tiles,
            *q.stride(), *k.stride(), *v.stride(), *dou.stride(), *dk.stride(), *dv.stride(),
            lse.stride(0), *rope[3:], T, prefix_lens.numel(), cap, *scales),
            dict(consts, ALIGN=_align(q, k, v, dou, dk, dv)))
        _attention_launch("dq", var, q, cu_seqlens, max_seqlen, lambda tiles, cap: (
            q, k, v, dou, lse, delta, dq, *common, tiles,
            *q.stride(), *k.stride(), *v.stride(), *dou.stride(), *dq.stride(),
            lse.stride(0), *rope[3:], T, prefix_lens.numel(), cap, *scales),
            dict(consts, ALIGN=_align(q, k, v, dou, dq)))
        if rotated:
            _rotate_into(dq, dq, rope, inverse=True)
    if rotated:
        _rotate_into(dk, dk, rope, inverse=True)
    return dq, dk, dv, dgate


# ------------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("genlip_fast::prefix_lm_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    gate: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    mrope_section: Optional[list[int]],
    mrope_interleaved: bool,
    rope_theta: float,
    softmax_scale: float,
    max_seqlen: int,
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return prefix_lm_attention_forward(
        q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
        softmax_scale, max_seqlen, variant,
    )


def _saves_rotated(position_ids, variant: str) -> bool:
    return position_ids is not None and parse_variant(variant).rope_once


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
              softmax_scale, max_seqlen, variant):
    T, H, D = q.shape
    out_u = q.new_empty((T, H, D)) if gate is not None else q.new_empty(0)
    rotated = _saves_rotated(position_ids, variant) and T and H
    return (q.new_empty((T, H, D)), out_u, q.new_empty((H, T), dtype=torch.float32),
            q.new_empty((T, H, D) if rotated else (0,)), k.new_empty(k.shape if rotated else (0,)))


@torch.library.custom_op("genlip_fast::prefix_lm_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out_u: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    gate: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    mrope_section: Optional[list[int]],
    mrope_interleaved: bool,
    rope_theta: float,
    softmax_scale: float,
    max_seqlen: int,
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return prefix_lm_attention_backward(
        dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved,
        rope_theta, softmax_scale, max_seqlen, variant,
    )


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section,
              mrope_interleaved, rope_theta, softmax_scale, max_seqlen, variant):
    T, H, D = q.shape
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)
    return q.new_empty((T, H, D)), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
     softmax_scale, max_seqlen, variant) = inputs
    out, out_u, lse, q_rot, k_rot = output
    # The backward needs the ungated output; without a gate that is the output itself. Variant rope_once keeps
    # the rotated q and k instead of q and k (the backward never reads the unrotated ones then).
    saved_out = out_u if gate is not None else out
    if _saves_rotated(position_ids, variant) and q_rot.numel():
        q, k = q_rot, k_rot
    ctx.save_for_backward(q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids)
    ctx.rope = (mrope_section, mrope_interleaved, rope_theta)
    ctx.softmax_scale = softmax_scale
    ctx.max_seqlen = max_seqlen
    ctx.variant = variant
    ctx.mark_non_differentiable(out_u, lse, q_rot, k_rot)


def _backward(ctx, dout, _dout_u, _dlse, _dq_rot, _dk_rot):
    q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids = ctx.saved_tensors
    section, interleaved, theta = ctx.rope
    dq, dk, dv, dgate = _bwd_op(
        dout, q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids, section, interleaved, theta,
        ctx.softmax_scale, ctx.max_seqlen, ctx.variant,
    )
    return (dq, dk, dv, None, None, (dgate if gate is not None else None), None, None, None, None, None, None,
            None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def prefix_lm_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    *,
    gate: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    mrope_section=None,
    mrope_interleaved: bool = True,
    rope_theta: float = 10000.0,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Fused Triton path of :func:`genlip_fast.ops.prefix_lm_attention` (same arguments and result).

    ``max_seqlen`` (host int, the longest sample) sizes the grid; when omitted it is read from ``cu_seqlens``, which
    costs one device-to-host sync. The kernel variant in force (``variants.current_variant()``) is read here.
    """
    _check_inputs(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved)
    D = q.shape[-1]
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    if max_seqlen is None:
        n = cu_seqlens.numel() - 1
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if n > 0 else 0
    section = None if position_ids is None else [int(s) for s in mrope_section]
    out = _fwd_op(
        q, k, v, cu_seqlens, prefix_lens, gate, position_ids, section, bool(mrope_interleaved), float(rope_theta),
        scale, int(max_seqlen), current_variant(),
    )[0]
    return out


__all__ = [
    "prefix_lm_attention_backward",
    "prefix_lm_attention_forward",
    "prefix_lm_attention_triton",
]

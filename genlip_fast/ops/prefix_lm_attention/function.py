"""Host side of the fused prefix-LM attention: launchers, the custom op pair (forward / backward) and autograd.

``torch.library.custom_op`` (not ``triton_op``: it also runs under the CPU interpreter) makes the forward and the
backward one opaque op each, so ``torch.compile`` traces through the model without graph breaks. Nothing here
reads device memory back on the host when ``max_seqlen`` is given.

This module deliberately avoids ``from __future__ import annotations``: ``custom_op`` reads the schema from the real
annotation objects.
"""

import functools
from typing import Optional

import torch
import triton

from .._dispatch import interpreting
from ..mrope.positions import mrope_freq_table
from . import kernels

_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Block sizes under the CPU interpreter: one config (autotuning with several fails there). Small enough that the
# masked / unmasked / tail stages all occur on test-sized samples. Tests may patch this dict.
INTERPRETER_CONFIGS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=32),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
    "pre": dict(BLOCK_M=64),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU machine. The autotune key is the head dim, gate kind and
# rope flag (plus the tensor dtypes, which Triton adds itself) — never the pack length or max_seqlen, so a new
# pack layout reuses the tuned config.
GPU_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    "dkdv": [(32, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 3)],
}
# fp32 tiles take twice the shared memory: the 16-bit configs above overflow an H100's 227 KiB.
GPU_CONFIGS_FP32 = {
    "fwd": [(64, 32, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(32, 64, 4, 1), (32, 32, 4, 2)],
    "dq": [(64, 32, 4, 1), (32, 32, 4, 2)],
}
_TUNE_KEYS = {"fwd": ["HEAD_DIM", "GATE_MODE", "ROPE"], "dkdv": ["HEAD_DIM", "ROPE"], "dq": ["HEAD_DIM", "ROPE"]}
_KERNELS = {
    "fwd": kernels._prefix_lm_attn_fwd_kernel,
    "dkdv": kernels._prefix_lm_attn_bwd_dkdv_kernel,
    "dq": kernels._prefix_lm_attn_bwd_dq_kernel,
}


@functools.lru_cache(maxsize=None)
def _tuned(name: str, fp32: bool):
    table = GPU_CONFIGS_FP32 if fp32 else GPU_CONFIGS
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in table[name]]
    return triton.autotune(configs, key=_TUNE_KEYS[name])(_KERNELS[name])


def _launch(name: str, grid, *args, fp32: bool = False, **consts) -> None:
    """Launch kernel ``name``: the fixed interpreter config on CPU, the autotuned one on a GPU."""
    if interpreting():
        cfg = INTERPRETER_CONFIGS[name]
        _KERNELS[name][grid(cfg)](*args, **consts, **cfg)
    else:
        _tuned(name, fp32)[grid](*args, **consts)


@functools.lru_cache(maxsize=64)
def _freq_tables(head_dim: int, section: tuple, interleaved: bool, theta: float, device: torch.device):
    # Cached per device: building them is a host-to-device copy, which would stall the stream on every call.
    return mrope_freq_table(head_dim, section, interleaved, theta, device=device)


def _block_half(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim // 2))


def _check_inputs(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved):
    if q.dim() != 3:
        raise ValueError(f"q must be (total_tokens, num_heads, head_dim), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    T, H, D = q.shape
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
    """(Pos, InvFreq, Axis, stride_pa, stride_pt, ROPE); dummies pointing at q when rotary is off."""
    if position_ids is None:
        return q, q, q, 0, 0, False
    inv, axis = _freq_tables(q.shape[-1], tuple(int(s) for s in mrope_section), bool(mrope_interleaved),
                             float(rope_theta), q.device)
    return position_ids, inv, axis, position_ids.stride(0), position_ids.stride(1), True


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would be a silent precision drop); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def prefix_lm_attention_forward(
    q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
    softmax_scale, max_seqlen,
):
    """Run the fused forward. Returns ``(out, out_ungated, lse)``: out ``(T, H, D)`` in q's dtype;
    out_ungated the same before the gate (an empty tensor when there is no gate); lse ``(H, T)`` fp32, base 2."""
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    out_u = torch.empty((T, H, D), dtype=q.dtype, device=q.device) if gate is not None else q.new_empty(0)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if T == 0 or H == 0:
        return out, out_u, lse
    num_samples = prefix_lens.numel()
    g = gate if gate is not None else q
    gst = _gate_strides(gate)
    pos, inv, axis, spa, spt, rope = _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
    ou = out_u if gate is not None else out

    def grid(meta):
        return (max(1, triton.cdiv(max_seqlen, meta["BLOCK_M"])), num_samples + 1, H)

    _launch(
        "fwd", grid,
        q, k, v, g, out, ou, lse, cu_seqlens, prefix_lens, pos, inv, axis,
        *q.stride(), *k.stride(), *v.stride(), *gst, *out.stride(),
        lse.stride(0), spa, spt,
        T, num_samples, softmax_scale * _LOG2E,
        HEAD_DIM=D, BLOCK_HALF=_block_half(D), BLOCK_D=triton.next_power_of_2(D),
        GATE_MODE=_gate_mode(gate), ROPE=rope, DOT_PREC=_dot_prec(q.dtype), fp32=q.dtype == torch.float32,
    )
    return out, out_u, lse


def prefix_lm_attention_backward(
    dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved,
    rope_theta, softmax_scale, max_seqlen,
):
    """Gradients ``(dq, dk, dv, dgate)``; ``out_u`` is the ungated forward output (the output itself when there is
    no gate); dgate is an empty tensor when there is no gate."""
    T, H, D = q.shape
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((T, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((T, H, D), dtype=v.dtype, device=q.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=q.device) if gate is not None else q.new_empty(0)
    if T == 0 or H == 0:
        return dq, dk, dv, dgate
    if dout.shape != (T, H, D):
        raise ValueError(f"grad_out must be {(T, H, D)}, got {tuple(dout.shape)}")
    num_samples = prefix_lens.numel()
    mode = _gate_mode(gate)
    block_d = triton.next_power_of_2(D)
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    # With a gate the attention backward runs on dO * sigmoid(g), written once here; without one it reads dO.
    dou = torch.empty((T, H, D), dtype=dout.dtype, device=q.device) if gate is not None else dout
    g = gate if gate is not None else q
    dg = dgate if gate is not None else q
    dgst = _gate_strides(dgate) if gate is not None else (0, 0, 0)
    bm = INTERPRETER_CONFIGS["pre"]["BLOCK_M"] if interpreting() else max(16, 4096 // block_d)
    kernels._prefix_lm_attn_bwd_preprocess_kernel[(triton.cdiv(T, bm), H)](
        dout, out_u, g, dou, delta, dg,
        *dout.stride(), *out_u.stride(), *_gate_strides(gate), *dgst, *dou.stride(),
        delta.stride(0), T,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=bm, GATE_MODE=mode,
    )
    pos, inv, axis, spa, spt, rope = _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
    common = dict(HEAD_DIM=D, BLOCK_HALF=_block_half(D), BLOCK_D=block_d, ROPE=rope, DOT_PREC=_dot_prec(q.dtype),
                  fp32=q.dtype == torch.float32)

    def grid_n(meta):
        return (max(1, triton.cdiv(max_seqlen, meta["BLOCK_N"])), num_samples + 1, H)

    def grid_m(meta):
        return (max(1, triton.cdiv(max_seqlen, meta["BLOCK_M"])), num_samples + 1, H)

    _launch(
        "dkdv", grid_n,
        q, k, v, dou, lse, delta, dk, dv, cu_seqlens, prefix_lens, pos, inv, axis,
        *q.stride(), *k.stride(), *v.stride(), *dou.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), spa, spt,
        T, num_samples, softmax_scale * _LOG2E, softmax_scale,
        **common,
    )
    _launch(
        "dq", grid_m,
        q, k, v, dou, lse, delta, dq, cu_seqlens, prefix_lens, pos, inv, axis,
        *q.stride(), *k.stride(), *v.stride(), *dou.stride(), *dq.stride(),
        lse.stride(0), spa, spt,
        T, num_samples, softmax_scale * _LOG2E, softmax_scale,
        **common,
    )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return prefix_lm_attention_forward(
        q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
        softmax_scale, max_seqlen,
    )


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
              softmax_scale, max_seqlen):
    T, H, D = q.shape
    out_u = q.new_empty((T, H, D)) if gate is not None else q.new_empty(0)
    return q.new_empty((T, H, D)), out_u, q.new_empty((H, T), dtype=torch.float32)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return prefix_lm_attention_backward(
        dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved,
        rope_theta, softmax_scale, max_seqlen,
    )


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out_u, lse, cu_seqlens, prefix_lens, gate, position_ids, mrope_section,
              mrope_interleaved, rope_theta, softmax_scale, max_seqlen):
    T, H, D = q.shape
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)
    return q.new_empty((T, H, D)), k.new_empty((T, H, D)), v.new_empty((T, H, D)), dgate


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved, rope_theta,
     softmax_scale, max_seqlen) = inputs
    out, out_u, lse = output
    # The backward needs the ungated output; without a gate that is the output itself.
    saved_out = out_u if gate is not None else out
    ctx.save_for_backward(q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids)
    ctx.rope = (mrope_section, mrope_interleaved, rope_theta)
    ctx.softmax_scale = softmax_scale
    ctx.max_seqlen = max_seqlen
    ctx.mark_non_differentiable(out_u, lse)


def _backward(ctx, dout, _dout_u, _dlse):
    q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids = ctx.saved_tensors
    section, interleaved, theta = ctx.rope
    dq, dk, dv, dgate = _bwd_op(
        dout, q, k, v, saved_out, lse, cu_seqlens, prefix_lens, gate, position_ids, section, interleaved, theta,
        ctx.softmax_scale, ctx.max_seqlen,
    )
    return dq, dk, dv, None, None, (dgate if gate is not None else None), None, None, None, None, None, None


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
    costs one device-to-host sync.
    """
    _check_inputs(q, k, v, cu_seqlens, prefix_lens, gate, position_ids, mrope_section, mrope_interleaved)
    D = q.shape[-1]
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    if max_seqlen is None:
        n = cu_seqlens.numel() - 1
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if n > 0 else 0
    section = None if position_ids is None else [int(s) for s in mrope_section]
    out, _, _ = _fwd_op(
        q, k, v, cu_seqlens, prefix_lens, gate, position_ids, section, bool(mrope_interleaved), float(rope_theta),
        scale, int(max_seqlen),
    )
    return out


__all__ = ["prefix_lm_attention_forward", "prefix_lm_attention_backward", "prefix_lm_attention_triton"]

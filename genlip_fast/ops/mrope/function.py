"""Host side of the standalone Triton MRoPE: launcher, custom op (so ``torch.compile`` sees one op) and autograd.

The rotation is orthogonal, so the backward is the same kernel with the transposed rotation (``INVERSE``).
No ``from __future__ import annotations`` here: ``custom_op`` reads the schema from the real annotations.
"""

import functools
from collections.abc import Sequence

import torch
import triton

from .._dispatch import interpreting
from . import kernels
from .positions import mrope_freq_table

_BLOCK_T_INTERPRETER = 32


@functools.lru_cache(maxsize=64)
def _freq_tables(head_dim: int, section: tuple, interleaved: bool, theta: float, device: torch.device):
    # Cached per device: building them is a host-to-device copy, which would stall the stream on every call.
    return mrope_freq_table(head_dim, section, interleaved, theta, device=device)


def apply_mrope_forward(x: torch.Tensor, position_ids: torch.Tensor, mrope_section: Sequence[int],
                        interleaved: bool, theta: float, inverse: bool = False) -> torch.Tensor:
    """``R x`` (``R^T x`` when ``inverse``) for ``x`` ``(T, H, D)`` with any strides; returns a contiguous tensor
    in x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"x must be (T, H, D), got {tuple(x.shape)}")
    T, H, D = x.shape
    if D % 2:
        raise ValueError(f"rotary needs an even head_dim, got {D}")
    if position_ids.shape != (3, T) or position_ids.dtype.is_floating_point:
        raise ValueError(f"position_ids must be (3, {T}) integer, got {tuple(position_ids.shape)} {position_ids.dtype}")
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return y
    inv, axis = _freq_tables(D, tuple(int(s) for s in mrope_section), bool(interleaved), float(theta), x.device)
    half = max(1, triton.next_power_of_2(D // 2))
    block_t = _BLOCK_T_INTERPRETER if interpreting() else max(1, min(128, 4096 // half))
    kernels._apply_mrope_kernel[(triton.cdiv(T, block_t), H)](
        x, y, position_ids, inv, axis, *x.stride(), *y.stride(), position_ids.stride(0), position_ids.stride(1), T,
        HEAD_DIM=D, BLOCK_HALF=half, BLOCK_T=block_t, INVERSE=inverse,
        num_warps=4,
    )
    return y


@torch.library.custom_op("genlip_fast::apply_mrope", mutates_args=())
def _mrope_op(x: torch.Tensor, position_ids: torch.Tensor, mrope_section: list[int], interleaved: bool,
              theta: float, inverse: bool) -> torch.Tensor:
    return apply_mrope_forward(x, position_ids, mrope_section, interleaved, theta, inverse)


@_mrope_op.register_fake
def _mrope_fake(x, position_ids, mrope_section, interleaved, theta, inverse):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, position_ids, mrope_section, interleaved, theta, inverse = inputs
    ctx.save_for_backward(position_ids)
    ctx.args = (mrope_section, interleaved, theta, inverse)


def _backward(ctx, dy):
    (position_ids,) = ctx.saved_tensors
    section, interleaved, theta, inverse = ctx.args
    return _mrope_op(dy, position_ids, section, interleaved, theta, not inverse), None, None, None, None, None


_mrope_op.register_autograd(_backward, setup_context=_setup_context)


def apply_mrope_triton(x: torch.Tensor, position_ids: torch.Tensor, mrope_section: Sequence[int], *,
                       interleaved: bool = True, theta: float = 10000.0) -> torch.Tensor:
    """Triton path of :func:`genlip_fast.ops.mrope.apply_mrope`: ``x * cos + rotate_half(x) * sin``, differentiable.

    ``x``: ``(T, H, D)`` fp16/bf16/fp32, any strides; ``position_ids``: ``(3, T)`` int; returns ``(T, H, D)`` in
    x's dtype (computed in fp32)."""
    return _mrope_op(x, position_ids, [int(s) for s in mrope_section], bool(interleaved), float(theta), False)


__all__ = ["apply_mrope_forward", "apply_mrope_triton"]

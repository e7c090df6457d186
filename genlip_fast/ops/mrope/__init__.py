"""Multimodal rotary position embedding (MRoPE): positions, frequency tables and the standalone rotation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._dispatch import resolve_impl
from .positions import (
    mrope_axis_map,
    mrope_cos_sin,
    mrope_freq_table,
    mrope_inv_freq,
    mrope_position_ids,
    sample_position_ids,
)


def apply_mrope(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    mrope_section: Sequence[int],
    *,
    interleaved: bool = True,
    theta: float = 10000.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Rotate ``x`` ``(T, H, D)`` by MRoPE positions ``(3, T)`` (rotate-half convention); returns x's dtype.

    ``mrope_section`` ``(s_t, s_h, s_w)`` sums to ``D // 2``. The fused attention rotates q and k itself; use this
    when a model needs rotated tensors of its own.
    """
    which = resolve_impl(impl, x)
    if which == "reference":
        from .reference import apply_mrope_reference

        return apply_mrope_reference(x, position_ids, mrope_section, interleaved, theta)
    from .function import apply_mrope_triton

    return apply_mrope_triton(x, position_ids, mrope_section, interleaved=interleaved, theta=theta)


__all__ = [
    "apply_mrope",
    "mrope_axis_map",
    "mrope_cos_sin",
    "mrope_freq_table",
    "mrope_inv_freq",
    "mrope_position_ids",
    "sample_position_ids",
]

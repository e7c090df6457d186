"""Plain-PyTorch MRoPE: the correctness oracle for the fused rotation. Runs anywhere, imports no Triton."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .positions import mrope_cos_sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_mrope_reference(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    mrope_section: Sequence[int],
    interleaved: bool = True,
    theta: float = 10000.0,
) -> torch.Tensor:
    """Rotate ``x`` ``(T, H, D)`` by MRoPE positions ``(3, T)``: ``x * cos + rotate_half(x) * sin``.

    Computed in float32 and returned in ``x.dtype`` (what the fused kernels do in registers).
    """
    cos, sin = mrope_cos_sin(position_ids, x.shape[-1], mrope_section, interleaved, theta)
    xf = x.float()
    return (xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]).to(x.dtype)

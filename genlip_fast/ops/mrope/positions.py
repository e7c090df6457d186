"""MRoPE position ids and frequency tables, shared by every implementation.

Nothing here is an oracle: the Triton kernels, the model and the packer all read these tables, so they live apart
from ``reference.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "mrope_axis_map",
    "mrope_inv_freq",
    "mrope_cos_sin",
    "mrope_freq_table",
    "sample_position_ids",
    "mrope_position_ids",
]


def _check_section(head_dim: int, mrope_section: Sequence[int], interleaved: bool) -> tuple[int, int, int]:
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    section = tuple(int(s) for s in mrope_section)
    if len(section) != 3 or min(section) < 0:
        raise ValueError(f"mrope_section must be three non-negative ints (t, h, w), got {mrope_section!r}")
    # Chunked runs must tile the frequencies exactly. Interleaved sections only bound where h and w stop
    # (g/16 uses (16, 16, 16) with 32 frequencies: h and w then take every i = 1, 2 mod 3).
    if not interleaved and sum(section) != head_dim // 2:
        raise ValueError(f"chunked mrope_section {section} must sum to head_dim // 2 = {head_dim // 2}")
    return section  # type: ignore[return-value]


def mrope_axis_map(head_dim: int, mrope_section: Sequence[int], interleaved: bool = True) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each rotary frequency.

    Returns ``(head_dim // 2,)`` int64.

    * interleaved (the authors' layout): frequency ``i`` takes ``h`` when ``i % 3 == 1 and i < 3 * s_h``, ``w`` when
      ``i % 3 == 2 and i < 3 * s_w``, ``t`` otherwise;
    * chunked (Qwen2-VL): the first ``s_t`` frequencies take ``t``, the next ``s_h`` take ``h``, the last ``s_w`` ``w``.
    """
    s_t, s_h, s_w = _check_section(head_dim, mrope_section, interleaved)
    n = head_dim // 2
    i = torch.arange(n)
    if interleaved:
        axis = torch.zeros(n, dtype=torch.int64)
        axis[(i % 3 == 1) & (i < 3 * s_h)] = 1
        axis[(i % 3 == 2) & (i < 3 * s_w)] = 2
        return axis
    return torch.cat([torch.full((s_t,), 0), torch.full((s_h,), 1), torch.full((s_w,), 2)]).to(torch.int64)


def mrope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim // 2``, float32 — the usual RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).to(torch.float32)


def mrope_freq_table(
    head_dim: int,
    mrope_section: Sequence[int],
    interleaved: bool = True,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inv_freq float32, axis int32)``, both ``(head_dim // 2,)``: what a kernel needs to rotate on the fly."""
    inv = mrope_inv_freq(head_dim, theta)
    axis = mrope_axis_map(head_dim, mrope_section, interleaved).to(torch.int32)
    return inv.to(device), axis.to(device)


def mrope_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    mrope_section: Sequence[int],
    interleaved: bool = True,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for rotate-half rotary, each ``(T, head_dim)`` float32.

    ``position_ids``: ``(3, T)`` integer positions (t, h, w). Angle of frequency ``i`` at token ``n`` is
    ``position_ids[axis[i], n] * inv_freq[i]``; the two halves of the head share the frequencies (rotate-half).
    """
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, T), got {tuple(position_ids.shape)}")
    inv, axis = mrope_freq_table(head_dim, mrope_section, interleaved, theta, device=position_ids.device)
    pos = position_ids.to(torch.float32)[axis.long()]  # (D/2, T): each frequency's own axis
    freqs = pos.t() * inv  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def sample_position_ids(grid_h: int, grid_w: int, num_text: int) -> torch.Tensor:
    """Positions of one sample ``[image patches (row-major grid) | text]``, ``(3, grid_h * grid_w + num_text)`` int64.

    Image token at grid (h, w) -> (0, h, w); text token j -> (p, p, p) with ``p = max(grid_h, grid_w) + j``.
    A text-only sample (grid 0 x 0) starts its text at 0.
    """
    if grid_h < 0 or grid_w < 0 or num_text < 0:
        raise ValueError(f"negative grid or text length: grid=({grid_h}, {grid_w}) text={num_text}")
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    img = torch.stack([torch.zeros(grid_h * grid_w, dtype=torch.int64), hh.reshape(-1), ww.reshape(-1)])
    p = max(grid_h, grid_w) + torch.arange(num_text)
    return torch.cat([img, p.expand(3, num_text)], dim=1)


def mrope_position_ids(grid_hw: Sequence[tuple[int, int]], text_lens: Sequence[int]) -> torch.Tensor:
    """Packed positions for several samples laid end to end, ``(3, sum(h * w + L))`` int64."""
    if len(grid_hw) != len(text_lens):
        raise ValueError("grid_hw and text_lens must have one entry per sample")
    parts = [sample_position_ids(h, w, n) for (h, w), n in zip(grid_hw, text_lens)]
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64)

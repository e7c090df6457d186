"""MRoPE position ids and frequency layouts (foundation)."""

import pytest
import torch

from genlip_fast.ops.mrope import mrope_axis_map, mrope_cos_sin, mrope_position_ids, sample_position_ids
from genlip_fast.ops.mrope.reference import apply_mrope_reference


def test_3x4_grid_then_5_caption_tokens_exact_table():
    got = sample_position_ids(3, 4, 5)
    expected = torch.tensor([
        # 12 image tokens, row-major over the 3x4 grid            | text: p = max(3, 4) + j
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 5, 6, 7, 8],  # t
        [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 4, 5, 6, 7, 8],  # h
        [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8],  # w
    ])
    assert got.shape == (3, 17)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("interleaved", [True, False])
def test_3x4_grid_angles_follow_the_layout(interleaved):
    """For both layouts, every frequency's angle is its own axis' position times its inverse frequency."""
    pos = sample_position_ids(3, 4, 5)
    D, section = 16, (2, 3, 3)
    cos, sin = mrope_cos_sin(pos, D, section, interleaved)
    axis = mrope_axis_map(D, section, interleaved)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angle = pos[axis].t().double() * inv  # (17, 8)
    assert torch.allclose(cos[:, : D // 2].double(), angle.cos(), atol=1e-6)
    assert torch.allclose(cos[:, D // 2 :].double(), angle.cos(), atol=1e-6)  # rotate-half: halves share angles
    assert torch.allclose(sin[:, : D // 2].double(), angle.sin(), atol=1e-6)
    # text tokens: all three axes agree, so the rotation is plain 1-D RoPE at p = 4 + j
    assert torch.allclose(angle[12:], (4 + torch.arange(5)).double()[:, None] * inv)


def test_axis_maps_exact():
    # interleaved, So/16 sections: t, h, w in turn
    assert mrope_axis_map(72, (12, 12, 12), True).tolist() == [0, 1, 2] * 12
    # interleaved, L/16 sections (8, 12, 12) over 32 frequencies: h at 1,4,..,31; w at 2,5,..,29; t elsewhere
    assert mrope_axis_map(64, (8, 12, 12), True).tolist() == ([0, 1, 2] * 11)[:32]
    # interleaved bounds stop h and w early
    assert mrope_axis_map(16, (4, 2, 2), True).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    # chunked (Qwen2-VL): contiguous runs
    assert mrope_axis_map(16, (2, 3, 3), False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    # g/16: (16, 16, 16) over 32 frequencies is allowed in the interleaved layout
    assert mrope_axis_map(64, (16, 16, 16), True).tolist() == ([0, 1, 2] * 11)[:32]
    with pytest.raises(ValueError, match="must sum"):
        mrope_axis_map(64, (16, 16, 16), False)
    with pytest.raises(ValueError, match="even head_dim"):
        mrope_axis_map(63, (8, 12, 12), True)


def test_packed_positions_restart_per_sample_and_text_only_starts_at_zero():
    pos = mrope_position_ids([(2, 2), (0, 0)], [3, 2])
    assert pos.shape == (3, 9)
    assert pos[:, 4:7].tolist() == [[2, 3, 4]] * 3
    assert pos[:, 7:].tolist() == [[0, 1]] * 3


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotation_is_relative_for_text_positions(interleaved):
    """Scores of rotated q, k depend only on the position difference (and rotation keeps norms)."""
    torch.manual_seed(0)
    D = 24
    q, k = torch.randn(1, 1, D, dtype=torch.float64), torch.randn(1, 1, D, dtype=torch.float64)

    def rot(x, p):
        return apply_mrope_reference(x, torch.full((3, 1), p), (4, 4, 4), interleaved)

    s1 = (rot(q, 7) * rot(k, 3)).sum()
    s2 = (rot(q, 14) * rot(k, 10)).sum()
    assert torch.allclose(s1, s2)
    assert torch.allclose(rot(q, 5).norm(), q.norm())

"""Standalone Triton MRoPE (CPU interpreter here) vs the PyTorch reference: values and gradient."""

import pytest
import torch

from conftest import error_bound_ok
from genlip_fast.ops.mrope import apply_mrope, mrope_position_ids
from genlip_fast.ops.mrope.reference import apply_mrope_reference


def _inputs(head_dim, dtype, strided=False, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = mrope_position_ids([(7, 9), (0, 0), (3, 5)], [11, 6, 0])
    T = pos.shape[1]
    H = 3
    if strided:  # a slice of a wider projection, heads and tokens both strided
        x = torch.randn(T, H, 2 * head_dim + 4, generator=g).to(dtype)[..., 3 : 3 + head_dim]
    else:
        x = torch.randn(T, H, head_dim, generator=g).to(dtype)
    return x, pos


@pytest.mark.parametrize("head_dim,section,interleaved", [
    (64, (8, 12, 12), True), (72, (12, 12, 12), True), (128, (16, 24, 24), False), (96, (16, 16, 16), False),
    (64, (16, 16, 16), True),
])
def test_fp32_matches_reference(head_dim, section, interleaved):
    x, pos = _inputs(head_dim, torch.float32, strided=head_dim == 72)
    x.requires_grad_()
    y = apply_mrope(x, pos, section, interleaved=interleaved, impl="triton")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().clone().requires_grad_()
    yr = apply_mrope_reference(xr, pos, section, interleaved)
    (dxr,) = torch.autograd.grad(yr, xr, dy)
    torch.testing.assert_close(y, yr, rtol=0, atol=2e-6)
    torch.testing.assert_close(dx, dxr, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowp_within_bound(dtype):
    # bf16 is fine here: no tl.dot in this kernel, only elementwise math in fp32.
    x, pos = _inputs(72, dtype, strided=True)
    y = apply_mrope(x, pos, (12, 12, 12), impl="triton")
    assert y.dtype == dtype
    ref32 = apply_mrope_reference(x.float(), pos, (12, 12, 12))
    lowp = apply_mrope_reference(x, pos, (12, 12, 12))
    ok, msg = error_bound_ok(y, ref32, lowp, atol=1e-5)
    assert ok, msg


def test_large_positions_trig_accuracy():
    # Far text positions exercise the kernel's own sin/cos range reduction (no libdevice).
    T = 257
    pos = torch.stack([torch.arange(T) * 37, torch.arange(T) * 11, torch.arange(T) * 3 + 5000])
    x = torch.randn(T, 1, 64, dtype=torch.float32)
    y = apply_mrope(x, pos, (16, 8, 8), impl="triton")
    torch.testing.assert_close(y, apply_mrope_reference(x, pos, (16, 8, 8)), rtol=0, atol=5e-6)


def test_compile_fullgraph():
    x, pos = _inputs(64, torch.float32)
    f = torch.compile(lambda t: apply_mrope(t, pos, (8, 12, 12), impl="triton") * 2, backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x), 2 * apply_mrope_reference(x, pos, (8, 12, 12)), rtol=0, atol=4e-6)

"""Host side of the fused LM head + cross entropy: launchers, the ``torch.library`` op pair and its autograd.

``linear_cross_entropy_forward`` returns per-row losses and the per-row logsumexp; ``linear_cross_entropy_backward``
turns an upstream per-row gradient into ``(dhidden, dweight, dbias)``. Both are registered as custom ops
(``genlip_fast::linear_ce_fwd`` / ``genlip_fast::linear_ce_bwd``) with fake implementations and the backward wired
through ``register_autograd``, so ``torch.compile`` sees one opaque op and never traces into the launchers. The
reduction (sum / mean over non-ignored rows) is plain tensor arithmetic on the per-row losses, on device, so no
value is ever read back to the host.

Memory: the forward keeps 3 fp32 numbers per (row, vocab split) and 2 per row; the backward one
``(N, chunk)`` workspace in the input dtype (at most ``_BWD_WORKSPACE_BYTES``), an fp32 ``(N, D)`` accumulator for
``dH`` and the gradients themselves.
"""

from __future__ import annotations

import functools

import torch
import triton

from .._dispatch import interpreting
from .kernels import _lce_bwd_dlogits_kernel, _lce_combine_kernel, _lce_fwd_kernel

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Vocab split width of the forward: 151,936 / 2,048 = 75 splits, times 35 row blocks of 128 for 4,400 rows gives
# ~2,600 programs, enough to fill 132 SMs many times over while each program still runs 16 vocab tiles.
# Independent of the tile config, so the partial buffers can be sized before the autotuner picks one.
_CHUNK_V_GPU = 2048
# Backward workspace cap: at 4,400 rows of bf16 that is a 7,424-wide vocab chunk (21 chunks for 151,936), large
# enough for the dH / dW matmuls to run near peak, small enough to stay far below the logits' 1.3 GB.
_BWD_WORKSPACE_BYTES = 64 * 2**20
_COMBINE_BLOCK = 128

# The interpreter runs one small config: small tiles and narrow splits / chunks so that CPU tests at V ~ 1,000
# exercise many splits, many backward chunks and ragged edges, while keeping the number of programs low.
_INTERP_META = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32)
_CHUNK_V_INTERP = 128
_BWD_CHUNK_INTERP = 256


def _gpu_configs() -> list[triton.Config]:
    """Tile configs for sm_90, checked by tests/test_linear_ce_compile_sm90.py to compile without register spills.

    Half types: wgmma tiles of 128 vocab x 64 channels. Every half config shares BLOCK_V and BLOCK_D, so each
    logit is accumulated and each row reduced in the same order whichever one the autotuner picks (results do not
    depend on the timing race). Wider vocab tiles (256) spilled registers in the softmax epilogue. fp32 runs
    exact fp32 FMA products (no tensor cores) with one small tile.
    """
    half = dict(BLOCK_V=128, BLOCK_D=64)
    return [
        triton.Config(dict(BLOCK_N=128, **half), num_warps=8, num_stages=3),
        triton.Config(dict(BLOCK_N=128, **half), num_warps=8, num_stages=4),
        triton.Config(dict(BLOCK_N=64, **half), num_warps=4, num_stages=4),
        triton.Config(dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32), num_warps=4, num_stages=3),
    ]


def _configs_for_dtype(configs, named_args, **kwargs):
    fp32 = named_args["H"].dtype == torch.float32
    return [c for c in configs if (c.kwargs["BLOCK_D"] == 32) == fp32]


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    """GPU kernels wrapped in a small autotune keyed on D (the autotuner adds the tensors' dtypes to the key),
    never on N, so a new batch size never re-tunes."""
    kernel = {"fwd": _lce_fwd_kernel, "bwd": _lce_bwd_dlogits_kernel}[kernel_name]
    return triton.autotune(configs=_gpu_configs(), key=["D"],
                           prune_configs_by=dict(early_config_prune=_configs_for_dtype))(kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (TF32 would be ~1e-3 off the fp32 reference); half types ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(hidden, weight, targets, bias, softcap=None) -> None:
    """Raise a clear error for inputs the kernels cannot take. Targets are not range-checked (that would need a
    device-to-host read): a target outside ``[0, V)`` that is not ``ignore_index`` gives loss ``logsumexp``."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (N, d) and weight (V, d), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, d={hidden.shape[1]}) and weight (V, d={weight.shape[1]}) disagree on d")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocab row")
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype of {_DTYPES}, got {hidden.dtype} and {weight.dtype}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be ({hidden.shape[0]},) int64, got {tuple(targets.shape)} {targets.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    tensors = [hidden, weight, targets] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {[str(t.device) for t in tensors]}")


def linear_cross_entropy_forward(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    """Per-row losses ``(N,)`` float32 (0 on ignored rows) and per-row logsumexp ``(N,)`` float32."""
    _check_inputs(hidden, weight, targets, bias, softcap)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    losses = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if N == 0:
        return losses, lse
    chunk_v = _CHUNK_V_INTERP if interpreting() else _CHUNK_V_GPU
    splits = triton.cdiv(V, chunk_v)
    parts = torch.empty(3, splits, N, dtype=torch.float32, device=dev)
    m_part, s_part, z_part = parts[0], parts[1], parts[2]
    b = bias if bias is not None else hidden  # never read when HAS_BIAS is False
    args = (hidden, weight, b, targets, m_part, s_part, z_part, N, V, D, float(softcap or 1.0),
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    flags = dict(CHUNK_V=chunk_v, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                 DOT_PRECISION=_dot_precision(hidden.dtype))
    if interpreting():
        _lce_fwd_kernel[(triton.cdiv(N, _INTERP_META["BLOCK_N"]), splits)](*args, **flags, **_INTERP_META)
    else:
        _tuned("fwd")[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](*args, **flags)
    _lce_combine_kernel[(triton.cdiv(N, _COMBINE_BLOCK),)](
        m_part, s_part, z_part, targets, losses, lse, N, splits, ignore_index, BLOCK=_COMBINE_BLOCK)
    return losses, lse


def linear_cross_entropy_backward(grad_losses, hidden, weight, targets, lse, bias=None, ignore_index=-100,
                                  softcap=None, need_dweight=True):
    """``(dhidden, dweight, dbias)`` for upstream per-row gradient ``grad_losses (N,)`` and the forward's ``lse``.

    dbias is ``(0,)`` without a bias; dweight is ``(0, d)`` when ``need_dweight`` is False (a frozen head skips its
    matmuls and its weight-sized buffer). Deterministic: every sum runs in a fixed order (no atomics).
    """
    _check_inputs(hidden, weight, targets, bias)
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dweight = torch.empty(V if need_dweight else 0, D, dtype=weight.dtype, device=dev)
    dbias = torch.empty(V if bias is not None else 0, dtype=torch.float32, device=dev)
    if N == 0:
        dweight.zero_()
        dbias.zero_()
        return torch.zeros_like(hidden), dweight, dbias.to(weight.dtype)
    # Ignored rows carry no loss: their gradient is 0 whatever arrives for them (where, not *, so a NaN there
    # cannot leak in).
    g = torch.where(targets != ignore_index, grad_losses.float(), 0.0).contiguous()
    if interpreting():
        chunk = _BWD_CHUNK_INTERP
    else:
        chunk = max(256, _BWD_WORKSPACE_BYTES // (N * hidden.element_size()) // 256 * 256)
    chunk = min(chunk, V)
    workspace = torch.empty(N, chunk, dtype=hidden.dtype, device=dev)
    dhidden_acc = torch.zeros(N, D, dtype=torch.float32, device=dev)
    b = bias if bias is not None else hidden
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                 DOT_PRECISION=_dot_precision(hidden.dtype))
    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        dz = workspace[:, : v_hi - v_lo]
        args = (hidden, weight, b, targets, lse, g, dz, N, D, v_lo, v_hi, float(softcap or 1.0),
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), dz.stride(1))
        if interpreting():
            grid = (triton.cdiv(N, _INTERP_META["BLOCK_N"]), triton.cdiv(v_hi - v_lo, _INTERP_META["BLOCK_V"]))
            _lce_bwd_dlogits_kernel[grid](*args, **flags, **_INTERP_META)
        else:
            _tuned("bwd")[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(v_hi - v_lo, meta["BLOCK_V"]))](
                *args, **flags)
        # Products in the input dtype with fp32 accumulation, as the eager LM head does. dH is a sum over chunks:
        # each chunk's product is added in fp32 and never rounded to half precision on the way (the chunks'
        # partial sums are larger than their total, since softmax - onehot sums to 0, so rounding each one would
        # cost several times the error of eager's single rounding).
        w_chunk = weight[v_lo:v_hi]
        if dz.dtype == torch.float32:
            dhidden_acc.addmm_(dz, w_chunk)
        elif dz.is_cuda:
            dhidden_acc = torch.addmm(dhidden_acc, dz, w_chunk, out_dtype=torch.float32)
        else:
            # CPU (interpreter) has no mixed-dtype addmm; half products are exact in fp32, so this is the same sum.
            dhidden_acc.addmm_(dz.float(), w_chunk.float())
        if need_dweight:
            torch.mm(dz.t(), hidden, out=dweight[v_lo:v_hi])
        if bias is not None:
            torch.sum(dz, dim=0, dtype=torch.float32, out=dbias[v_lo:v_hi])
    return dhidden_acc.to(hidden.dtype), dweight, dbias.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# torch.library registration: one forward op, one backward op, autograd between them.


@torch.library.custom_op("genlip_fast::linear_ce_fwd", mutates_args=())
def _linear_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      bias: torch.Tensor | None, ignore_index: int,
                      softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_forward(hidden, weight, targets, bias, ignore_index, softcap)


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, targets, bias, ignore_index, softcap):
    _check_inputs(hidden, weight, targets, bias)
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("genlip_fast::linear_ce_bwd", mutates_args=())
def _linear_ce_bwd_op(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      targets: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None, ignore_index: int,
                      softcap: float | None, need_dweight: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_backward(grad_losses, hidden, weight, targets, lse, bias, ignore_index, softcap,
                                         need_dweight)


@_linear_ce_bwd_op.register_fake
def _(grad_losses, hidden, weight, targets, lse, bias, ignore_index, softcap, need_dweight):
    nb = weight.shape[0] if bias is not None else 0
    nw = weight.shape[0] if need_dweight else 0
    return torch.empty_like(hidden), weight.new_empty(nw, weight.shape[1]), weight.new_empty(nb)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, softcap = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse)
    ctx.ignore_index = ignore_index
    ctx.softcap = softcap
    ctx.has_bias = bias is not None


def _backward(ctx, grad_losses, grad_lse):
    # lse is an auxiliary output for the backward only; a gradient flowing into it is not supported.
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    if grad_losses is None:
        grad_losses = torch.zeros_like(lse)
    need_dweight = ctx.needs_input_grad[1]
    dh, dw, db = _linear_ce_bwd_op(grad_losses, hidden, weight, targets, lse, bias, ctx.ignore_index, ctx.softcap,
                                   need_dweight)
    return dh, (dw if need_dweight else None), None, (db if ctx.has_bias else None), None, None


_linear_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_triton(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                                softcap=None):
    """Fused LM head + cross entropy (see ``genlip_fast.ops.linear_cross_entropy`` for the contract)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_inputs(hidden, weight, targets, bias, softcap)
    losses, _ = _linear_ce_fwd_op(hidden, weight, targets, bias, int(ignore_index),
                                  None if softcap is None else float(softcap))
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    # On device: no .item(), and 0 (not NaN) when every row is ignored.
    return total / (targets != ignore_index).sum().clamp(min=1)

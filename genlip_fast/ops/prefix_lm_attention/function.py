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

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
import triton

from .._dispatch import interpreting
from ..mrope.kernels import _apply_mrope_kernel
from ..mrope.positions import mrope_freq_table
from . import kernels, kernels_bwd
from .variants import Variant, current_variant, parse_variant

_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Block sizes under the CPU interpreter: one config (autotuning with several fails there). Small enough that the
# masked / unmasked / tail stages all occur on test-sized samples. Tests may patch this dict.
INTERPRETER_CONFIGS = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=32),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
    "dq": dict(BLOCK_M=32, BLOCK_N=16),
    "onepass": dict(BLOCK_M=16, BLOCK_N=32),
    "pre": dict(BLOCK_M=64),
    "rope": dict(BLOCK_T=32),
}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU machine, by head layout (``layout_class``): registers
# go to the fp32 accumulators (head width x tile rows / threads), so what fits depends on the padded width. Every
# entry compiles for sm_90 without register spills, within 227 KiB of shared memory
# (tests/test_attention_compile_sm90.py, for every variant). The autotune key is the head dim, gate kind, rope flag
# and variant constexprs (plus the tensor dtypes, which Triton adds itself) — never the pack length or max_seqlen,
# so a new pack layout reuses the tuned config.
GPU_CONFIGS = {
    # two halves padded to <= 32 each, v/dO <= 64 wide (L/16: D = 64)
    "w64": {
        "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        "dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        "onepass": [(32, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
    },
    # two halves padded to 64 each, v/dO to 128 (So/16's D = 72 by default: 1.78x the tensor work of 72; D = 96,
    # 128): 8 warps for dK/dV, or the accumulators spill
    "w128": {
        "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        "dkdv": [(32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 3)],
        "dq": [(64, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2)],
        "onepass": [(32, 64, 8, 2), (16, 64, 8, 2)],
    },
    # variant hd80: a power-of-two block + a small one (72 -> 64 + 16, 96 -> 64 + 32), q/k plain (rope_once)
    "split": {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)],
        "dkdv": [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        "onepass": [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2)],
    },
    # ... with in-tile rope: q/k as joined half pieces (32 + 32 and 8 + 8), rotated per tile. No 64 x 128 forward
    # tile: Triton 3.9 fails to lower it ("Illegal shared layout"). No onepass: it implies rope_once.
    "split_rope": {
        "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        "dkdv": [(32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (16, 64, 8, 2)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
    },
}
# Variant fit_tiles: tiles that fit ~270-token stage-1 samples, and more stages / warps, on top of the above.
GPU_CONFIGS_FIT = {
    "w64": {
        "fwd": [(64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (64, 64, 8, 3)],
        "dkdv": [(64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2)],
        "dq": [(64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
        "onepass": [(64, 64, 4, 3), (32, 64, 8, 2)],
    },
    "w128": {
        "fwd": [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
        "dkdv": [(16, 64, 8, 3), (32, 32, 8, 2)],
        "dq": [(64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
        "onepass": [(16, 64, 8, 3), (16, 32, 8, 2)],
    },
    "split": {
        "fwd": [(64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        "dkdv": [(64, 64, 8, 2), (32, 64, 8, 2)],
        "dq": [(64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        "onepass": [(16, 64, 8, 2)],
    },
    "split_rope": {
        "fwd": [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2)],
        "dkdv": [(32, 64, 8, 3), (16, 64, 4, 2)],
        "dq": [(64, 64, 8, 2), (64, 64, 4, 3)],
    },
}
# fp32 tiles take twice the shared memory: the 16-bit configs above overflow an H100's 227 KiB.
GPU_CONFIGS_FP32 = {
    "fwd": [(64, 32, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(32, 64, 4, 1), (32, 32, 4, 2)],
    "dq": [(64, 32, 4, 1), (32, 32, 4, 2)],
    "onepass": [(32, 64, 4, 1), (32, 32, 4, 2)],
}
_TUNE_KEYS = ["HEAD_DIM", "ROPE", "SPLIT", "ROW_BOUND", "TILE_LIST", "ALIGN"]
_KERNELS = {
    "fwd": kernels._prefix_lm_attn_fwd_kernel,
    "dkdv": kernels_bwd._prefix_lm_attn_bwd_dkdv_kernel,
    "dq": kernels_bwd._prefix_lm_attn_bwd_dq_kernel,
    "onepass": kernels_bwd._prefix_lm_attn_bwd_onepass_kernel,
    "pre": kernels_bwd._prefix_lm_attn_bwd_preprocess_kernel,
    "rope": _apply_mrope_kernel,
}
# The block size along each kernel's grid axis 0 (the tiles a tile list enumerates), and whether the list runs
# blocks last-to-first: a query block late in a sample sees the most keys, a key block early in it the most queries.
_TILE_AXIS = {"fwd": ("BLOCK_M", True), "dq": ("BLOCK_M", True), "dkdv": ("BLOCK_N", False),
              "onepass": ("BLOCK_N", False)}


# ------------------------------------------------------------------------------------------------- launching


@dataclasses.dataclass
class Launch:
    """One kernel launch as the op would make it: what :func:`capture_launches` records."""

    name: str
    kernel: object  # the @triton.jit function
    grid: Callable[[dict], tuple]
    args: tuple
    consts: dict
    configs: list  # triton.Config candidates (the autotuner's choice on a GPU; one entry = fixed)
    reset: tuple = ()  # outputs an autotuner must zero between trials (atomics)


_CAPTURE: Optional[list] = None


@contextlib.contextmanager
def capture_launches():
    """Record every kernel launch in a list instead of running it (outputs are left unwritten). Used to compile
    exactly what the op launches, without a GPU (``inspect_sm90``) or ahead of timing (the sweep's precompile)."""
    global _CAPTURE
    saved, _CAPTURE = _CAPTURE, []
    try:
        yield _CAPTURE
    finally:
        _CAPTURE = saved


@functools.lru_cache(maxsize=None)
def _autotuner(name: str, configs: tuple, reset: tuple):
    key = _TUNE_KEYS + (["GATE_MODE"] if name == "fwd" else [])
    return triton.autotune(list(configs), key=key, reset_to_zero=list(reset) or None)(_KERNELS[name])


def _run(launch: Launch) -> None:
    if _CAPTURE is not None:
        _CAPTURE.append(launch)
    elif interpreting() or len(launch.configs) == 1:
        cfg = launch.configs[0]
        launch.kernel[launch.grid(cfg.kwargs)](*launch.args, **launch.consts, **cfg.all_kwargs())
    else:
        _autotuner(launch.name, tuple(launch.configs), launch.reset)[launch.grid](*launch.args, **launch.consts)


def layout_class(consts: dict) -> str:
    """Which GPU config table fits a kernel's head layout (``_layout`` plus ``ROPE``): halves of width ``w64`` /
    ``w128`` (wider heads use ``w128`` too: they are outside what the tables are checked for), ``split`` (plain
    64 + 16 blocks) or ``split_rope`` (in-tile rope: joined half pieces, which cost the backward registers)."""
    if consts["SPLIT"]:
        return "split_rope" if consts["ROPE"] else "split"
    return "w64" if max(consts["QK_A"] + consts["QK_B"], consts["V_A"]) <= 64 else "w128"


def gpu_table(name: str, fp32: bool, variant: Variant, layout_cls: str) -> list:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates of attention kernel ``name`` on a GPU."""
    if fp32:
        return list(GPU_CONFIGS_FP32[name])
    table = list(GPU_CONFIGS[layout_cls][name])
    if variant.fit_tiles:
        table += [c for c in GPU_CONFIGS_FIT[layout_cls][name] if c not in table]
    return table


def _configs(name: str, fp32: bool, variant: Variant, layout_cls: str) -> tuple[tuple, tuple]:
    """``(configs, tile blocks)``: triton.Configs for kernel ``name`` (each with the row of its block size in the
    tile list), and the distinct grid-axis block sizes a tile list must cover."""
    if interpreting():  # built per call: tests patch INTERPRETER_CONFIGS
        return _make_configs(name, [dict(INTERPRETER_CONFIGS[name], num_warps=4, num_stages=1)])
    return _gpu_configs(name, fp32, variant, layout_cls)


@functools.lru_cache(maxsize=None)
def _gpu_configs(name: str, fp32: bool, variant: Variant, layout_cls: str) -> tuple[tuple, tuple]:
    # Cached: the autotuner is cached per config tuple, and a triton.Config compares by identity.
    table = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
             for m, n, w, s in gpu_table(name, fp32, variant, layout_cls)]
    return _make_configs(name, table)


def _make_configs(name: str, table: list) -> tuple[tuple, tuple]:
    axis, _ = _TILE_AXIS[name]
    blocks = tuple(sorted({c[axis] for c in table}))
    configs = tuple(triton.Config(dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], TILE_ROW=blocks.index(c[axis])),
                                  num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in table)
    return configs, blocks


def _fixed(name: str, **gpu) -> list:
    """The one config of a non-tuned kernel (preprocess, rotation pass)."""
    kw = INTERPRETER_CONFIGS[name] if interpreting() else gpu
    return [triton.Config(dict(kw), num_warps=4, num_stages=2)]


# ------------------------------------------------------------------------------------------------ tile lists

_TILE_CACHE: dict = {}  # (id(cu_seqlens), version, T, blocks, descending) -> (cu_seqlens, tiles, cap)


def _build_tiles(cu_seqlens: torch.Tensor, total_tokens: int, blocks: tuple, descending: bool, cap: int):
    """Rows ``[total, samples[cap], blocks[cap]]`` (int32, one per block size) of the real (sample, block) tiles:
    samples longest first. Entries past ``total`` are padding programs: sample = num_samples, block = their index
    among them. Device ops with fixed shapes only (no host sync)."""
    n = cu_seqlens.numel() - 1
    dev = cu_seqlens.device
    t = torch.arange(cap, device=dev)
    rows = []
    for b in blocks:
        if n == 0:
            rows.append(torch.cat([t.new_zeros(1), t.new_zeros(cap), t]))
            continue
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        order = torch.sort(lens, descending=True, stable=True).indices
        count = (lens[order] + b - 1) // b
        cum = torch.cumsum(count, 0)
        total = cum[-1:]
        j = torch.searchsorted(cum, t, right=True).clamp(max=n - 1)  # position in the longest-first order
        blk = t - (cum[j] - count[j])
        if descending:
            blk = count[j] - 1 - blk
        real = t < total
        sample = torch.where(real, order[j], n)
        blk = torch.where(real, blk, t - total)
        rows.append(torch.cat([total, sample, blk]))
    return torch.stack(rows).to(torch.int32).contiguous()


def _tile_list(cu_seqlens: torch.Tensor, total_tokens: int, blocks: tuple, descending: bool):
    """``(tiles, cap)`` for a pack, cached while the same ``cu_seqlens`` tensor comes back (every layer of one
    step passes the same one). ``cap`` bounds the tiles of any layout: ``cdiv(T, block) + samples``, plus one
    program that zeroes the padding."""
    n = cu_seqlens.numel() - 1
    cap = triton.cdiv(total_tokens, min(blocks)) + n + 1
    key = (id(cu_seqlens), cu_seqlens._version, total_tokens, blocks, descending)
    hit = _TILE_CACHE.get(key)
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1], cap
    tiles = _build_tiles(cu_seqlens, total_tokens, blocks, descending, cap)
    while len(_TILE_CACHE) >= 16:
        _TILE_CACHE.pop(next(iter(_TILE_CACHE)))
    _TILE_CACHE[key] = (cu_seqlens, tiles)  # holding the tensor keeps its id from being reused
    return tiles, cap


# ---------------------------------------------------------------------------------------------- shared pieces


@functools.lru_cache(maxsize=64)
def _freq_tables(head_dim: int, section: tuple, interleaved: bool, theta: float, device: torch.device):
    # Cached per device: building them is a host-to-device copy, which would stall the stream on every call.
    return mrope_freq_table(head_dim, section, interleaved, theta, device=device)


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _layout(head_dim: int, split: bool, rope: bool) -> dict:
    """Column-block constexprs of the head layout (``kernels.py`` docstring). ``split`` only changes
    non-power-of-two head dims: a power of two is already unpadded as two halves."""
    D, half = head_dim, head_dim // 2
    if not split or D == triton.next_power_of_2(D):
        bh = max(16, triton.next_power_of_2(half))
        return dict(SPLIT=False, QK_A=bh, QK_B=bh, V_A=max(16, triton.next_power_of_2(D)), V_B=16)
    va = _pow2_floor(D)
    vb = max(16, triton.next_power_of_2(D - va))
    if rope:  # each half as a power of two + the rest, joined pairwise: 72 -> (32 + 32) + (4 + 4 -> 8 + 8)
        ha = _pow2_floor(half)
        qa, qb = 2 * ha, 2 * max(8, triton.next_power_of_2(half - ha))
    else:
        qa, qb = va, vb
    return dict(SPLIT=True, QK_A=qa, QK_B=qb, V_A=va, V_B=vb)


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
                dict(HEAD_DIM=D, BLOCK_HALF=half, INVERSE=inverse),
                _fixed("rope", BLOCK_T=max(1, min(128, 4096 // half)))))
    return y


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would be a silent precision drop); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_launch(name: str, variant: Variant, q, cu_seqlens, max_seqlen: int, make_args, consts: dict):
    """Launch one of the tiled attention kernels with the variant's grid: per sample sized for ``max_seqlen``, or
    a tile list. ``make_args(tiles, tile_cap)`` gives the positional arguments."""
    T, H, _ = q.shape
    num_samples = cu_seqlens.numel() - 1
    configs, blocks = _configs(name, q.dtype == torch.float32, variant, layout_class(consts))
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
    rope = _rope_args(q, position_ids, mrope_section, mrope_interleaved, rope_theta)
    in_tile = position_ids is not None
    if in_tile and var.rope_once:
        q_rot = _rotate_into(q, torch.empty((T, H, D), dtype=q.dtype, device=q.device), rope, inverse=False)
        k_rot = _rotate_into(k, torch.empty((T, H, D), dtype=k.dtype, device=q.device), rope, inverse=False)
        q, k, in_tile = q_rot, k_rot, False
    g = gate if gate is not None else q
    ou = out_u if gate is not None else out
    mode = _gate_mode(gate)
    consts = dict(HEAD_DIM=D, **_layout(D, var.hd80, in_tile), GATE_MODE=mode, ROPE=in_tile,
                  DOT_PREC=_dot_prec(q.dtype), ROW_BOUND=var.fit_tiles, TILE_LIST=var.tile_list,
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
    """Gradients ``(dq, dk, dv, dgate)``; ``out_u`` is the ungated forward output (the output itself when there is
    no gate); dgate is an empty tensor when there is no gate. With variant ``rope_once`` (and rotary), q and k are
    the forward's rotated ``q_rot`` and ``k_rot``."""
    var = parse_variant(variant)
    T, H, D = q.shape
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((T, H, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((T, H, D), dtype=v.dtype, device=q.device)
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
                  ROW_BOUND=var.fit_tiles, TILE_LIST=var.tile_list)
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
    rot = (T, H, D) if _saves_rotated(position_ids, variant) and T and H else (0,)
    return (q.new_empty((T, H, D)), out_u, q.new_empty((H, T), dtype=torch.float32), q.new_empty(rot),
            k.new_empty(rot))


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
    return q.new_empty((T, H, D)), k.new_empty((T, H, D)), v.new_empty((T, H, D)), dgate


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
    "capture_launches",
    "gpu_table",
    "prefix_lm_attention_backward",
    "prefix_lm_attention_forward",
    "prefix_lm_attention_triton",
]

"""How the attention kernels are launched: the config tables (per head layout, for the GPU autotuner; one fixed
config under the CPU interpreter), the :class:`Launch` record every launch goes through (so it can be captured
and compiled ahead: ``inspect_sm90``, the sweep's precompile), and the flat tile lists of variant ``tile_list``.
The launchers themselves are in ``function.py``.
"""

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
import triton

from .._dispatch import interpreting
from ..mrope.kernels import _apply_mrope_kernel
from . import kernels, kernels_bwd
from .variants import Variant

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
        "dkdv": [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
        "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        "onepass": [(32, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
    },
    # two halves padded to 64 each, v/dO to 128 (So/16's D = 72 by default: 1.78x the tensor work of 72; D = 96,
    # 128): 8 warps for dK/dV, or the accumulators spill
    "w128": {
        "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
        "dkdv": [(32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 3)],
        "dq": [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3)],
        "onepass": [(32, 64, 8, 2), (16, 64, 8, 2)],
    },
    # variant hd80: a power-of-two block + a 16-wide one (72 -> 64 + 16), q/k plain (rope_once)
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
# Variant fit_tiles: tiles that fit ~270-token stage-1 samples, and more stages / warps, on top of the above. Its
# one-bound-per-row mask keeps a vector live through the loop: the tables above hold with it too.
GPU_CONFIGS_FIT = {
    "w64": {
        "fwd": [(64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (64, 64, 8, 3)],
        "dkdv": [(64, 64, 8, 2), (32, 64, 4, 2)],
        "dq": [(64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
        "onepass": [(32, 64, 8, 2)],
    },
    "w128": {
        "fwd": [(64, 64, 8, 2), (64, 32, 4, 2)],
        "dkdv": [(16, 64, 8, 3)],
        "dq": [(64, 64, 8, 3), (64, 32, 8, 2)],
        "onepass": [(16, 64, 8, 3)],
    },
    "split": {
        "fwd": [(64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        "dkdv": [(64, 64, 8, 2), (32, 64, 8, 2)],
        "dq": [(64, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        "onepass": [],
    },
    "split_rope": {
        "fwd": [(64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 2)],
        "dkdv": [(32, 64, 8, 3), (16, 64, 4, 2)],
        "dq": [(64, 64, 8, 2), (64, 64, 4, 3)],
    },
}
# fp32 uses true fp32 products ("ieee"): FMA-unrolled dots, not tensor cores, so only 16-row tiles fit the registers
# (not a training path: the model trains in bf16). A fifth entry sets ``maxnreg``: without it ptxas caps the 8-warp
# dQ kernel at 128 registers and spills; with it, it uses 157.
GPU_CONFIGS_FP32 = {
    "fwd": [(16, 16, 8, 2), (32, 16, 8, 2)],
    "dkdv": [(16, 16, 8, 1), (16, 32, 8, 1)],
    "dq": [(16, 16, 8, 2, 255)],
    "onepass": [(16, 16, 4, 1)],
}
# Grouped-query attention (GROUP > 1): the key-block kernel also carries the query head through its loop, which
# costs some configs their last registers. Dropped there, for every variant (None) or with one variant part on
# (sm_90 ptxas, 16 query / 8 key-value heads, bf16): at head dim 128, 32x64 w8 s2 at 255 registers spills 28/48 B
# (248 and none with GROUP = 1) and, with tile lists, 32x64 w8 s3 spills 8-16/16-20 B; at 64, 64x64 w4 s2 16/24 B.
GQA_DROP = {"w128": {"dkdv": [((32, 64, 8, 2), None), ((32, 64, 8, 3), "tile_list")]},
            "w64": {"dkdv": [((64, 64, 4, 2), None)]}}
_TUNE_KEYS = ["HEAD_DIM", "ROPE", "SPLIT", "ROW_BOUND", "TILE_LIST", "ALIGN", "GROUP"]
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


def gpu_table(name: str, fp32: bool, variant: Variant, layout_cls: str, grouped: bool = False) -> list:
    """The ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])`` candidates of attention kernel ``name`` on a
    GPU; ``grouped``: for grouped-query attention (several query heads per key/value head)."""
    if fp32:
        return list(GPU_CONFIGS_FP32[name])
    table = list(GPU_CONFIGS[layout_cls][name])
    if variant.fit_tiles:
        table += [c for c in GPU_CONFIGS_FIT[layout_cls][name] if c not in table]
    if grouped:
        drop = [c for c, part in GQA_DROP.get(layout_cls, {}).get(name, ()) if part is None or getattr(variant, part)]
        table = [c for c in table if c not in drop]
    return table


def _configs(name: str, fp32: bool, variant: Variant, layout_cls: str, grouped: bool = False) -> tuple[tuple, tuple]:
    """``(configs, tile blocks)``: triton.Configs for kernel ``name`` (each with the row of its block size in the
    tile list), and the distinct grid-axis block sizes a tile list must cover."""
    if interpreting():  # built per call: tests patch INTERPRETER_CONFIGS
        return _make_configs(name, [dict(INTERPRETER_CONFIGS[name], num_warps=4, num_stages=1)])
    return _gpu_configs(name, fp32, variant, layout_cls, grouped)


@functools.lru_cache(maxsize=None)
def _gpu_configs(name: str, fp32: bool, variant: Variant, layout_cls: str, grouped: bool) -> tuple[tuple, tuple]:
    # Cached: the autotuner is cached per config tuple, and a triton.Config compares by identity.
    table = [dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3], maxnreg=c[4] if len(c) > 4 else None)
             for c in gpu_table(name, fp32, variant, layout_cls, grouped)]
    return _make_configs(name, table)


def _make_configs(name: str, table: list) -> tuple[tuple, tuple]:
    axis, _ = _TILE_AXIS[name]
    blocks = tuple(sorted({c[axis] for c in table}))
    configs = tuple(triton.Config(dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], TILE_ROW=blocks.index(c[axis])),
                                  num_warps=c["num_warps"], num_stages=c["num_stages"], maxnreg=c.get("maxnreg"))
                    for c in table)
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


__all__ = ["GPU_CONFIGS", "GPU_CONFIGS_FIT", "GPU_CONFIGS_FP32", "INTERPRETER_CONFIGS", "Launch", "capture_launches",
           "GQA_DROP", "gpu_table", "layout_class"]

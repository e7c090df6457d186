"""Kernel variants of the fused attention: one registry, one way to choose.

Each name in :data:`VARIANTS` switches one design choice of the Triton path (all give the same attention, to
rounding; the sweep in ``benchmarks/sweep_attention.py`` measures them). Names combine with ``+``
(``"hd80+rope_once"``); ``"default"`` is today's kernel and stays the default until a GPU run picks another.

Choosing, innermost wins: :func:`use_variant` (a context manager) over the ``GENLIP_ATTN_VARIANT`` environment
variable over ``DEFAULT_VARIANT``. The choice is read when the op is called (when it is traced, under ``torch.compile``)
and travels with the op to its backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

ENV_VAR = "GENLIP_ATTN_VARIANT"
# What runs when nothing is chosen: today's kernels until a GPU sweep (benchmarks/sweep_attention.py) names a winner.
DEFAULT_VARIANT = "default"

VARIANTS: dict[str, str] = {
    "default": "today's kernels: q/k as two rotate-half halves padded to a power of two each, v/dO padded to one "
               "power of two; MRoPE in every tile; a (query block, sample, head) grid; two-kernel backward",
    "hd80": "head dims of a power of two plus at most 16 as a power-of-two block + a 16-wide one (72 = 64 + 8 -> 80 "
            "wide, not 128); with in-tile rope each rotate-half half is split the same way, so the rotation stays "
            "elementwise",
    "rope_once": "rotate q and k once per call in one elementwise pass, run the attention on rotated tiles, "
                 "un-rotate dq and dk once in the backward",
    "fit_tiles": "64-row and 64x64 tiles and more num_stages/num_warps in the autotune tables, and one key bound per "
                 "query row (key j visible iff j < max(i + 1, prefix)) as the only mask",
    "tile_list": "a flat list of the real (sample, block) tiles, longest sample first, built on the device from "
                 "cu_seqlens (no host sync): no program starts only to exit",
    "onepass": "one-pass backward (FlashAttention-2 style): one kernel over key blocks writes dK and dV and adds dQ "
               "with fp32 atomics (not bitwise reproducible run to run; the two-kernel default is). Implies "
               "rope_once: with rotation in the tile it spills registers in every config tried for sm_90",
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """The design choices one variant name selects (see :data:`VARIANTS`)."""

    hd80: bool = False
    rope_once: bool = False
    fit_tiles: bool = False
    tile_list: bool = False
    onepass: bool = False

    @property
    def name(self) -> str:
        """Canonical name: the switched-on parts in registry order, ``"default"`` when none."""
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]
        return "+".join(on) if on else "default"


_PARSED: dict[str, Variant] = {}


def parse_variant(name: str) -> Variant:
    """``"hd80+rope_once"`` -> ``Variant(hd80=True, rope_once=True)``; raises on an unknown part."""
    if name not in _PARSED:
        parts = [p.strip() for p in str(name).split("+")]
        unknown = [p for p in parts if p not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown attention variant {unknown} in {name!r}: combine names from "
                             f"{sorted(VARIANTS)} with '+' (set by use_variant() or {ENV_VAR})")
        on = {p: True for p in parts if p != "default"}
        if on.get("onepass"):
            on["rope_once"] = True  # see VARIANTS["onepass"]
        _PARSED[name] = Variant(**on)
    return _PARSED[name]


_OVERRIDE: list[str] = []  # use_variant()'s stack; a plain list (not a ContextVar) so torch.compile can read it


@contextlib.contextmanager
def use_variant(name: str):
    """Run the fused attention with variant ``name`` inside the block (checked on entry)."""
    _OVERRIDE.append(parse_variant(name).name)
    try:
        yield
    finally:
        _OVERRIDE.pop()


@torch.compiler.assume_constant_result  # torch.compile reads it once, when it traces the call
def current_variant() -> str:
    """The canonical variant name in force now: :func:`use_variant`, else ``GENLIP_ATTN_VARIANT``, else
    :data:`DEFAULT_VARIANT`."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    return parse_variant(os.environ.get(ENV_VAR, "") or DEFAULT_VARIANT).name


__all__ = ["DEFAULT_VARIANT", "ENV_VAR", "VARIANTS", "Variant", "current_variant", "parse_variant", "use_variant"]

"""Float8 training of the transformer blocks' linears (``train.float8``), through torchao; the one module that
imports torchao (its float8 API moves between releases: ``pip install '.[float8]'`` pins the one this is written for).

Which linears: the q/k/v/o projections and the SwiGLU's w1/w3/w2 of every block, narrowed by
``train.float8_filter`` (``"all"``, ``"mlp"``, or a regular expression searched in names such as
``blocks.3.attn.q_proj``). The LM head (the fused linear cross entropy), the patch embedding, the text embedding and
its in/out maps stay in the run's precision. A linear whose in or out width is not a multiple of 16 is skipped
(``torch._scaled_mm`` refuses it on the GPU) and named in the start-up line.

Recipes (torchao's names): ``tensorwise`` (one scale per tensor; the weights are all-gathered by FSDP2 in float8,
their scales computed for all linears in one all-reduce after each optimizer step), ``rowwise`` (one scale per row,
all three GEMMs in float8) and ``rowwise_with_gw_hp`` (rowwise; the weight gradient in high precision). Compiled
blocks take float8-gathered weights only when each block is one graph (:func:`all_gather_blocked`).

Token counts: the weight-gradient GEMM ``grad_out.T @ x`` contracts over the pack's T tokens, and the GPU's
``_scaled_mm`` needs that inner dimension to be a multiple of 16 (the CPU's does not check). The trainer pads every
pack to :attr:`Float8Linears.token_multiple` tokens (padding carries no loss and changes none:
``data.packing.pad_tokens``), and every converted linear checks the rows it is given in training, so a shape the
GPU would refuse fails on the CPU too, naming the linear.

Parameters keep their names and plain values (torchao's float8 all-gather wraps the weight in a tensor subclass
holding the same high-precision tensor), so checkpoints move between float8 and high-precision runs unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import CHOICES, ConfigError

RECIPES = CHOICES["train.float8"]
"""``train.float8`` values: off, or a torchao float8 training recipe."""

GEMM_MULTIPLE = 16
"""``torch._scaled_mm`` on the GPU: both widths of the second operand and the inner dimension are multiples of it."""

INSTALL = "pip install '.[float8]'"


@contextlib.contextmanager
def _quiet_import():
    """torchao logs a warning per CUDA extension it cannot load (all of them on a CPU build) and torch one about
    torchao's enum at import: noise for a user, so they are held back while it imports."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def unavailable_reason() -> str | None:
    """Why float8 training cannot run here (torchao missing or without the API used here), or None."""
    try:
        with _quiet_import():
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: F401
    except ImportError as e:
        return f"torchao's float8 training is not importable ({e}): {INSTALL}"
    return None


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The candidates for float8, by name: every ``nn.Linear`` inside ``model.blocks`` (attention projections and
    the MLP), in module order. Nothing outside the blocks is ever converted."""
    return {f"blocks.{name}": m for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}


def select_linears(model: nn.Module, filter: str = "all") -> tuple[list[str], dict[str, str]]:
    """``(converted, skipped)``: the block linears ``filter`` picks that float8 can run, and those it picks but
    cannot, each with the reason. ``filter``: ``"all"``, ``"mlp"``, or a regular expression (``re.search``) over
    names such as ``blocks.3.attn.q_proj`` / ``blocks.3.mlp.w1``; one that picks nothing is an error."""
    candidates = block_linears(model)
    if filter == "all":
        picked = list(candidates)
    elif filter == "mlp":
        picked = [n for n in candidates if ".mlp." in n]
    else:
        pattern = re.compile(filter)
        picked = [n for n in candidates if pattern.search(n)]
        if not picked:
            example = ", ".join(list(candidates)[:4])
            raise ConfigError(f"train.float8_filter = {filter!r} matches none of the block linears (their names look "
                              f"like {example}, ...)")
    converted, skipped = [], {}
    for name in picked:
        m = candidates[name]
        bad = [f"{what} {n}" for what, n in (("in_features", m.in_features), ("out_features", m.out_features))
               if n % GEMM_MULTIPLE]
        if bad:
            skipped[name] = f"{' and '.join(bad)} not a multiple of {GEMM_MULTIPLE}"
        else:
            converted.append(name)
    return converted, skipped


def all_gather_blocked(compile: bool, attn_backend: str, device: torch.device) -> str | None:
    """Why FSDP2 cannot all-gather tensorwise weights in float8 for this run, or None.

    torch.compile (2.13) refuses a graph that takes tensor-subclass inputs (the float8-gathered weights) and returns
    outputs aliasing one another. A compiled block is one graph with the fused attention (a custom op); the
    reference attention reads sample lengths back to the host, which splits the block into graphs whose outputs
    are the attention projections' views (q and the gate share one buffer). Then the weights are gathered in the
    run's precision and cast to float8 inside each linear: the same float8 values, more bytes moved."""
    if not compile:
        return None
    from ..ops._dispatch import resolve_impl

    impl = resolve_impl(attn_backend, torch.empty(0, device=device), extra=("flex",))
    if impl == "triton":
        return None
    return (f"parallel.compile with the {impl} attention: torch.compile takes float8-gathered weights only into a "
            f"block that is one graph, as with the fused attention")


class Float8ShapeError(ValueError):
    """A float8 linear was given a token count the GPU's float8 GEMM refuses."""


def _check_tokens(name: str, multiple: int):
    def hook(module: nn.Module, args) -> None:
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() and module.weight.requires_grad and tokens % multiple:
            raise Float8ShapeError(
                f"float8 linear {name} got {tokens} tokens: its weight-gradient GEMM contracts over the tokens, and "
                f"torch._scaled_mm on the GPU needs a multiple of {multiple} (pad packs with data.packing.pad_tokens)")
    return hook


def _compact(names: list[str]) -> str:
    """``blocks.0.mlp.w1, blocks.1.mlp.w1`` -> ``mlp.w1 (blocks 0-1)``: one entry per name within a block."""
    blocks: dict[str, list[int]] = {}
    for n in names:
        _, i, rest = n.split(".", 2)
        blocks.setdefault(rest, []).append(int(i))
    parts = []
    for rest, idx in blocks.items():
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"{rest} (block{'s' * (len(idx) > 1)} {', '.join(runs)})")
    return ", ".join(parts)


@dataclass
class Float8Linears:
    """What :func:`convert` did to a model: the recipe, the converted and skipped linears."""

    recipe: str = "off"
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Picked by the filter but left in high precision: name -> why."""
    kept: int = 0
    """Block linears the filter left out."""
    emulate: bool = False
    """GEMMs emulated in fp32 (see :func:`convert`)."""
    gather_blocked_by: str | None = None
    """Why tensorwise weights are not all-gathered in float8 (:func:`all_gather_blocked`), or None."""

    @property
    def enabled(self) -> bool:
        return bool(self.converted)

    @property
    def fsdp_float8_all_gather(self) -> bool:
        """FSDP2 all-gathers the converted weights in float8 (tensorwise: one scale per weight, known before the
        gather)."""
        return self.enabled and self.recipe == "tensorwise" and self.gather_blocked_by is None

    @property
    def token_multiple(self) -> int:
        """Packs in training are padded to a multiple of this many tokens (1: no padding): 16 where a float8 GEMM
        contracts over the tokens (the weight gradient; not under ``rowwise_with_gw_hp``, which keeps it in high
        precision)."""
        return GEMM_MULTIPLE if self.enabled and self.recipe != "rowwise_with_gw_hp" else 1

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Call after every ``optimizer.step()``: the next all-gather's float8 scales of all converted weights, in
        one all-reduce of their amaxes (tensorwise; otherwise nothing)."""
        if self.fsdp_float8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(model)

    def describe(self) -> str:
        """One start-up line (of a converted model)."""
        total = len(self.converted) + len(self.skipped) + self.kept
        line = (f"float8 {self.recipe}: {len(self.converted)} of {total} block linears converted"
                + (f" ({_compact(self.converted)})" if self.converted else "")
                + (f"; {self.kept} left in high precision by train.float8_filter" if self.kept else ""))
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for name, why in self.skipped.items():
                reasons.setdefault(why, []).append(name)
            line += "; skipped: " + "; ".join(f"{_compact(n)}: {why}" for why, n in reasons.items())
        if self.fsdp_float8_all_gather:
            line += "; FSDP2 all-gathers them in float8"
        elif self.recipe == "tensorwise" and self.gather_blocked_by:
            line += f"; FSDP2 all-gathers them unconverted ({self.gather_blocked_by})"
        if self.token_multiple > 1:
            line += f"; packs padded to a multiple of {self.token_multiple} tokens"
        if self.emulate:
            line += "; GEMMs emulated (fp32 products of the float8 operands: no fast float8 GEMM here)"
        return line


def convert(model: nn.Module, recipe: str = "off", filter: str = "all", *, emulate: bool = False,
            gather_blocked_by: str | None = None) -> Float8Linears:
    """Swap the block linears ``filter`` picks (:func:`select_linears`) for torchao's ``Float8Linear`` with
    ``recipe`` (one of :data:`RECIPES`; ``"off"`` changes nothing), in place. Call it on the plain model, before
    activation checkpointing, compile and FSDP2; then call :meth:`Float8Linears.after_optimizer_step` after every
    optimizer step.

    ``emulate``: torchao's emulation: the same float8 casts and scales, each GEMM as the fp32 product of the
    dequantized operands instead of ``torch._scaled_mm``. The trainer emulates on the CPU, whose ``_scaled_mm`` is
    a reference kernel (torch 2.13's, through oneDNN, ran a 256x128x352 GEMM in 0.4 s on the 2-core development
    machine, 2026-12-07: ~30 MFLOP/s).

    ``gather_blocked_by``: a reason tensorwise weights must not be all-gathered in float8 (:func:`all_gather_blocked`).
    """
    if recipe not in RECIPES:
        raise ConfigError(f"train.float8 = {recipe!r}; choose one of {list(RECIPES)}")
    if recipe == "off":
        return Float8Linears()
    reason = unavailable_reason()
    if reason:
        raise ConfigError(f"train.float8 = {recipe!r} cannot run: {reason}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    converted, skipped = select_linears(model, filter)
    result = Float8Linears(recipe, converted, skipped, len(block_linears(model)) - len(converted) - len(skipped),
                           emulate, gather_blocked_by)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=result.fsdp_float8_all_gather)
    chosen = set(converted)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fqn in chosen)
    if result.token_multiple > 1:
        for name, m in model.named_modules():
            if name in chosen:
                m.register_forward_pre_hook(_check_tokens(name, result.token_multiple))
    return result


__all__ = ["Float8Linears", "Float8ShapeError", "GEMM_MULTIPLE", "RECIPES", "all_gather_blocked", "block_linears",
           "convert", "select_linears", "unavailable_reason"]

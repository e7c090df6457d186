"""Choosing an implementation: ``impl="auto" | "triton" | "reference"``.

An explicit ``"triton"`` that cannot run raises with the reason; only ``"auto"`` falls back to the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "reference")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import; a plain constant keeps the check traceable by torch.compile.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton path cannot run on these tensors, or None when it can."""
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return None
    if devices == {"cpu"}:
        return None if interpreting() else "CPU tensors need TRITON_INTERPRET=1 (set before genlip_fast is imported)"
    return f"tensors must all be on CUDA (or on CPU under TRITON_INTERPRET=1), got devices {sorted(devices)}"


def resolve_impl(impl: str, *tensors: torch.Tensor, extra: tuple[str, ...] = ()) -> str:
    """Map ``impl`` to the implementation that will run; raise if an explicit choice cannot."""
    if impl not in IMPLS + extra:
        raise ValueError(f"impl must be one of {IMPLS + extra}, got {impl!r}")
    if impl in ("reference",) + extra:
        return impl
    reason = triton_unavailable_reason(*tensors)
    if reason is None:
        return "triton"
    if impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run: {reason}")
    # "auto" on plain CPU tensors: the reference is the CPU implementation.
    return "reference"

"""LM head + cross entropy without materialising the logits."""

from __future__ import annotations

import torch

from .._dispatch import resolve_impl


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, logits never stored.

    Args:
        hidden: ``(N, d)`` fp32 / fp16 / bf16 — pass only the rows that carry loss.
        weight: ``(V, d)`` LM head weight; V need not be a multiple of anything.
        targets: ``(N,)`` int64; rows equal to ``ignore_index`` carry no loss and get zero gradient.
        bias: optional ``(V,)``.
        reduction: ``"mean"`` (over non-ignored rows; 0, not NaN, when all are ignored) | ``"sum"`` | ``"none"``
            (``(N,)`` float32).
        softcap: optional logit soft-capping, ``softcap * tanh(logits / softcap)``.
        impl: ``"auto"`` | ``"triton"`` | ``"reference"``.

    Returns a float32 scalar (or ``(N,)`` for ``"none"``). Gradients flow to hidden, weight and bias.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    which = resolve_impl(impl, hidden, weight)
    kwargs = dict(bias=bias, ignore_index=ignore_index, reduction=reduction, softcap=softcap)
    if which == "reference":
        from .reference import linear_cross_entropy_reference

        return linear_cross_entropy_reference(hidden, weight, targets, **kwargs)
    from .function import linear_cross_entropy_triton

    return linear_cross_entropy_triton(hidden, weight, targets, **kwargs)


__all__ = ["linear_cross_entropy"]

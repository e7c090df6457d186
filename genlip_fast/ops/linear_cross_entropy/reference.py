"""Plain-PyTorch LM head + cross entropy — the oracle (and the 'eager' baseline) for the fused op."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross entropy of ``hidden @ weight.T (+ bias)`` against ``targets``.

    hidden ``(N, d)``, weight ``(V, d)``, bias ``(V,)``, targets ``(N,)`` int64. The product runs in the input dtype
    and everything after it in float32. ``softcap`` maps logits to ``softcap * tanh(logits / softcap)``.
    ``reduction``: ``"sum"``, ``"mean"`` (over non-ignored rows; 0 when every row is ignored, never NaN) or
    ``"none"`` (``(N,)`` float32, 0 on ignored rows). Materialises the full ``(N, V)`` logits.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)

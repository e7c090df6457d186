"""An LM head whose loss never materialises the logits: the module form of the fused linear cross entropy.

Shapes: N rows, d input width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import linear_cross_entropy


class LinearCrossEntropy(nn.Module):
    """``forward(hidden, targets)`` = ``cross_entropy(hidden @ weight.T + bias, targets)``, computed chunk by chunk
    over the vocabulary (a 152K-word head on 16K rows would otherwise write gigabytes of logits);
    :meth:`logits` gives the logits themselves where they are wanted (generation, evaluation).

    Args:
        in_features: d.
        vocab_size: V (any size).
        bias: a ``(V,)`` bias.
        ignore_index: target value of rows that carry no loss.
        reduction: ``"mean"`` (over rows that carry loss; 0 when none does) | ``"sum"`` | ``"none"`` (``(N,)``).
        softcap: optional logit soft-capping ``softcap * tanh(logits / softcap)`` (loss and :meth:`logits`).
        impl: ``"auto"`` | ``"triton"`` | ``"reference"``.

    Parameters: ``weight (V, d)`` and ``bias (V,)``, as an ``nn.Linear(d, V)`` names them, so a state dict
    moves between the two unchanged.
    """

    def __init__(self, in_features: int, vocab_size: int, *, bias: bool = False, ignore_index: int = -100,
                 reduction: str = "mean", softcap: float | None = None, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.in_features, self.vocab_size = in_features, vocab_size
        self.ignore_index, self.reduction, self.softcap, self.impl = ignore_index, reduction, softcap, impl
        self.weight = nn.Parameter(torch.empty(vocab_size, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(vocab_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``hidden (N, d)`` fp32/fp16/bf16 (pass only the rows that carry loss), ``targets (N,)`` int64 ->
        the float32 loss (a scalar, or ``(N,)`` for ``reduction="none"``). Gradients reach hidden, weight, bias."""
        return linear_cross_entropy(hidden, self.weight, targets, bias=self.bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, softcap=self.softcap, impl=self.impl)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (N, d)`` -> ``(N, V)`` logits in hidden's dtype (soft-capped when ``softcap`` is set)."""
        z = F.linear(hidden, self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}, "
                f"reduction={self.reduction}, impl={self.impl}")


__all__ = ["LinearCrossEntropy"]

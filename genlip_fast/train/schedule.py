"""Learning-rate schedule of the paper: linear warmup, then cosine decay from the peak to the minimum."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, total_steps: int, peak_lr: float, min_lr: float, warmup_ratio: float) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

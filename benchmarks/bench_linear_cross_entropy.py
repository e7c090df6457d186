"""LM head + cross entropy at the model's shapes: fused Triton op vs eager PyTorch vs Liger-Kernel.

4,400 caption rows (a stage-1 16K pack) x d in {1024, 1152, 1536} (L/16, So/16, g/16) x 151,936 words, bf16.
Modes: ``fwd`` (loss only, no graph kept) and ``fwd_bwd`` (loss + grads of hidden and weight). Useful work:
2·N·d·V FLOPs forward, 6·N·d·V forward + backward (the fused op recomputes the logits in its backward; that
recompute is not counted as useful). Peak memory is measured above the inputs (hidden, weight, targets), so the
returned gradients (weight-sized) count against every implementation alike.

Run on a GPU machine (skipped without one)::

    python -m pytest benchmarks/bench_linear_cross_entropy.py --benchmark-only \
        --benchmark-columns=median --benchmark-json=linear_ce.json
"""

from __future__ import annotations

import pytest
import torch

from _utils import run_benchmark
from genlip_fast.ops import linear_cross_entropy
from genlip_fast.ops.linear_cross_entropy.reference import linear_cross_entropy_reference

N_ROWS = 4_400
VOCAB = 151_936


def _liger_loss():
    # Optional baseline, imported lazily: the row is skipped where Liger-Kernel is not installed.
    module = pytest.importorskip("liger_kernel.transformers", reason="Liger-Kernel is not installed")
    loss = module.LigerFusedLinearCrossEntropyLoss(reduction="mean")
    return lambda h, w, t: loss(w, h, t)


def _loss_fn(impl: str):
    if impl == "fused":
        return lambda h, w, t: linear_cross_entropy(h, w, t, reduction="mean", impl="triton")
    if impl == "eager":
        return lambda h, w, t: linear_cross_entropy_reference(h, w, t, reduction="mean")
    return _liger_loss()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "eager", "liger"])
@pytest.mark.parametrize("d", [1024, 1152, 1536])
def test_linear_cross_entropy(benchmark, d, impl, mode):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    hidden = torch.randn(N_ROWS, d, device=dev, dtype=torch.bfloat16).requires_grad_(mode == "fwd_bwd")
    weight = (torch.randn(VOCAB, d, device=dev) * d ** -0.5).to(torch.bfloat16).requires_grad_(mode == "fwd_bwd")
    targets = torch.randint(0, VOCAB, (N_ROWS,), device=dev)
    loss_fn = _loss_fn(impl)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return loss_fn(hidden, weight, targets)
        flops = 2 * N_ROWS * d * VOCAB
    else:
        def fn():
            # autograd.grad returns the grads instead of accumulating into .grad, so rounds do not pile up memory.
            return torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))
        flops = 6 * N_ROWS * d * VOCAB

    run_benchmark(benchmark, fn, flops=flops, name=f"linear_ce/{impl}/{mode}", impl=impl, mode=mode,
                  n=N_ROWS, d=d, vocab=VOCAB, dtype="bf16")

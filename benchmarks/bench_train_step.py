"""One training step of GenLIP-So/16 on one stage-1 pack (16,384 tokens, ~60 samples of 196 patches + caption) on
one GPU, as the trainer runs it: FSDP2 (one rank), bf16 parameters with fp32 gradient reduce, forward, backward,
grad-norm clip, fused AdamW.

    python -m pytest benchmarks/bench_train_step.py --benchmark-only --benchmark-json=train_step.json

Three paths in one run: the reference ops (eager attention and CE), FlexAttention with eager CE, and the fused
Triton attention + fused linear cross entropy. Each reports median step ms, tokens/s, samples/s, useful TFLOP/s and
MFU (FLOPs from genlip_fast.train.flops, against the GPU's bf16 peak) and peak memory in extra_info.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from _utils import run_benchmark
from genlip_fast.data.batch import Sample
from genlip_fast.data.packing import pack_samples
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.train.distributed import apply_fsdp, init_distributed, mixed_precision_policy, shutdown
from genlip_fast.train.flops import device_peak_flops, pack_flops
from genlip_fast.train.trainer import grad_norm_and_clip, param_groups

PACK_TOKENS = 16384
VOCAB = 151936

PATHS = [
    pytest.param("reference", "reference", "reference", id="reference"),
    pytest.param("flex", "flex", "reference", id="flex+eager-ce"),
    pytest.param("fused", "triton", "triton", id="fused"),
]


def stage1_pack(seed: int = 0):
    """Samples of 196 patches + 40..110 caption tokens (mean ~270 tokens), packed greedily into one 16K pack."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    samples, used = [], 0
    while True:
        n_text = rng.randint(40, 110)
        if used + 196 + n_text > PACK_TOKENS:
            break
        samples.append(Sample(torch.randn(196, 768, generator=g), (14, 14),
                              torch.randint(0, VOCAB, (n_text,), generator=g)))
        used += 196 + n_text
    return pack_samples(samples, max_tokens=PACK_TOKENS)


@pytest.fixture(scope="module")
def dist_one_gpu():
    info = init_distributed("cuda")
    yield info
    shutdown(info)


@pytest.mark.parametrize("name,attn,ce", PATHS)
def test_train_step_so16_stage1_pack(benchmark, dist_one_gpu, name, attn, ce):
    if attn == "flex" and importlib.util.find_spec("genlip_fast.ops.prefix_lm_attention.flex") is None:
        pytest.skip("the FlexAttention backend (genlip_fast/ops/prefix_lm_attention/flex.py) is not there yet")
    info = dist_one_gpu
    device = info.device
    torch.manual_seed(0)
    cfg = get_preset("So/16", attn_backend=attn, ce_backend=ce)
    with torch.device(device):
        model = GenLIP(cfg)
    apply_fsdp(model, info.mesh, mixed_precision_policy("bf16", device))
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-6, betas=(0.9, 0.95), fused=True)
    host = stage1_pack()
    batch = host.to(device)
    denom = float(batch.num_loss_tokens)

    def step():
        loss = model(batch, loss_denominator=denom)
        loss.backward()
        grad_norm_and_clip(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = pack_flops(cfg, host)
    tokens, samples = int(host.cu_seqlens[-1]), host.num_samples
    run_benchmark(benchmark, step, flops=flops, name=f"train step So/16 16K pack: {name}", attn=attn, ce=ce,
                  tokens=tokens, samples=samples, loss_tokens=host.num_loss_tokens)
    median = benchmark.stats.stats.median
    peak = device_peak_flops(device)
    benchmark.extra_info.update(
        tokens_per_s=tokens / median,
        samples_per_s=samples / median,
        mfu=flops / median / peak if peak else None,
        peak_bf16_flops=peak,
        # everything resident at the peak: sharded fp32 params, grads, AdamW state, activations, workspace
        peak_mem_total_gib=torch.cuda.max_memory_allocated(device) / 2**30,
    )
    del model, opt, batch
    torch.cuda.empty_cache()

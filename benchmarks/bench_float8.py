"""Float8 training (``train.float8``, torchao) against bf16 on one GPU, compiled forward + backward:

- each distinct linear of a GenLIP-So/16 block (q_proj with its gate, k/v/o_proj, the SwiGLU's w1/w3 and w2) on
  16,384 tokens;
- one So/16 block (fused attention) on a stage-1 pack (16K tokens, ~60 samples), its linears in float8 as the
  trainer converts them (``genlip_fast.train.float8.convert``), all of them or the MLP only.

Variants: bf16, ``tensorwise``, ``rowwise`` (and the block with ``tensorwise`` on the MLP only). Without FSDP the
float8 weight is cast inside each linear; the trainer's tensorwise casts each shard before FSDP2 all-gathers it.

    python -m pytest benchmarks/bench_float8.py --benchmark-only --benchmark-json=float8.json

Each reports median ms, useful TFLOP/s (bf16-equivalent work) and peak memory; ``summarize.py`` adds the speed-up
over bf16. The trainer's own tokens/s, memory and loss curves per recipe: ``bash scripts/gpu_check.sh float8``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _utils import run_benchmark
from bench_train_step import stage1_pack
from genlip_fast.data.packing import pad_tokens
from genlip_fast.model import get_preset
from genlip_fast.model.model import Block
from genlip_fast.train import float8
from genlip_fast.train.flops import block_linear_weights, prefix_lm_pairs

TOKENS = 16384
VARIANTS = [  # (name, train.float8, train.float8_filter); rowwise_with_gw_hp left out: every row compiles, and the
    # file must finish inside the GPU check's time limit for it (its JSON is written at the end)
    pytest.param("bf16", "off", "all", id="bf16"),
    pytest.param("tensorwise", "tensorwise", "all", id="tensorwise"),
    pytest.param("rowwise", "rowwise", "all", id="rowwise"),
]
LINEARS = ["attn.q_proj", "attn.k_proj", "mlp.w1", "mlp.w2"]
"""One of each shape in So/16's block (1152 -> 2304 with the gate, 1152 -> 1152 as v and o, 1152 -> 3072 as w3,
3072 -> 1152)."""


def so16_block(recipe: str, filter: str) -> tuple[nn.Module, object]:
    """One So/16 block in bf16 on the GPU, its linears converted as the trainer does (inside a ``blocks`` list,
    where the adapter looks)."""
    torch.manual_seed(0)
    cfg = get_preset("So/16", attn_backend="triton")
    holder = nn.Module()
    with torch.device("cuda"):
        holder.blocks = nn.ModuleList([Block(cfg, drop_path=0.0)])
    holder.to(torch.bfloat16)
    float8.convert(holder, recipe, filter)
    return holder.blocks[0], cfg


@pytest.mark.parametrize("linear", LINEARS)
@pytest.mark.parametrize("name,recipe,filter", VARIANTS)
def test_float8_linear_so16(benchmark, linear, name, recipe, filter):
    block, _ = so16_block(recipe, filter)
    lin = block.get_submodule(linear)
    step_fn = torch.compile(lin)
    x = torch.randn(TOKENS, lin.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(TOKENS, lin.out_features, device="cuda", dtype=torch.bfloat16)

    def step():
        step_fn(x).backward(grad_out)
        x.grad = None
        lin.weight.grad = None

    run_benchmark(benchmark, step, flops=3 * 2.0 * TOKENS * lin.in_features * lin.out_features,
                  name=f"So/16 {linear} {lin.in_features}->{lin.out_features}, {TOKENS} tokens: {name}",
                  recipe=recipe, linear=linear, tokens=TOKENS)


@pytest.mark.parametrize("name,recipe,filter", VARIANTS + [
    pytest.param("tensorwise MLP only", "tensorwise", "mlp", id="tensorwise-mlp")])
def test_float8_block_so16_stage1_pack(benchmark, name, recipe, filter):
    block, cfg = so16_block(recipe, filter)
    host = stage1_pack()
    seqlens, prefix = host.seqlens.tolist(), host.prefix_lens.tolist()
    batch = pad_tokens(host, float8.GEMM_MULTIPLE).to("cuda")
    step_fn = torch.compile(block)
    x = torch.randn(batch.num_tokens, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)

    def step():
        step_fn(x, batch, batch.prefix_lens).backward(grad_out)
        x.grad = None
        block.zero_grad(set_to_none=True)

    tokens = sum(seqlens)
    pairs = sum(prefix_lm_pairs(p, s - p) for s, p in zip(seqlens, prefix))
    flops = 3 * (2.0 * block_linear_weights(cfg) * tokens + 4.0 * cfg.n_heads * cfg.head_dim * pairs)
    run_benchmark(benchmark, step, flops=flops, name=f"So/16 block, stage-1 pack: {name}", recipe=recipe,
                  filter=filter, tokens=tokens)

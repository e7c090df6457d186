"""Packed prefix-LM attention with MRoPE and the gate, at So/16's shape (16 heads x 72) on 16K packs, and at
qwen3_0.6b's (16 query heads on 8 key/value heads of 128: grouped-query attention) on stage-1 packs.

Implementations, all in one process:

* ``fused``: ``prefix_lm_attention(..., impl="triton")`` (tiles scheduled per sample, rope and gate inside);
* ``reference``: the plain-PyTorch oracle (sample by sample, rope and gate outside);
* ``flex``: compiled FlexAttention with the packed prefix-LM ``BlockMask`` (built once per pack, outside the timing),
  rope and gate outside, and the (T, H, D) <-> (1, H, T, D) layout change inside the timing;
* ``sdpa_dense``: ``scaled_dot_product_attention`` sample by sample on the *full* (unmasked) sample — more work
  than prefix-LM, a dense per-sample upper bound; rope and gate outside.

Layouts (shape ``so16``): stage 1 (196 image + 30-120 text tokens per sample, ~60 samples) and stage 2 (16-1024 image + 100-500
text, ~20 samples), each filled to 16,384 tokens with padding; shape ``qwen3``: stage 1. Modes: ``fwd``, ``bwd`` (backward only, graph
built outside the timing), ``fwd_bwd``. Useful work counts only unmasked query-key pairs:
4·D·H·pairs FLOPs forward, 2.5x that backward (FlashAttention's convention), for every implementation alike.

Run on a GPU machine (skipped without one)::

    python -m pytest benchmarks/bench_attention.py --benchmark-only \
        --benchmark-columns=median --benchmark-json=attention.json
"""

from __future__ import annotations

import random

import pytest
import torch

from _utils import run_benchmark
from genlip_fast.ops import prefix_lm_attention
from genlip_fast.ops.mrope.positions import mrope_position_ids
from genlip_fast.ops.prefix_lm_attention.reference import prefix_lm_attention_reference
from genlip_fast.train.flops import prefix_lm_pairs

TOTAL = 16_384
HEADS, HEAD_DIM, SECTION = 16, 72, (12, 12, 12)  # So/16
# (heads, kv heads, head dim, MRoPE section) of the attention shapes measured, and the stages each runs on.
SHAPES = {"so16": (HEADS, HEADS, HEAD_DIM, SECTION), "qwen3": (16, 8, 128, (16, 24, 24))}
CASES = [("so16", "stage1"), ("so16", "stage2"), ("qwen3", "stage1")]


def layout(stage: str, total: int = TOTAL, seed: int = 0, tiny: bool = False):
    """Image grids and text lengths of one pack filled to ``total`` tokens. Stage 1: 14x14 patches + 30-120 text
    tokens; stage 2: 16-1024 patches (aspect 0.6-1) + 100-500 text. ``tiny`` scales both down ~20x for CPU runs."""
    rng = random.Random(seed)
    grids, texts, used = [], [], 0
    while True:
        if stage == "stage1":
            h = w = 3 if tiny else 14
            t = rng.randint(2, 6) if tiny else rng.randint(30, 120)
        else:
            n = rng.randint(2, 40) if tiny else rng.randint(16, 1024)
            h = max(1, int(n**0.5 * rng.uniform(0.6, 1.0)))
            w = max(1, n // h)
            t = rng.randint(5, 25) if tiny else rng.randint(100, 500)
        if used + h * w + t > total:
            return grids, texts
        grids.append((h, w)), texts.append(t)
        used += h * w + t


def make_pack(stage: str, heads: int = HEADS, head_dim: int = HEAD_DIM, section=SECTION, total: int = TOTAL,
              device="cuda", dtype=torch.bfloat16, tiny: bool = False, seed: int = 0,
              kv_heads: int | None = None) -> dict:
    """One pack as the model hands it to the attention: q, k, v and the elementwise gate as strided slices of one
    projection output ``(total, heads, 4 * head_dim)`` (with ``kv_heads`` < heads: q and the gate of one
    ``(total, heads, 2 * head_dim)``, k and v of another ``(total, kv_heads, 2 * head_dim)``, as the modules make
    them), padding past the last sample; plus the useful query-key pairs (the project's FLOP counting)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    grids, texts = layout(stage, total, seed, tiny)
    prefixes = [h * w for h, w in grids]
    lens = [p + t for p, t in zip(prefixes, texts)]
    n = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    pl = torch.tensor(prefixes, dtype=torch.int32, device=dev)
    pos = torch.cat([mrope_position_ids(grids, texts), torch.zeros(3, total - n, dtype=torch.long)], 1).to(dev)
    kv_heads = heads if kv_heads is None else kv_heads
    kv = None
    if kv_heads == heads:
        proj = torch.randn(total, heads, 4 * head_dim, device=dev, dtype=dtype)
        q, k, v, g = (proj[..., i * head_dim:(i + 1) * head_dim] for i in range(4))
    else:
        proj = torch.randn(total, heads, 2 * head_dim, device=dev, dtype=dtype)
        kv = torch.randn(total, kv_heads, 2 * head_dim, device=dev, dtype=dtype)
        q, g, k, v = proj[..., :head_dim], proj[..., head_dim:], kv[..., :head_dim], kv[..., head_dim:]
    return dict(proj=proj, kv=kv, q=q, k=k, v=v, gate=g, cu=cu, pl=pl, pos=pos, prefixes=prefixes, lens=lens,
                section=tuple(section), max_seqlen=max(lens), num_samples=len(lens), total=total, heads=heads,
                kv_heads=kv_heads, head_dim=head_dim,
                pairs=sum(prefix_lm_pairs(p, n - p) for p, n in zip(prefixes, lens)))


def _sdpa_dense(q, k, v, cu, gate, pos, section):
    from genlip_fast.ops.prefix_lm_attention.flex import _rotate
    from genlip_fast.ops.mrope.positions import mrope_cos_sin

    cos, sin = mrope_cos_sin(pos, q.shape[-1], section)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    out = torch.zeros_like(q)
    bounds = cu.tolist()  # one host read per call: part of what a per-sample loop costs
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
    return out * torch.sigmoid(gate)


def _attention(impl: str, d):
    kw = dict(gate=d["gate"], position_ids=d["pos"], mrope_section=d["section"])
    if impl == "fused":
        return lambda q, k, v: prefix_lm_attention(q, k, v, d["cu"], d["pl"], max_seqlen=d["max_seqlen"],
                                                   impl="triton", **kw)
    if impl == "reference":
        return lambda q, k, v: prefix_lm_attention_reference(q, k, v, d["cu"], d["pl"], **kw)
    if impl == "flex":
        from genlip_fast.ops.prefix_lm_attention.flex import prefix_lm_attention_flex, prefix_lm_block_mask

        mask = prefix_lm_block_mask(d["cu"], d["pl"], TOTAL)
        return lambda q, k, v: prefix_lm_attention_flex(q, k, v, mask, **kw)
    return lambda q, k, v: _sdpa_dense(q, k, v, d["cu"], d["gate"], d["pos"], d["section"])


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["fused", "flex", "sdpa_dense", "reference"])
@pytest.mark.parametrize("shape,stage", CASES, ids=[s if a == "so16" else f"{a}_{s}" for a, s in CASES])
def test_attention(benchmark, shape, stage, impl, mode):
    heads, kv_heads, head_dim, section = SHAPES[shape]
    d = make_pack(stage, heads, head_dim, section, kv_heads=kv_heads)
    attn = _attention(impl, d)
    leaves = [d[n].detach().clone().requires_grad_(mode != "fwd") for n in ("q", "k", "v")]
    dout = torch.randn_like(d["q"])
    fwd_flops = 4 * head_dim * heads * d["pairs"]

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return attn(*leaves)
        flops = fwd_flops
    elif mode == "bwd":
        out = attn(*leaves)

        def fn():
            return torch.autograd.grad(out, leaves, dout, retain_graph=True)
        flops = 2.5 * fwd_flops
    else:
        def fn():
            return torch.autograd.grad(attn(*leaves), leaves, dout)
        flops = 3.5 * fwd_flops

    name = stage if shape == "so16" else f"{shape}_{stage}"  # So/16's rows keep their names
    run_benchmark(benchmark, fn, flops=flops, name=f"attention/{name}/{impl}/{mode}", impl=impl, mode=mode,
                  stage=stage, heads=heads, kv_heads=kv_heads, head_dim=head_dim, num_samples=d["num_samples"],
                  max_seqlen=d["max_seqlen"], useful_pairs=d["pairs"], dtype="bf16")

"""Fused prefix-LM attention (Triton, CPU interpreter here) vs the fp32 PyTorch oracle: output and every gradient.

Low-precision results must stay within flash-attn's bound: at most 2x PyTorch's own low-precision error on the same
inputs, plus a small atol. Shapes are awkward on purpose (odd lengths, head dim 72, image-only and text-only samples,
trailing padding, strided views of one fused projection). GPU-marked tests run bf16 on full-size 16K packs.

Every test runs over the kernel variants (``variants.py``): in CI the default on every case and each other variant
on a representative subset (rotating over the cases, so every case meets some variant); the full cross product with
``--runslow``.
"""

import math
import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import error_bound_ok
from genlip_fast.ops.mrope.positions import mrope_position_ids
from genlip_fast.ops.prefix_lm_attention import prefix_lm_attention
from genlip_fast.ops.prefix_lm_attention.reference import prefix_lm_attention_reference
from genlip_fast.ops.prefix_lm_attention.variants import use_variant

# The variants under test: each single one and the combinations whose parts interact (the split head layout with
# and without in-tile rope, with the one-pass backward's atomics, and everything at once).
VARIANTS = ["default", "hd80", "rope_once", "fit_tiles", "tile_list", "onepass", "hd80+rope_once", "hd80+onepass",
            "hd80+rope_once+fit_tiles+tile_list+onepass"]


def variant_params(ci=("default",)):
    """Every variant as a parameter; those not in ``ci`` run only with --runslow."""
    return [pytest.param(v, id=v, marks=() if v in ci else pytest.mark.slow) for v in VARIANTS]


def crossed(cases, ci):
    """``cases x VARIANTS``: the default on every case, ``ci[variant]`` (a case id) in CI, the rest --runslow."""
    out = []
    for case in cases:
        values, cid = (case.values, case.id) if hasattr(case, "values") else ((case,), str(case))
        for v in VARIANTS:
            in_ci = v == "default" or ci.get(v) == cid
            out.append(pytest.param(*values, v, id=f"{cid}-{v}", marks=() if in_ci else pytest.mark.slow))
    return out


def _grid(prefix: int) -> tuple[int, int]:
    """A (rows, cols) image grid with ``prefix`` patches, as square as the factors allow."""
    if prefix == 0:
        return 0, 0
    h = max(d for d in range(1, int(math.isqrt(prefix)) + 1) if prefix % d == 0)
    return h, prefix // h


def _section(head_dim: int) -> list[int]:
    half = head_dim // 2
    a = half // 3
    return [half - 2 * a, a, a]


def make_pack(prefixes, texts, *, pad=0, heads=2, head_dim=64, dtype=torch.float16, gate="elementwise", rope=True,
              fused=False, device="cpu", seed=0, kv_heads=None):
    """Inputs for one pack; ``kv_heads`` (default ``heads``) key/value heads. ``fused=True`` makes q, k, v, gate
    strided slices of one projection output (with grouped-query attention: q and the gate of one, k and v of
    another, as GenLIP's modules make them)."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + t for p, t in zip(prefixes, texts)]
    n_valid = sum(lens)
    T, H, D = n_valid + pad, heads, head_dim
    H_kv = H if kv_heads is None else kv_heads
    cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
    pl = torch.tensor(prefixes, dtype=torch.int32)
    if fused and H_kv != H:
        proj = torch.randn(T, H, D + (D if gate == "elementwise" else 1), generator=g).to(dtype)
        kv = torch.randn(T, H_kv, 2 * D, generator=g).to(dtype)
        q, k, v = proj[..., :D], kv[..., :D], kv[..., D:]
        gt = proj[..., D:] if gate == "elementwise" else proj[..., D] if gate == "headwise" else None
    elif fused:
        width = 3 * D + (D if gate == "elementwise" else 1 if gate == "headwise" else 0)
        proj = torch.randn(T, H, width, generator=g).to(dtype)
        q, k, v = proj[..., :D], proj[..., D : 2 * D], proj[..., 2 * D : 3 * D]
        gt = proj[..., 3 * D :] if gate == "elementwise" else proj[..., 3 * D] if gate == "headwise" else None
    else:
        q, k, v = (torch.randn(T, H if i == 0 else H_kv, D, generator=g).to(dtype) for i in range(3))
        gt = {"elementwise": torch.randn(T, H, D, generator=g), "headwise": torch.randn(T, H, generator=g),
              None: None}[gate]
        gt = gt.to(dtype) if gt is not None else None
    pos = None
    if rope:
        pos = mrope_position_ids([_grid(p) for p in prefixes], texts)
        pos = torch.cat([pos, torch.zeros(3, pad, dtype=pos.dtype)], dim=1)
    dout = torch.randn(T, H, D, generator=g).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), cu=to(cu), pl=to(pl), gate=to(gt), pos=to(pos), dout=to(dout),
                max_seqlen=max(lens) if lens else 0, section=_section(D))


def run(pack, impl, dtype=None, interleaved=True, max_seqlen="pack", variant="default"):
    """Output and gradients (q, k, v[, gate]) of one implementation (the Triton one as kernel ``variant``),
    inputs cast to ``dtype`` as leaves."""
    leaves = {}
    for name in ("q", "k", "v", "gate"):
        t = pack[name]
        if t is not None:
            t = t.detach() if dtype is None else t.detach().to(dtype)
            leaves[name] = t.requires_grad_()
    kw = dict(gate=leaves.get("gate"), position_ids=pack["pos"], mrope_interleaved=interleaved,
              mrope_section=pack["section"] if pack["pos"] is not None else None)
    if impl == "triton":
        kw["max_seqlen"] = pack["max_seqlen"] if max_seqlen == "pack" else max_seqlen
        with use_variant(variant):
            out = prefix_lm_attention(leaves["q"], leaves["k"], leaves["v"], pack["cu"], pack["pl"], impl="triton",
                                      **kw)
    else:
        out = prefix_lm_attention_reference(leaves["q"], leaves["k"], leaves["v"], pack["cu"], pack["pl"], **kw)
    dout = pack["dout"] if dtype is None else pack["dout"].to(dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    # The reference leaves inputs unused when the pack holds no token; the gradient is then zero.
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves.values(), grads)]
    return [out.detach()] + [gr.detach() for gr in grads]


NAMES = ["out", "dq", "dk", "dv", "dgate"]


def check_against_reference(pack, dtype, interleaved=True, atol=None, variant="default"):
    got = run(pack, "triton", interleaved=interleaved, variant=variant)
    ref32 = run(pack, "reference", torch.float32, interleaved=interleaved)
    if dtype == torch.float32:
        for name, a, b in zip(NAMES, got, ref32):
            tol = 2e-5 if atol is None else atol
            err = (a - b).abs().max().item() if a.numel() else 0.0
            assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: fp32 err {err:.3e}"
        return got
    lowp = run(pack, "reference", dtype, interleaved=interleaved)
    for name, a, b, c in zip(NAMES, got, ref32, lowp):
        assert a.dtype == dtype
        ok, msg = error_bound_ok(a, b, c, atol=1e-4 if atol is None else atol)
        assert ok, f"{name}: {msg}"
    return got


# (prefixes, texts, pad, head_dim, gate, rope, fused, interleaved): each row is one awkward pack.
CASES = [
    pytest.param([64], [33], 0, 64, "elementwise", True, False, True, id="one-sample-97-d64"),
    pytest.param([100], [31], 0, 72, "elementwise", True, False, True, id="one-sample-131-d72"),
    pytest.param([16, 0, 35, 49], [20, 37, 0, 11], 13, 72, "headwise", True, False, True,
                 id="many-text-only-image-only-pad-headwise"),
    pytest.param([9, 25, 12], [7, 30, 50], 5, 64, None, True, True, False, id="nogate-chunked-fused-views"),
    pytest.param([36, 20], [19, 45], 0, 64, "elementwise", False, True, True, id="norope-fused-views"),
    pytest.param([49, 0], [0, 40], 7, 80, "elementwise", True, False, True, id="d80"),
    pytest.param([25, 30], [18, 3], 0, 96, "headwise", True, True, False, id="d96-chunked-fused-headwise"),
    pytest.param([20, 12], [21, 9], 3, 128, "elementwise", True, True, True, id="d128-fused"),
]


# Each variant in CI on the case that exercises what it changes (the split head on non-power-of-two dims, tile lists
# and row bounds on many short, empty and padded samples, chunked rope for rope_once, atomics without rope).
_MANY = "many-text-only-image-only-pad-headwise"
CI_CASES = {"hd80": "d80", "rope_once": "nogate-chunked-fused-views", "fit_tiles": _MANY, "tile_list": _MANY,
            "onepass": "norope-fused-views", "hd80+rope_once": "one-sample-131-d72", "hd80+onepass": _MANY,
            "hd80+rope_once+fit_tiles+tile_list+onepass": _MANY}


@pytest.mark.parametrize("prefixes,texts,pad,head_dim,gate,rope,fused,interleaved,variant", crossed(CASES, CI_CASES))
def test_fp16_matches_reference(prefixes, texts, pad, head_dim, gate, rope, fused, interleaved, variant):
    pack = make_pack(prefixes, texts, pad=pad, head_dim=head_dim, gate=gate, rope=rope, fused=fused)
    check_against_reference(pack, torch.float16, interleaved, variant=variant)


@pytest.mark.parametrize("gate,variant", crossed(["elementwise", "headwise", None], {
    "hd80": "elementwise", "onepass": "headwise", "hd80+rope_once+fit_tiles+tile_list+onepass": "None"}))
def test_fp32_tight(gate, variant):
    pack = make_pack([30, 0, 17], [23, 14, 0], pad=4, head_dim=72, dtype=torch.float32, gate=gate)
    check_against_reference(pack, torch.float32, variant=variant)


@pytest.mark.parametrize("variant", variant_params(ci=("default", "tile_list")))
@pytest.mark.parametrize("configs", [
    # The GPU configs' shapes scaled down: query tiles wider than key tiles in fwd/dq, narrower in dk/dv.
    dict(fwd=dict(BLOCK_M=64, BLOCK_N=32), dkdv=dict(BLOCK_M=16, BLOCK_N=64), dq=dict(BLOCK_M=64, BLOCK_N=16),
         onepass=dict(BLOCK_M=16, BLOCK_N=64)),
    dict(fwd=dict(BLOCK_M=16, BLOCK_N=64), dkdv=dict(BLOCK_M=64, BLOCK_N=16), dq=dict(BLOCK_M=16, BLOCK_N=32),
         onepass=dict(BLOCK_M=64, BLOCK_N=16)),
], ids=["wide-q", "wide-k"])
def test_other_block_shapes(monkeypatch, configs, variant):
    from genlip_fast.ops.prefix_lm_attention import launch

    monkeypatch.setattr(launch, "INTERPRETER_CONFIGS", {**launch.INTERPRETER_CONFIGS, **configs})
    pack = make_pack([70, 0, 33, 16], [45, 29, 0, 17], pad=9, heads=1, head_dim=72, dtype=torch.float32,
                     gate="elementwise")
    check_against_reference(pack, torch.float32, variant=variant)


@pytest.mark.parametrize("variant", variant_params(ci=VARIANTS))
def test_padding_rows_zero_and_zero_grads(variant):
    pack = make_pack([12, 20], [9, 0], pad=11, head_dim=64, dtype=torch.float32, gate="elementwise")
    out, dq, dk, dv, dg = run(pack, "triton", variant=variant)
    n = int(pack["cu"][-1])
    for name, t in zip(NAMES, (out, dq, dk, dv, dg)):
        assert torch.count_nonzero(t[n:]) == 0, name
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("variant", variant_params(ci=("default", "tile_list",
                                                        "hd80+rope_once+fit_tiles+tile_list+onepass")))
def test_packed_equals_one_sample_at_a_time(variant):
    prefixes, texts = [40, 0, 25, 16], [15, 33, 0, 29]
    pack = make_pack(prefixes, texts, pad=6, head_dim=72, dtype=torch.float16, gate="elementwise")
    packed = run(pack, "triton", variant=variant)
    cu = pack["cu"].tolist()
    for s, (p, t) in enumerate(zip(prefixes, texts)):
        a, b = cu[s], cu[s + 1]
        alone = dict(pack)
        for name in ("q", "k", "v", "gate", "dout"):
            alone[name] = pack[name][a:b]
        alone["pos"] = pack["pos"][:, a:b]
        alone["cu"] = torch.tensor([0, b - a], dtype=torch.int32)
        alone["pl"] = torch.tensor([p], dtype=torch.int32)
        alone["max_seqlen"] = b - a
        single = run(alone, "triton", variant=variant)
        for name, x, y in zip(NAMES, packed, single):
            # Same tiles in the same order: the sample's result does not depend on its neighbours at all (with
            # onepass too: in the interpreter programs run one after another, so the atomics' order is fixed).
            assert torch.equal(x[a:b], y), f"sample {s} {name}"


_LAYOUTS = dict(
    layout=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 50)), min_size=1, max_size=12),
    pad=st.integers(0, 9),
    head_dim=st.sampled_from([64, 72]),
    gate=st.sampled_from(["elementwise", "headwise", None]),
)


def _check_layout(layout, pad, head_dim, gate, variant):
    prefixes = [p for p, _ in layout]
    texts = [t for _, t in layout]
    assume(sum(prefixes) + sum(texts) > 0)
    # fp32 against the fp32 oracle: the tightest check of the tile scheduling, and the cheapest on CPU.
    pack = make_pack(prefixes, texts, pad=pad, heads=1, head_dim=head_dim, dtype=torch.float32, gate=gate)
    check_against_reference(pack, torch.float32, variant=variant)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(variant=st.sampled_from(VARIANTS), **_LAYOUTS)
def test_hypothesis_pack_layouts(layout, pad, head_dim, gate, variant):
    _check_layout(layout, pad, head_dim, gate, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_hypothesis_pack_layouts_every_variant(variant):
    settings(max_examples=8, deadline=None, derandomize=True)(given(**_LAYOUTS)(
        lambda layout, pad, head_dim, gate: _check_layout(layout, pad, head_dim, gate, variant)))()


# ------------------------------------------------------------------------- grouped-query / multi-query attention

# (prefixes, texts, pad, heads, kv heads, head_dim, gate, fused, interleaved)
GQA_CASES = [
    pytest.param([30, 0, 17], [23, 14, 0], 4, 4, 2, 72, "elementwise", True, True, id="gqa2-d72-fused"),
    pytest.param([9, 25], [7, 30], 3, 3, 1, 64, "headwise", False, False, id="mqa3-d64-headwise-chunked"),
    pytest.param([20, 12], [21, 9], 0, 4, 1, 128, None, True, True, id="mqa4-d128-nogate-fused"),
]


@pytest.mark.parametrize("prefixes,texts,pad,heads,kv_heads,head_dim,gate,fused,interleaved", GQA_CASES)
def test_gqa_fp16_matches_reference(prefixes, texts, pad, heads, kv_heads, head_dim, gate, fused, interleaved):
    """Grouped-query attention: dK and dV (``(T, H_kv, D)``) summed over each group inside the kernel, within the
    fp16 bound of the reference, which repeats k and v per query head and lets autograd sum."""
    pack = make_pack(prefixes, texts, pad=pad, heads=heads, kv_heads=kv_heads, head_dim=head_dim, gate=gate,
                     fused=fused)
    got = check_against_reference(pack, torch.float16, interleaved)
    assert got[2].shape == got[3].shape == (pack["q"].shape[0], kv_heads, head_dim)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gqa_fp32_every_variant(variant):
    """Every kernel variant with 4 query heads on 2 key/value heads (elementwise gate, strided views, D 72) and
    3 on 1 (headwise gate, D 64), against the fp32 oracle."""
    pack = make_pack([16, 0, 9], [10, 7, 0], pad=3, heads=4, kv_heads=2, head_dim=72, dtype=torch.float32,
                     gate="elementwise", fused=True)
    check_against_reference(pack, torch.float32, variant=variant)
    pack = make_pack([12], [9], heads=3, kv_heads=1, head_dim=64, dtype=torch.float32, gate="headwise")
    check_against_reference(pack, torch.float32, variant=variant)


def _check_gqa_layout(layout, pad, heads, head_dim, gate, variant):
    (H, H_kv), prefixes, texts = heads, [p for p, _ in layout], [t for _, t in layout]
    assume(sum(prefixes) + sum(texts) > 0)
    pack = make_pack(prefixes, texts, pad=pad, heads=H, kv_heads=H_kv, head_dim=head_dim, dtype=torch.float32,
                     gate=gate)
    check_against_reference(pack, torch.float32, variant=variant)


_GQA_LAYOUTS = dict(_LAYOUTS, layout=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), min_size=1,
                                                max_size=5),
                    heads=st.sampled_from([(2, 1), (3, 1), (4, 2), (2, 2)]))  # MQA, GQA, MHA


@settings(max_examples=5, deadline=None, derandomize=True)
@given(variant=st.sampled_from(VARIANTS), **_GQA_LAYOUTS)
def test_hypothesis_gqa_layouts(layout, pad, heads, head_dim, gate, variant):
    _check_gqa_layout(layout, pad, heads, head_dim, gate, variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_hypothesis_gqa_layouts_every_variant(variant):
    settings(max_examples=6, deadline=None, derandomize=True)(given(**_GQA_LAYOUTS)(
        lambda layout, pad, heads, head_dim, gate: _check_gqa_layout(layout, pad, heads, head_dim, gate, variant)))()


@pytest.mark.parametrize("variant", variant_params(ci=("default", "tile_list", "onepass")))
def test_larger_max_seqlen_and_empty_samples(variant):
    # max_seqlen is only a grid bound: an over-estimate must not change anything; empty samples are legal.
    pack = make_pack([10, 0, 0], [5, 0, 8], pad=2, head_dim=64, dtype=torch.float32, gate="headwise")
    a = run(pack, "triton", variant=variant)
    b = run(pack, "triton", max_seqlen=100, variant=variant)
    c = run(pack, "triton", max_seqlen=None, variant=variant)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_input_errors():
    pack = make_pack([4], [4], head_dim=64, dtype=torch.float32)
    q, k, v, cu, pl = pack["q"], pack["k"], pack["v"], pack["cu"], pack["pl"]
    with pytest.raises(ValueError, match=r"k and v must be \(T, H_kv, D\) with H % H_kv == 0"):
        prefix_lm_attention(q, k[:, :1], v, cu, pl, impl="triton")  # k and v with different head counts
    with pytest.raises(ValueError, match=r"H % H_kv == 0"):
        prefix_lm_attention(q[:, :1].expand(8, 3, 64), k, v, cu, pl, impl="triton")  # 3 query heads on 2
    with pytest.raises(ValueError, match=r"H % H_kv == 0"):
        prefix_lm_attention(q, k[..., :32], v[..., :32], cu, pl, impl="triton")  # another head dim
    with pytest.raises(ValueError, match=r"H % H_kv == 0"):
        prefix_lm_attention(q[:, :1].expand(8, 3, 64), k, v, cu, pl, impl="reference")
    with pytest.raises(ValueError, match="gate must be"):
        prefix_lm_attention(q, k, v, cu, pl, gate=torch.zeros(8, 2, 3), impl="triton")
    with pytest.raises(ValueError, match="prefix_lens"):
        prefix_lm_attention(q, k, v, cu, pl[:0], impl="triton")
    with pytest.raises(ValueError, match="mrope_section"):
        prefix_lm_attention(q, k, v, cu, pl, position_ids=pack["pos"], impl="triton")
    with pytest.raises(ValueError, match="head_dim must be even"):
        prefix_lm_attention(q[..., :63], k[..., :63], v[..., :63], cu, pl, impl="triton")


@pytest.mark.parametrize("variant", variant_params(ci=("default", "rope_once")))
def test_torch_compile_sees_one_op(variant):
    pack = make_pack([6, 5], [7, 4], pad=3, head_dim=64, dtype=torch.float32, gate="elementwise")

    def f(q, k, v, g):
        return prefix_lm_attention(q, k, v, pack["cu"], pack["pl"], gate=g, position_ids=pack["pos"],
                                   mrope_section=pack["section"], max_seqlen=pack["max_seqlen"], impl="triton")

    leaves = [pack[n].clone().requires_grad_() for n in ("q", "k", "v", "gate")]
    torch._dynamo.reset()  # the variant is read when the call is traced
    with use_variant(variant):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, pack["dout"])
    eager = run(pack, "triton", variant=variant)
    assert torch.equal(out, eager[0])
    for x, y in zip(grads, eager[1:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("variant", variant_params(ci=("default", "rope_once")))
def test_opcheck(variant, kv_heads):
    """Schema, fake tensors (the shapes of out, k_rot, dk and dv, with grouped-query attention too) and autograd."""
    from genlip_fast.ops.prefix_lm_attention.function import _fwd_op

    pack = make_pack([5], [6], pad=2, head_dim=64, dtype=torch.float32, gate="headwise", kv_heads=kv_heads)
    args = (pack["q"].requires_grad_(), pack["k"].requires_grad_(), pack["v"], pack["cu"], pack["pl"], pack["gate"], pack["pos"],
            pack["section"], True, 10000.0, 0.125, pack["max_seqlen"], variant)
    torch.library.opcheck(_fwd_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------- GPU: bf16, 16K packs

PRESETS = {"L16": (16, 64, [8, 12, 12]), "So16": (16, 72, [12, 12, 12]), "g16": (24, 64, [16, 16, 16])}


def _stage_layout(stage: str, total: int = 16384, seed: int = 0):
    """Stage 1: 196 image patches + 30-120 text per sample; stage 2: 16-1024 patches + 100-500 text."""
    rng = random.Random(seed)
    prefixes, texts, used = [], [], 0
    while True:
        p = 196 if stage == "stage1" else rng.randint(16, 1024)
        t = rng.randint(30, 120) if stage == "stage1" else rng.randint(100, 500)
        if used + p + t > total:
            break
        prefixes.append(p), texts.append(t)
        used += p + t
    return prefixes, texts, total - used


@pytest.mark.gpu
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gpu_bf16_16k_pack(preset, stage):
    heads, head_dim, section = PRESETS[preset]
    prefixes, texts, pad = _stage_layout(stage)
    pack = make_pack(prefixes, texts, pad=pad, heads=heads, head_dim=head_dim, dtype=torch.bfloat16,
                     gate="elementwise", fused=True, device="cuda")
    pack["section"] = section
    check_against_reference(pack, torch.bfloat16, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("prefixes,texts,pad,head_dim,gate,rope,fused,interleaved", CASES)
def test_gpu_bf16_small(prefixes, texts, pad, head_dim, gate, rope, fused, interleaved):
    pack = make_pack(prefixes, texts, pad=pad, head_dim=head_dim, dtype=torch.bfloat16, gate=gate, rope=rope,
                     fused=fused, device="cuda")
    check_against_reference(pack, torch.bfloat16, interleaved)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS[1:])
def test_gpu_bf16_16k_pack_variants(variant):
    heads, head_dim, section = PRESETS["So16"]
    prefixes, texts, pad = _stage_layout("stage1")
    pack = make_pack(prefixes, texts, pad=pad, heads=heads, head_dim=head_dim, dtype=torch.bfloat16,
                     gate="elementwise", fused=True, device="cuda")
    pack["section"] = section
    check_against_reference(pack, torch.bfloat16, atol=1e-3, variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("hd80")] + [VARIANTS[-1]])
def test_gpu_bf16_16k_pack_gqa(variant):
    """qwen3_0.6b's attention: 16 query heads on 8 key/value heads of 128, a stage-1 pack, every variant that
    differs at head dim 128 (hd80 changes only dims of a power of two plus at most 16)."""
    prefixes, texts, pad = _stage_layout("stage1")
    pack = make_pack(prefixes, texts, pad=pad, heads=16, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                     gate="elementwise", fused=True, device="cuda")
    pack["section"] = [16, 24, 24]
    check_against_reference(pack, torch.bfloat16, atol=1e-3, variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("variant,kv_heads", [("default", 16), ("tile_list", 16),
                                              ("hd80+rope_once+fit_tiles+tile_list", 16), ("default", 8),
                                              ("hd80+rope_once+fit_tiles+tile_list", 2)])
def test_gpu_no_host_sync_and_deterministic(variant, kv_heads):
    prefixes, texts, pad = _stage_layout("stage1")
    pack = make_pack(prefixes, texts, pad=pad, heads=16, kv_heads=kv_heads, head_dim=72, dtype=torch.bfloat16,
                     gate="elementwise", fused=True, device="cuda")
    pack["section"] = [12, 12, 12]
    first = run(pack, "triton", variant=variant)  # autotunes, builds the frequency tables / tile lists: may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync from here on raises
    try:
        again = run(pack, "triton", variant=variant)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, x, y in zip(NAMES, first, again):
        assert torch.equal(x, y), f"{name} differs between two runs (the kernels use no atomics)"

"""Fused LM head + cross entropy (Triton, run by the CPU interpreter here) against the plain-PyTorch reference.

Errors are bounded flash-attn style: the fused result's error against a high-precision oracle is at most twice the
error PyTorch itself makes in the same precision, plus a small atol. fp16 inputs use the fp32 reference as oracle;
fp32 inputs use an fp64 one. bf16 products are garbage in the interpreter, so bf16 runs on a GPU machine only.

The interpreter config cuts the vocab into 128-wide forward splits and 256-wide backward chunks, so V ~ 1,000
exercises the split combine, several backward chunks and ragged last blocks.
"""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import error_bound_ok
from genlip_fast.ops import linear_cross_entropy
from genlip_fast.ops.linear_cross_entropy.reference import linear_cross_entropy_reference

fn_mod = importlib.import_module("genlip_fast.ops.linear_cross_entropy.function")

IGNORE = -100


def make_inputs(n, v, d, dtype, *, bias=False, ignore_every=0, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # d ** -0.5 keeps logits O(scale) whatever d is, like a normalised hidden state times an initialised head.
    hidden = (torch.randn(n, d, generator=g) * scale / d ** 0.25).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.25).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return [x.to(device) if x is not None else None for x in (hidden, weight, b, targets)]


def loss_and_grads(fn, hidden, weight, bias, targets, *, cast=None, reduction="mean", softcap=None, upstream=None,
                   **kw):
    """Loss and (dhidden, dweight, dbias) of ``fn`` on copies of the inputs cast to ``cast``."""
    leaves = [x.detach().to(cast or x.dtype).requires_grad_() if x is not None else None
              for x in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], targets, bias=leaves[2], ignore_index=IGNORE, reduction=reduction,
              softcap=softcap, **kw)
    if reduction == "none":
        up = upstream if upstream is not None else torch.ones_like(loss)
        loss.backward(up.to(loss.device, loss.dtype))
    else:
        loss.backward()
    return [loss.detach()] + [x.grad for x in leaves if x is not None]


def fused(*args, **kw):
    return linear_cross_entropy(*args, impl="triton", **kw)


def check_against_reference(hidden, weight, bias, targets, **kw):
    dtype = hidden.dtype
    oracle = torch.float64 if dtype == torch.float32 else torch.float32
    out = loss_and_grads(fused, hidden, weight, bias, targets, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, bias, targets, cast=oracle, **kw)
    lowp = loss_and_grads(linear_cross_entropy_reference, hidden, weight, bias, targets, **kw)
    assert out[0].dtype == torch.float32
    for name, o, r, lp in zip(["loss", "dhidden", "dweight", "dbias"], out, ref, lowp):
        assert o.shape == r.shape and torch.isfinite(o).all(), name
        if name != "loss":
            assert o.dtype == dtype, name
        # atol: 1e-5, plus a few fp32 ulps of the quantity's own size (a sum of many row losses can land where
        # PyTorch's own rounding happens to be exact, so the relative part of the bound would be 0).
        ok, msg = error_bound_ok(o, r, lp, atol=1e-5 + 1e-6 * r.abs().max().item())
        assert ok, f"{name}: {msg}"


CASES = [  # (N, V, d, bias, softcap, reduction, ignore_every)
    (1, 1000, 32, False, None, "mean", 0),
    (7, 1003, 40, True, 30.0, "sum", 3),
    (131, 1003, 64, True, None, "mean", 5),
    (131, 1000, 48, False, 15.0, "none", 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,v,d,bias,softcap,reduction,ignore_every", CASES)
def test_matches_reference(dtype, n, v, d, bias, softcap, reduction, ignore_every):
    hidden, weight, b, targets = make_inputs(n, v, d, dtype, bias=bias, ignore_every=ignore_every, scale=2.0)
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    check_against_reference(hidden, weight, b, targets, reduction=reduction, softcap=softcap, upstream=upstream)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_ignored_rows(reduction):
    hidden, weight, b, targets = make_inputs(33, 300, 24, torch.float32, bias=True, ignore_every=2)
    check_against_reference(hidden, weight, b, targets, reduction=reduction, softcap=20.0)
    losses = fused(hidden, weight, targets, bias=b, reduction="none")
    assert losses.shape == (33,) and losses.dtype == torch.float32
    assert (losses[targets == IGNORE] == 0).all() and (losses[targets != IGNORE] > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(reduction):
    hidden, weight, b, targets = make_inputs(9, 200, 16, torch.float32, bias=True)
    targets[:] = IGNORE
    loss, dh, dw, db = loss_and_grads(fused, hidden, weight, b, targets, reduction=reduction)
    assert (loss == 0).all()
    for grad in (dh, dw, db):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_inside_vocab():
    # An ignore_index that is also a valid vocab id (0) must still mean "no loss" for those rows.
    hidden, weight, _, targets = make_inputs(20, 150, 16, torch.float32)
    targets[::2] = 0
    out = fused(hidden, weight, targets, ignore_index=0, reduction="none")
    ref = linear_cross_entropy_reference(hidden, weight, targets, ignore_index=0, reduction="none")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[::2] == 0).all()


def test_large_logits_are_stable():
    # Logits around +-1e4 (fp32): a naive exp overflows; the online logsumexp must not.
    hidden, weight, b, targets = make_inputs(19, 400, 32, torch.float32, bias=True, ignore_every=6)
    hidden = hidden * 3e3
    out = loss_and_grads(fused, hidden, weight, b, targets, reduction="sum")
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, targets, cast=torch.float64,
                         reduction="sum")
    logits = hidden.double() @ weight.double().T
    assert logits.abs().max() > 5e3
    for name, o, r in zip(["loss", "dhidden", "dweight", "dbias"], out, ref):
        assert torch.isfinite(o).all(), name
        # fp32 logits of size 1e4 carry ~1e-3 absolute rounding; relative to each quantity's own scale.
        scale = r.abs().max().item()
        assert (o.double() - r).abs().max().item() <= 1e-4 * scale + 1e-3, name


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # tanh's exp2 saturates to inf on purpose
def test_large_logits_softcap():
    hidden, weight, _, targets = make_inputs(11, 300, 32, torch.float32)
    hidden = hidden * 3e3
    out = loss_and_grads(fused, hidden, weight, None, targets, reduction="mean", softcap=30.0)
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, None, targets, cast=torch.float64,
                         reduction="mean", softcap=30.0)
    for o, r in zip(out, ref):
        assert torch.isfinite(o).all()
        assert (o.double() - r).abs().max().item() <= 1e-4 * r.abs().max().item() + 1e-5


def test_deterministic():
    hidden, weight, b, targets = make_inputs(70, 700, 40, torch.float16, bias=True, ignore_every=7)
    first = loss_and_grads(fused, hidden, weight, b, targets, reduction="mean", softcap=30.0)
    second = loss_and_grads(fused, hidden, weight, b, targets, reduction="mean", softcap=30.0)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_strided_inputs():
    # Non-contiguous views (a column slice of hidden, a transposed weight) are read through their strides.
    hidden, weight, _, targets = make_inputs(37, 250, 24, torch.float32)
    wide = torch.randn(37, 40)
    wide[:, 5:29] = hidden
    hidden_view = wide[:, 5:29]
    weight_view = weight.T.contiguous().T
    assert not hidden_view.is_contiguous() and not weight_view.is_contiguous()
    out = loss_and_grads(fused, hidden_view, weight_view, None, targets)
    ref = loss_and_grads(fused, hidden, weight, None, targets)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


def test_frozen_head_skips_dweight():
    hidden, weight, _, targets = make_inputs(13, 200, 16, torch.float32)
    h = hidden.clone().requires_grad_()
    loss = fused(h, weight, targets)  # weight does not require grad
    loss.backward()
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, None, targets)
    torch.testing.assert_close(h.grad, ref[1], atol=1e-6, rtol=1e-5)
    assert weight.grad is None


def test_empty_and_single_vocab():
    hidden, weight, _, targets = make_inputs(0, 50, 16, torch.float32)
    for reduction in ("mean", "sum"):
        loss, dh, dw = loss_and_grads(fused, hidden, weight, None, targets, reduction=reduction)
        assert loss.item() == 0 and dh.shape == (0, 16) and (dw == 0).all()
    # V = 1: every loss is exactly log(1) = 0.
    hidden, weight, _, targets = make_inputs(5, 1, 16, torch.float32)
    check_against_reference(hidden, weight, None, targets, reduction="sum")


def test_input_checks():
    hidden, weight, b, targets = make_inputs(4, 50, 16, torch.float32, bias=True)
    with pytest.raises(ValueError, match="disagree on d"):
        fused(hidden, weight[:, :8], targets)
    with pytest.raises(TypeError, match="share one dtype"):
        fused(hidden, weight.half(), targets)
    with pytest.raises(ValueError, match="targets must be"):
        fused(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="bias must be"):
        fused(hidden, weight, targets, bias=b[:10])
    with pytest.raises(ValueError, match="softcap"):
        fused(hidden, weight, targets, softcap=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fused(hidden, weight, targets, reduction="avg")


def test_gpu_configs_by_dtype():
    # The GPU autotuner only races configs that compute identically (same vocab tile and K step) for half types.
    configs = fn_mod._gpu_configs()
    half = fn_mod._configs_for_dtype(configs, {"H": torch.empty(1, dtype=torch.bfloat16)})
    full = fn_mod._configs_for_dtype(configs, {"H": torch.empty(1, dtype=torch.float32)})
    assert len(half) >= 2 and {(c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"]) for c in half} == {(128, 64)}
    assert len(full) == 1 and not set(map(id, full)) & set(map(id, half))
    assert fn_mod._CHUNK_V_GPU % 128 == 0


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 70), v=st.integers(1, 400), d=st.integers(1, 72), bias=st.booleans(),
       softcap=st.sampled_from([None, 5.0, 30.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       ignore_every=st.sampled_from([0, 2, 3]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_property_shapes(n, v, d, bias, softcap, reduction, ignore_every, seed, dtype):
    hidden, weight, b, targets = make_inputs(n, v, d, dtype, bias=bias, ignore_every=ignore_every, scale=2.0,
                                             seed=seed)
    check_against_reference(hidden, weight, b, targets, reduction=reduction, softcap=softcap)


# _dispatch's cached "is triton installed" check is traced through; harmless here.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_torch_compile_sees_one_op():
    hidden, weight, b, targets = make_inputs(21, 300, 32, torch.float32, bias=True, ignore_every=4)

    def step(h, w, bb, t):
        # The model's pattern: a sum over caption rows divided by a token count computed elsewhere.
        return linear_cross_entropy(h, w, t, bias=bb, reduction="sum", softcap=30.0, impl="triton") / 17.0

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(step, fullgraph=True, backend=capture)(hidden, weight, b, targets)
    ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function" and "genlip_fast" in str(n.target)]
    assert ops == [torch.ops.genlip_fast.linear_ce_fwd.default]

    compiled = torch.compile(step, fullgraph=True)
    # The compile caches key on the forward graph, not on the op's registered backward: a cache written by an
    # older version of the op would replay a stale backward, so this test always compiles afresh.
    with torch._inductor.config.patch(force_disable_caches=True):
        out = loss_and_grads(lambda h, w, t, bias, **kw: compiled(h, w, bias, t), hidden, weight, b, targets)
    ref = loss_and_grads(lambda h, w, t, bias, **kw: step(h, w, bias, t), hidden, weight, b, targets)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_custom_op_opcheck():
    hidden, weight, b, targets = make_inputs(9, 150, 16, torch.float32, bias=True, ignore_every=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()
    torch.library.opcheck(torch.ops.genlip_fast.linear_ce_fwd.default, (hidden, weight, targets, b, IGNORE, 30.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        _, lse = fn_mod.linear_cross_entropy_forward(hidden, weight, targets, b, IGNORE, None)
    torch.library.opcheck(torch.ops.genlip_fast.linear_ce_bwd.default,
                          (torch.rand(9), hidden.detach(), weight.detach(), targets, lse, b.detach(), IGNORE, None,
                           True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1024, 1152])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_gpu(d, softcap):
    hidden, weight, b, targets = make_inputs(1031, 151_936, d, torch.bfloat16, bias=True, ignore_every=9,
                                             scale=2.0, device="cuda")
    check_against_reference(hidden, weight, b, targets, reduction="mean", softcap=softcap)


@pytest.mark.gpu
def test_gpu_memory_and_determinism_at_model_shape():
    # So/16 shape: 4,400 caption rows x 1152 x 151,936, bf16. Peak above the inputs must stay within 0.5 GiB
    # (the weight-sized gradient alone is 334 MiB); the eager path needs ~10 GiB here.
    hidden, weight, _, targets = make_inputs(4400, 151_936, 1152, torch.bfloat16, device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()

    def run():
        loss = fused(hidden, weight, targets, reduction="sum")
        return (loss.detach(),) + torch.autograd.grad(loss, (hidden, weight))

    first = run()  # autotune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    second = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 0.5 * 2**30, f"peak {peak / 2**30:.3f} GiB above inputs"
    for a, c in zip(first, second):
        assert torch.equal(a, c)

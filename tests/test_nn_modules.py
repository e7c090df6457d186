"""genlip_fast.nn: the modules against a dense oracle written here from the parameters (forward and every gradient),
for grouped-query / multi-query attention, per-head q/k norm and the three gates; ``torch.compile(fullgraph=True)``
over both modules; bad arguments raise."""

import pytest
import torch
import torch.nn.functional as F

from genlip_fast.nn import GatedPrefixLMAttention, LinearCrossEntropy
from genlip_fast.ops import mrope_position_ids
from genlip_fast.ops.mrope.positions import mrope_cos_sin

# (grid, text tokens) per sample: image + text, text-only, image-only; then padding.
LAYOUT = [((2, 3), 5), ((0, 0), 4), ((3, 3), 0)]
PAD = 3


def pack(layout=LAYOUT, pad=PAD):
    lens = [h * w + t for (h, w), t in layout]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    prefix = torch.tensor([h * w for (h, w), _ in layout], dtype=torch.int32)
    pos = mrope_position_ids([g for g, _ in layout], [t for _, t in layout])
    pos = torch.cat([pos, torch.zeros(3, pad, dtype=pos.dtype)], dim=1)
    return cu, prefix, pos, max(lens)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def dense_oracle(m: GatedPrefixLMAttention, x, cu, prefix, pos):
    """The module's forward from its parameters: one dense masked softmax over the whole pack, query heads grouped
    onto their key/value head by a view (no repeat), rotate-half MRoPE by hand."""
    T, H, Hkv, D = x.shape[0], m.n_heads, m.n_kv_heads, m.head_dim
    qg = F.linear(x, m.q_proj.weight, m.q_proj.bias)
    if m.gate == "elementwise":
        q, g = qg.view(T, H, 2, D).unbind(2)
    else:
        q, g = qg[:, : H * D].view(T, H, D), (qg[:, H * D:] if m.gate == "headwise" else None)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(T, Hkv, D)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(T, Hkv, D)
    if m.q_norm is not None:
        q, k = rms(q, m.q_norm.weight, m.q_norm.eps), rms(k, m.k_norm.weight, m.k_norm.eps)
    if m.mrope_section is not None:
        cos, sin = (t.to(x.dtype)[:, None] for t in mrope_cos_sin(pos, D, m.mrope_section, m.mrope_interleaved,
                                                                   m.rope_theta))
        half = lambda t: torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)  # noqa: E731
        q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
    idx = torch.arange(T)
    seq = torch.searchsorted(cu.long(), idx, right=True) - 1
    valid = idx < cu[-1]
    local = idx - cu.long()[seq.clamp(max=len(prefix) - 1)]
    pre = prefix.long()[seq.clamp(max=len(prefix) - 1)]
    mask = (seq[:, None] == seq[None]) & valid[:, None] & valid[None] & ((local[None] < pre[None]) | (idx[None] <= idx[:, None]))
    qs = q.view(T, Hkv, H // Hkv, D)
    s = torch.einsum("tkgd,skd->kgts", qs, k) * D**-0.5
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # padding rows see nothing
    o = torch.einsum("kgts,skd->tkgd", p, v).reshape(T, H, D)
    if g is not None:
        o = o * torch.sigmoid(g if g.dim() == 3 else g[..., None])
    return F.linear(o.reshape(T, H * D), m.o_proj.weight, m.o_proj.bias)


def grads(out, m, x, dout):
    leaves = [x] + list(m.parameters())
    return [out.detach()] + [gr.detach() for gr in torch.autograd.grad(out, leaves, dout)]


# (heads, kv heads, head dim, gate, qk_norm, bias, mrope section or None, interleaved)
MODULES = [
    pytest.param(4, 4, 16, "elementwise", False, True, (2, 3, 3), True, id="mha-elementwise"),
    pytest.param(4, 2, 16, "headwise", True, False, (4, 2, 2), False, id="gqa2-headwise-qknorm-chunked"),
    pytest.param(6, 1, 12, "none", True, True, (2, 2, 2), True, id="mqa-nogate-qknorm"),
    pytest.param(4, 2, 24, "elementwise", True, False, None, True, id="gqa2-norope"),
]


@pytest.mark.parametrize("H,Hkv,D,gate,qk_norm,bias,section,interleaved", MODULES)
def test_module_matches_dense_oracle(H, Hkv, D, gate, qk_norm, bias, section, interleaved):
    torch.manual_seed(0)
    cu, prefix, pos, max_len = pack()
    m = GatedPrefixLMAttention(40, H, n_kv_heads=Hkv, head_dim=D, gate=gate, qk_norm=qk_norm, bias=bias,
                               mrope_section=section, mrope_interleaved=interleaved, impl="reference").double()
    with torch.no_grad():  # non-trivial norm scales and biases, so their gradients mean something
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(int(cu[-1]) + PAD, 40, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(x.shape, dtype=torch.float64)
    want = grads(dense_oracle(m, x, cu, prefix, pos), m, x, dout)
    got = grads(m(x, cu, prefix, pos, max_len), m, x, dout)
    names = ["out", "x"] + [n for n, _ in m.named_parameters()]
    # the op's reference takes its softmax and rotary in float32 (as the kernels do), the oracle everything in fp64
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    assert got[0][int(cu[-1]):].sub(m.o_proj.bias if bias else 0).abs().max() == 0  # padding: o_proj(0)


def test_module_layout_and_views():
    m = GatedPrefixLMAttention(64, 4, n_kv_heads=2, head_dim=32)
    assert m.q_proj.weight.shape == (2 * 4 * 32, 64) and m.k_proj.weight.shape == (2 * 32, 64)
    assert m.o_proj.weight.shape == (64, 4 * 32) and m.q_norm is None
    q, k, v, g = m.project(torch.randn(5, 64))
    assert q.shape == g.shape == (5, 4, 32) and k.shape == v.shape == (5, 2, 32)
    assert q.data_ptr() + 32 * 4 == g.data_ptr() and not q.is_contiguous()  # per head [q_h | g_h], no copy
    _, _, _, g = GatedPrefixLMAttention(64, 4, gate="headwise").project(torch.randn(5, 64))
    assert g.shape == (5, 4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_kv_heads must divide"):
        GatedPrefixLMAttention(64, 4, n_kv_heads=3)
    with pytest.raises(ValueError, match="gate must be one of"):
        GatedPrefixLMAttention(64, 4, gate="channelwise")
    with pytest.raises(ValueError, match="head_dim must be even"):
        GatedPrefixLMAttention(64, 4, head_dim=15)
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        GatedPrefixLMAttention(64, 4)(torch.randn(3, 64))
    with pytest.raises(ValueError, match="reduction"):
        LinearCrossEntropy(8, 10, reduction="max")


def test_linear_cross_entropy_module():
    torch.manual_seed(0)
    head = LinearCrossEntropy(24, 37, bias=True, softcap=5.0, impl="reference")
    lin = torch.nn.Linear(24, 37)
    assert set(head.state_dict()) == set(lin.state_dict())  # an nn.Linear's state dict loads as is
    head.load_state_dict(lin.state_dict())
    h, t = torch.randn(9, 24), torch.randint(0, 37, (9,))
    t[3] = -100
    want = F.cross_entropy(5.0 * torch.tanh(lin(h) / 5.0), t, ignore_index=-100)
    torch.testing.assert_close(head(h, t), want)
    torch.testing.assert_close(head.logits(h), 5.0 * torch.tanh(lin(h) / 5.0))

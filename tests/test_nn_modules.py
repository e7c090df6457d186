"""genlip_fast.nn: the modules against a dense oracle written here from the parameters (forward and every gradient),
for grouped-query / multi-query attention, per-head q/k norm and the three gates; ``torch.compile(fullgraph=True)``
over both modules; FSDP2 over gloo (two ranks) with the modules compiled and sharded; bad arguments raise."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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


def test_compile_fullgraph_equals_eager():
    """Both modules on the fused ops (GQA, q/k norm, rotary, elementwise gate) in one graph: no graph break
    (``fullgraph=True`` raises on one), the same loss and gradients as eager."""
    torch.manual_seed(0)
    cu, prefix, pos, max_len = pack()
    T = int(cu[-1]) + PAD
    attn = GatedPrefixLMAttention(48, 4, n_kv_heads=2, head_dim=16, qk_norm=True, mrope_section=(2, 3, 3),
                                  impl="triton")
    head = LinearCrossEntropy(48, 61, reduction="sum", impl="triton")
    targets = torch.randint(0, 61, (T,))
    targets[int(cu[-1]):] = -100

    def step(x):
        return head(attn(x, cu, prefix, pos, max_len), targets)

    x = torch.randn(T, 48)
    leaves = [x] + list(attn.parameters()) + list(head.parameters())

    def loss_and_grads(f):
        xi = x.clone().requires_grad_()
        loss = f(xi)
        return [loss.detach()] + list(torch.autograd.grad(loss, [xi] + leaves[1:]))

    eager = loss_and_grads(step)
    compiled = loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fsdp2_two_ranks_with_compiled_modules(tmp_path):
    """tests/nn_fsdp_worker.py on two gloo ranks: tiny-qwen3's attention modules and head compiled with
    ``fullgraph=True`` and sharded with ``fully_shard``, inside the trainer's ``apply_fsdp``; gradients equal an
    unsharded eager model's on both ranks' data."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    worker = Path(__file__).resolve().parent / "nn_fsdp_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(out)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    res = json.loads(out.read_text())
    assert res["dtensor_params"] == res["params"] > 0  # every parameter is sharded
    # Two ranks sum their gradients by all-reduce, the reference over one model: the same up to fp32 rounding.
    assert res["max_rel_err"] < 1e-5, res


def test_readme_example_runs_and_packs_like_one_image_at_a_time():
    """The README's "Using the ops in your model" block, run as written (here on the Triton path, in the
    interpreter); its block then gives each image the same result alone, and the reference op's result."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("## Using the ops in your model", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    block, x, y, lens = ns["block"], ns["x"], ns["y"], ns["lens"]
    assert y.shape == (56, 384) and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        start = 0
        for (h, w), n in zip(ns["grids"], lens):
            one = torch.tensor([0, n], dtype=torch.int32)
            alone = block(x[start:start + n], one, one[1:], mrope_position_ids([(h, w)], [0]), n)
            torch.testing.assert_close(alone, y[start:start + n], atol=1e-5, rtol=1e-5)
            start += n
        block.attn.impl = "reference"
        ref = block(x, ns["cu_seqlens"], ns["prefix_lens"], ns["position_ids"], max(lens))
    torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)

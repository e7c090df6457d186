"""The Qwen3-0.6B-architecture preset (paper Table 9) built from genlip_fast.nn: its shapes and parameter count,
the tiny variant through the model, the KV-cache captioner, the trainer and the FLOP counter."""

import pytest
import torch

from genlip_fast.data import Sample, pack_samples
from genlip_fast.model import PAPER_PARAMS, GenLIP, count_parameters, get_preset
from genlip_fast.speak import generate
from genlip_fast.train.flops import prefix_lm_pairs, training_flops

LAYOUT = [(2, 3, 5, 0), (1, 1, 1, 0), (0, 0, 4, 0), (3, 2, 6, 2), (4, 1, 7, 0)]


def make_samples(cfg, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Sample(torch.randn(h * w, cfg.patch_dim, generator=g), (h, w),
                   torch.randint(3, cfg.vocab_size, (n,), generator=g),
                   torch.randint(3, cfg.vocab_size, (p,), generator=g), key=str(i))
            for i, (h, w, n, p) in enumerate(layout)]


def test_qwen3_preset_shapes_and_parameter_count(capsys):
    cfg = get_preset("qwen3_0.6b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim) == (1024, 28, 16, 8,
                                                                                                   128, 3072)
    assert cfg.mrope_section == (16, 24, 24) and cfg.mrope_interleaved and cfg.rope_theta == 10000.0
    assert (cfg.norm, cfg.qk_norm, cfg.attn_bias, cfg.gate, cfg.layer_scale_init) == ("rmsnorm", True, False,
                                                                                     "elementwise", None)
    with torch.device("meta"):
        model = GenLIP(cfg)
    attn = model.blocks[0].attn
    assert attn.q_proj.bias is None and attn.q_norm.weight.shape == (128,) and model.blocks[0].ls1 is None
    c = count_parameters(model)
    d, f, hq, hkv = 1024, 3072, 16 * 128, 8 * 128
    per_block = d * 2 * hq + 2 * d * hkv + hq * d + 3 * d * f + 2 * d + 2 * 128  # q+gate, k, v, o, MLP, norms
    assert c["blocks"] + c["gate"] == 28 * per_block and c["gate"] == 28 * d * hq
    assert c["text_embed"] == c["lm_head"] == 151936 * d  # untied
    assert abs(c["blocks"] / PAPER_PARAMS["qwen3_0.6b"] - 1) < 0.01  # the model card's 0.44B without embeddings
    from genlip_fast.model.__main__ import main

    main()  # `python -m genlip_fast.model`: the row right under So/16's
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[names.index("So/16") + 1] == "qwen3_0.6b"
    assert rows[names.index("qwen3_0.6b")].rstrip(" |").endswith(f"{c['total'] / 1e6:.1f}M")


def test_tiny_qwen3_packed_equals_one_at_a_time_and_every_parameter_learns():
    torch.manual_seed(0)
    cfg = get_preset("tiny-qwen3", attn_backend="reference", ce_backend="reference")
    model = GenLIP(cfg)
    samples = make_samples(cfg, LAYOUT)
    pack = pack_samples(samples, pad_to=80)
    model(pack).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"
    model.eval()
    h_pack, cu = model.hidden_states(pack), pack.cu_seqlens.tolist()
    for i, s in enumerate(samples):
        torch.testing.assert_close(h_pack[cu[i]:cu[i + 1]], model.hidden_states(pack_samples([s])), atol=2e-5,
                                   rtol=1e-5)


def test_tiny_qwen3_kv_cache_captions_equal_recompute():
    torch.manual_seed(0)
    model = GenLIP(get_preset("tiny-qwen3", attn_backend="reference", ce_backend="reference")).eval()
    grids = [(2, 3), (1, 1), (4, 2)]
    g = torch.Generator().manual_seed(1)
    patches = [torch.randn(h * w, model.cfg.patch_dim, generator=g) for h, w in grids]
    want = model.generate(patches, grids, eot_id=-1, max_new_tokens=6, prompt_ids=torch.tensor([5, 9]))
    assert generate(model, patches, grids, stop_ids=(), prompt_ids=[5, 9], max_new_tokens=6) == want


def test_tiny_qwen3_flops_by_hand():
    cfg = get_preset("tiny-qwen3", vocab_size=100)  # d 64, 4 query / 2 kv heads of 32, FFN 160, 2 layers
    lw = 64 * (128 + 128) + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 160  # q+gate, k and v (2 heads of 32), o, SwiGLU
    fwd = 2 * lw * 10 * 2 + 4 * 128 * prefix_lm_pairs(4, 6) * 2 + 2 * 64 * 100 * 6
    assert training_flops(cfg, [10], [4], 6) == 3 * fwd + 2 * (2 * 768 * 64 * 4)


def test_tiny_qwen3_trains_with_the_trainer_and_is_not_exported_as_the_authors_layout(shapes, tmp_path):
    from genlip_fast.checkpoint import OfficialFormatError, load_checkpoint_model
    from genlip_fast.checkpoint.official import config_to_official
    from genlip_fast.train.trainer import train
    from tiny_run import tiny_config

    res = train(tiny_config(shapes, tmp_path / "run", steps=3, model__preset="tiny-qwen3"), progress=False)
    assert len(res["losses"]) == 3 and all(torch.isfinite(torch.tensor(res["losses"])))
    model, meta = load_checkpoint_model(tmp_path / "run")
    assert model.cfg.num_kv_heads == 2 and model.cfg.qk_norm and meta["step"] == 3
    with pytest.raises(OfficialFormatError, match="norm='rmsnorm', qk_norm=True, attn_bias=False, num_kv_heads=2"):
        config_to_official(model.cfg)


def test_stage1_job_config_builds_the_preset():
    from genlip_fast.data.tokenizer import load_tokenizer
    from genlip_fast.train.config import load_config
    from genlip_fast.train.trainer import build_model_config

    cfg = load_config("qwen3_0.6b_stage1")
    assert build_model_config(cfg, load_tokenizer("demo")) == get_preset("qwen3_0.6b")  # 151,936 rows kept
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps, cfg.data.pack_tokens) == (1e-3, 0.01, 33000, 16384)


@pytest.mark.parametrize("steps", [6, pytest.param(30, marks=pytest.mark.slow)])
def test_tiny_qwen3_fused_ops_follow_reference_losses(steps):
    """tiny-qwen3 (GQA 4/2 heads, q/k norm, gate) trained on the fused ops (Triton attention with grouped K/V,
    fused LM-head CE; CPU interpreter) follows the reference ops' loss within 1e-4 relative for 6 fp32 steps in CI,
    30 with --runslow. Cheap on purpose (1-2 CPU s a step in the interpreter): one block, a 97-word vocabulary, three packs of an
    image + caption and a text-only sample seen in turn (the loss falls, so a wrong gradient, e.g. dK/dV not summed
    over a group, shows up as a drifting curve)."""
    from test_attention_model_parity import _train

    torch.manual_seed(0)
    cfg = get_preset("tiny-qwen3", attn_backend="reference", ce_backend="reference", vocab_size=97, n_layers=1)
    ref_model = GenLIP(cfg)
    fused_model = GenLIP(cfg.replace(attn_backend="triton", ce_backend="triton"))
    fused_model.load_state_dict(ref_model.state_dict())
    packs = [pack_samples(make_samples(cfg, [(2, 3, 6, 0), (0, 0, 5, 0)], seed=s), pad_to=24) for s in range(3)]
    batches = [packs[i % 3] for i in range(steps)]
    ref = _train(ref_model, batches)
    fused = _train(fused_model, batches)
    assert ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(fused, ref)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: fused {a:.6f} vs reference {b:.6f}"

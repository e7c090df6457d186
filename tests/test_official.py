"""The authors' checkpoint layout: an independent forward over their weight names agrees with ours, files round-trip
(sharded too), bad state dicts are refused by name, and their model JSONs map to our presets' parameter counts."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genlip_fast.checkpoint.official import (
    OfficialFormatError,
    config_from_official,
    config_to_official,
    from_official,
    load_official,
    read_official,
    to_official,
    write_official,
)
from genlip_fast.data import Sample, pack_samples
from genlip_fast.model import GenLIP, count_parameters, get_preset
from genlip_fast.ops.prefix_lm_attention.reference import prefix_lm_mask

ASSETS = Path(__file__).parent / "assets" / "official"


def random_model(preset, **over):
    """A tiny model with every parameter random (biases and layer scales too), as a trained one would be."""
    torch.manual_seed(0)
    model = GenLIP(get_preset(preset, attn_backend="reference", ce_backend="reference", **over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1) + (p.dim() == 1) * 0.05)
    return model


def official_forward(c: dict, sd: dict, pack) -> torch.Tensor:
    """Logits ``(T, V)`` from the authors' weight names and config, written from DESIGN.md's description of their
    code (not from genlip_fast's modules): q_proj -> [all q | all gate], interleaved MRoPE with rotate-half, mask =
    same sample and (k <= q or both image), layer scale, SwiGLU fc2(silu(gate_fc) * fc1), ln_post -> proj -> head."""
    d, H = c["hidden_size"], c["num_attention_heads"]
    D, eps = d // H, c.get("layer_norm_eps", 1e-6)
    lin = lambda x, name: F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))  # noqa: E731
    ln = lambda x, name: F.layer_norm(x, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)  # noqa: E731
    T = pack.num_tokens
    x = torch.zeros(T, d)
    conv = sd["vision_embeddings.patch_embedding.weight"]  # (d, 3, p, p): a linear map on patches flattened (c, y, x)
    x[pack.image_index] = F.linear(pack.patches, conv.flatten(1), sd["vision_embeddings.patch_embedding.bias"])
    txt = sd["embeddings.weight"][pack.input_ids[pack.text_index]]
    x[pack.text_index] = lin(txt, "in_proj") if "in_proj.weight" in sd else txt
    # interleaved MRoPE: inverse frequency j takes h if j % 3 == 1 and j < 3 s_h, w if j % 3 == 2 and j < 3 s_w
    s_t, s_h, s_w = c["rope_scaling"]["mrope_section"]
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)).float()
    j = torch.arange(D // 2)
    axis = torch.where((j % 3 == 1) & (j < 3 * s_h), 1, torch.where((j % 3 == 2) & (j < 3 * s_w), 2, 0))
    ang = pack.position_ids.float()[axis].t() * inv  # (T, D/2)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = lambda t: t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1) * sin  # noqa: E731
    mask = prefix_lm_mask(pack.cu_seqlens, pack.prefix_lens, T)
    for i in range(c["num_hidden_layers"]):
        p = f"visual.layers.{i}"
        h = ln(x, f"{p}.layer_norm1")
        q, g = lin(h, f"{p}.self_attn.q_proj").chunk(2, dim=-1)
        q, g = q.view(T, H, D), g.view(T, H, D)
        k, v = lin(h, f"{p}.self_attn.k_proj").view(T, H, D), lin(h, f"{p}.self_attn.v_proj").view(T, H, D)
        s = torch.einsum("qhd,khd->hqk", rot(q), rot(k)) * D**-0.5
        a = s.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        o = torch.einsum("hqk,khd->qhd", a, v) * torch.sigmoid(g)
        x = x + sd[f"{p}.layer_scale1.lambda1"] * lin(o.reshape(T, d), f"{p}.self_attn.out_proj")
        h = ln(x, f"{p}.layer_norm2")
        m = lin(F.silu(lin(h, f"{p}.mlp.gate_fc")) * lin(h, f"{p}.mlp.fc1"), f"{p}.mlp.fc2")
        x = x + sd[f"{p}.layer_scale2.lambda1"] * m
    x = ln(x, "ln_post")
    x = lin(x, "proj") if "proj.weight" in sd else x
    return x @ sd["lm_head.weight"].t()


def pack_for(cfg):
    g = torch.Generator().manual_seed(3)
    layout = [(2, 3, 5, 2), (3, 2, 4, 0), (1, 4, 3, 1)]
    return pack_samples([Sample(torch.randn(h * w, cfg.patch_dim, generator=g), (h, w),
                                torch.randint(3, cfg.vocab_size, (n,), generator=g),
                                torch.randint(3, cfg.vocab_size, (p,), generator=g)) for h, w, n, p in layout])


@pytest.mark.parametrize("preset,over", [("tiny", {"mlp_bias": True}), ("tiny-hd72", {"mlp_bias": True}),
                                         ("tiny-textproj", {"mlp_bias": True, "gate": "elementwise",
                                                            "mrope_interleaved": True})])
def test_official_layout_forward_equals_ours(preset, over):
    model = random_model(preset, **over)
    cfg = model.cfg
    c = config_to_official(cfg)
    sd = to_official(model.state_dict(), cfg)
    pack = pack_for(cfg)
    everywhere = torch.arange(pack.num_tokens)
    ours = model.logits_at(pack, everywhere)
    torch.testing.assert_close(official_forward(c, sd, pack), ours, atol=2e-5, rtol=1e-4)
    # and loading their state dict back gives the same model, tensor for tensor
    back = GenLIP(config_from_official({k: v for k, v in c.items() if k != "genlip_fast_model_config"}))
    back.load_state_dict(from_official(sd, back.cfg))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_files_round_trip_sharded_with_index_and_both_rope_types(tmp_path):
    model = random_model("tiny-hd72", mlp_bias=True)
    c = config_to_official(model.cfg)
    del c["genlip_fast_model_config"]
    c["rope_scaling"] = {"type": "default", "rope_type": "default", "mrope_section": [12, 12, 12]}  # as they save it
    files = write_official(tmp_path / "m", c, to_official(model.state_dict(), model.cfg), max_shard_bytes=200_000)
    assert len(files) > 2 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loaded, inputs = load_official(tmp_path / "m")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert inputs.prompt == "Describe the image in detail." and inputs.stop == ("<|im_end|>",)
    assert inputs.image.pixel_mean == (0.5, 0.5, 0.5) and inputs.tokenizer == "qwen"
    c["rope_scaling"]["type"] = "yarn"
    c["rope_scaling"].pop("rope_type")
    with pytest.raises(OfficialFormatError, match="rope_scaling"):
        config_from_official(c)


def test_bad_official_state_dicts_are_refused_by_name(tmp_path):
    model = random_model("tiny", mlp_bias=True)
    cfg = model.cfg
    good = to_official(model.state_dict(), cfg)
    missing = {k: v for k, v in good.items() if k != "visual.layers.1.mlp.fc1.bias"}
    with pytest.raises(OfficialFormatError, match=r"missing \['visual.layers.1.mlp.fc1.bias'\]"):
        from_official(missing, cfg)
    extra = {**good, "visual.layers.0.self_attn.q_norm.weight": torch.ones(32)}
    with pytest.raises(OfficialFormatError, match=r"unexpected \['visual.layers.0.self_attn.q_norm.weight'\]"):
        from_official(extra, cfg)
    shaped = {**good, "visual.layers.2.self_attn.k_proj.weight": torch.zeros(64, 128)}
    with pytest.raises(OfficialFormatError, match=r"visual.layers.2.self_attn.k_proj.weight: \(64, 128\) "
                                                  r"\(expected \(128, 128\)\)"):
        from_official(shaped, cfg)
    with pytest.raises(OfficialFormatError, match="visual.layers.0.mlp.gate_fc.bias is not zero"):
        from_official(good, cfg.replace(mlp_bias=False))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_official(tmp_path)


def test_paper_model_exports_with_zero_mlp_biases():
    model = random_model("tiny")  # mlp_bias=False, as the paper presets
    sd = to_official(model.state_dict(), model.cfg)
    assert sd["visual.layers.0.mlp.fc1.bias"].abs().sum() == 0
    back = GenLIP(config_from_official(config_to_official(model.cfg)))  # the genlip_fast config travels along
    assert not back.cfg.mlp_bias
    back.load_state_dict(from_official(sd, back.cfg))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def official_json_params(c: dict) -> int:
    """Parameters of the authors' GenLIPModel for a config, counted from their module list (DESIGN.md)."""
    d, f, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    t, p = c["text_embed_dim"], c["patch_size"]
    layer = 4 * d + (d * 2 * d + 2 * d) + 3 * (d * d + d) + 2 * (d * f + f) + (f * d + d) + 2 * d
    text = V * t + (2 * t * d + t + d if t != d else 0) + V * t
    return 3 * p * p * d + d + L * layer + 2 * d + text


def test_authors_model_jsons_map_to_the_official_presets(capsys):
    from genlip_fast.model.__main__ import main

    main()  # `python -m genlip_fast.model`
    rows = capsys.readouterr().out.splitlines()
    for size, preset in [("l16", "L/16-official"), ("so16", "So/16-official"), ("g16", "g/16-official")]:
        c = json.loads((ASSETS / f"genlip_{size}_224.json").read_text())
        cfg = config_from_official(c)
        assert cfg == get_preset(preset)
        with torch.device("meta"):
            total = count_parameters(GenLIP(cfg))["total"]
        assert total == official_json_params(c)
        row = next(line for line in rows if line.startswith(f"| {preset} |"))
        assert row.rstrip(" |").endswith(f"{total / 1e6:.1f}M"), (row, total)


def test_authors_run_configs_and_model_options_reach_the_model():
    from genlip_fast.data.tokenizer import load_tokenizer
    from genlip_fast.train.config import ConfigError, load_config
    from genlip_fast.train.trainer import build_model_config

    s1, s2 = load_config("so16_official_stage1"), load_config("so16_official_stage2")
    tok = load_tokenizer("demo")  # only its size is read: the presets keep their 151,936 rows
    for cfg in (s1, s2):
        assert cfg.optim.weight_decay == 0.01 and cfg.train.packs_per_step == 512
        # their AdamW decays every parameter, their pixels are (u8/255 - 0.5)/0.5; GPU presets name every fast piece
        assert (cfg.optim.decay, cfg.data.pixel_norm) == ("all", "half")
        assert (cfg.data.backend, cfg.model.attn_backend, cfg.model.ce_backend) == ("dali", "triton", "triton")
        assert build_model_config(cfg, tok) == get_preset("So/16-official", attn_backend="triton",
                                                           ce_backend="triton")
    assert (s1.optim.lr, s2.optim.lr, s1.train.steps, s2.train.steps) == (1e-3, 1e-4, 264000, 12000)
    assert s2.data.stage == 2 and s2.checkpoint.init_from == s1.train.out_dir
    over = load_config("tiny", ["--model.mlp_bias=true", "--model.drop_path_mode=pack",
                                "--model.drop_path_schedule=constant"])
    m = build_model_config(over, tok)
    assert (m.mlp_bias, m.drop_path_mode, m.drop_path_schedule) == (True, "pack", "constant")
    unset = build_model_config(load_config("tiny"), tok)
    assert unset == get_preset("tiny", vocab_size=tok.vocab_size)  # options left unset keep the preset's
    with pytest.raises(ConfigError, match="model.drop_path_mode"):
        load_config("tiny", ["--model.drop_path_mode=token"])

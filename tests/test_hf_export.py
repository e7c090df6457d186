"""The transformers package (``python -m genlip_fast.convert export-hf``), loaded by transformers itself, offline:
features equal genlip_fast's encoder, the processor makes genlip_fast's patches bit for bit, saving round-trips, the
code files import nothing else, bad configs are refused by name; and the authors' checkpoints preprocess as
transformers' SigLIP / Qwen2-VL processors do, configured as the authors configure them.

One module-scoped export is shared (importing transformers alone costs seconds)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import genlip_fast
from genlip_fast.checkpoint.hf import export as hf_export
from genlip_fast.checkpoint.hf.export import HFExportError, hf_config
from genlip_fast.checkpoint.official import config_to_official, to_official, write_official
from genlip_fast.convert import main as convert_main
from genlip_fast.data.inputs import ImageTransform, InputSpec
from genlip_fast.data.transforms import grid_for, stage1_geometry
from genlip_fast.model import get_preset
from test_official import random_model  # every parameter random, as a trained model's

pytest.importorskip("transformers")

SIZES = [(64, 64), (40, 100), (130, 50), (1, 2000), (3, 5), (2, 2), (301, 97)]


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny genlip_fast model in the authors' layout (a form every command reads), exported with the CLI at its
    native aspect ratio and at a fixed 32 px, and loaded by transformers with HF_HUB_OFFLINE=1."""
    root = tmp_path_factory.mktemp("hf")
    model = random_model("tiny", mlp_bias=True, n_layers=2)
    inputs = InputSpec(image=ImageTransform())  # genlip_fast's own rule and CLIP statistics
    src = root / "ckpt"
    official = {**config_to_official(model.cfg), "genlip_fast_inputs": inputs.to_dict()}
    write_official(src, official, to_official(model.state_dict(), model.cfg))
    assert convert_main(["export-hf", str(src), str(root / "native")]) == 0
    assert convert_main(["export-hf", str(src), str(root / "fixed"), "--image-size", "32"]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from transformers import AutoImageProcessor, AutoModel

        loaded = {name: (AutoModel.from_pretrained(root / name, trust_remote_code=True).eval(),
                         AutoImageProcessor.from_pretrained(root / name, trust_remote_code=True))
                  for name in ("native", "fixed")}
    encoder = genlip_fast.load_encoder(src, attn_backend="reference")
    return {"root": root, "src": src, "encoder": encoder, **loaded}


def test_processor_makes_genlip_fasts_patches_bit_for_bit(hf):
    _, proc = hf["native"]
    enc = hf["encoder"]
    ims = images()
    batch = proc(ims, return_tensors="pt")
    want = enc.pack(ims)
    assert torch.equal(batch["pixel_values"], want.patches)  # the 1x2000 strip and 2x2 image included
    assert batch["image_grid_thw"][:, 1:].tolist() == want.grid_hw.tolist()
    assert (batch["image_grid_thw"][:, 0] == 1).all()
    from PIL import Image

    assert torch.equal(proc(Image.fromarray(ims[1]), return_tensors="pt")["pixel_values"], enc.pack([ims[1]]).patches)
    # the fixed-size form: (B, 3, 32, 32), shorter side + centre crop as genlip_fast's stage 1
    _, fixed = hf["fixed"]
    px = fixed(ims, return_tensors="pt")["pixel_values"]
    assert px.shape == (len(ims), 3, 32, 32) and fixed.crop_size == {"height": 32, "width": 32}
    square = ImageTransform(image_size=32)
    for im, x in zip(ims, px):
        p, grid = square(im)
        assert grid == (2, 2) and torch.equal(x.reshape(3, 2, 16, 2, 16).permute(1, 3, 0, 2, 4).reshape(4, 768), p)


def test_restated_geometry_equals_its_originals():
    """The remote processor cannot import genlip_fast, so it restates three rules; each equals its original (and
    ``smart_resize`` transformers' own) over many sizes. Pure arithmetic: cheap."""
    try:  # transformers 5 (its other Qwen2-VL processor module needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2vl_smart_resize
    except ImportError:  # 4.x
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen2vl_smart_resize

    from genlip_fast.checkpoint.hf import image_processing_genlip_fast as remote
    from genlip_fast.data.inputs import smart_resize

    def outcome(f, *args):
        try:
            return f(*args)
        except ValueError as e:
            return "aspect ratio" in str(e)  # all three refuse past 200 with that phrase

    for h in range(1, 700, 7):
        for w in (1, 2, 15, 16, 17, 100, 333, 1000, 4000):
            assert remote.native_grid(h, w, 16, 16, 1024) == grid_for(h, w, stage=2, image_size=0, patch=16), (h, w)
            for S in (16, 32, 224, 384):
                want = tuple(int(v) for v in stage1_geometry(h, w, size=S))
                assert remote.shorter_side_geometry(h, w, S) == want, (h, w, S)
            for lo, hi in ((4096, 262144), (16 * 256, 1024 * 256), (256, 64 * 256)):
                got = outcome(remote.smart_resize, h, w, 16, lo, hi)
                assert got == outcome(smart_resize, h, w, 16, lo, hi) == outcome(qwen2vl_smart_resize, h, w, 16, lo,
                                                                                     hi), (h, w, lo, hi)


def test_features_equal_load_encoder(hf):
    model, proc = hf["native"]
    enc = hf["encoder"]
    ims = images()
    with torch.no_grad():
        ref = enc.encode(ims, layers=list(range(len(enc.model.blocks))))  # every block, as hidden_states has them
        out = model(**proc(ims, return_tensors="pt"), output_hidden_states=True)
        alone = [model(**proc([im], return_tensors="pt")).last_hidden_state for im in ims[2:5]]
    counts = [f.shape[1] for f in ref.patches]  # (layers, patches, d) per image
    feats = out.last_hidden_state.split(counts)
    final = enc(ims)
    for got, want in zip(feats, final):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for one, want in zip(alone, final[2:5]):  # a batch = one at a time
        torch.testing.assert_close(one, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, torch.stack([f.mean(0) for f in final]), atol=1e-6, rtol=1e-5)
    assert len(out.hidden_states) == len(enc.model.blocks) + 1  # embeddings, then every block's output
    for i, h in enumerate(out.hidden_states[1:]):
        torch.testing.assert_close(h, torch.cat([p[i] for p in ref.patches]), atol=1e-5, rtol=1e-5)
    # (B, 3, H, W) pixels give the flat form's features
    fixed, fproc = hf["fixed"]
    with torch.no_grad():
        px = fproc(ims, return_tensors="pt")["pixel_values"]
        grid = torch.tensor([[1, 2, 2]] * len(ims))
        flat = fixed.patchify(px).reshape(-1, 768)
        a, b = fixed(pixel_values=px), fixed(pixel_values=flat, image_grid_thw=grid)
    assert a.last_hidden_state.shape == (len(ims), 4, enc.dim) and a.pooler_output.shape == (len(ims), enc.dim)
    torch.testing.assert_close(a.last_hidden_state.reshape(-1, enc.dim), b.last_hidden_state, atol=1e-6, rtol=1e-5)
    square = genlip_fast.load_encoder(hf["src"], image_size=32, attn_backend="reference")
    torch.testing.assert_close(a.last_hidden_state, torch.stack(square(ims)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-textproj", "tiny-hd72"])
def test_other_blocks_match_too(preset, tmp_path):
    """Grouped-query heads with RMSNorm, q/k norm and no layer scales (qwen3); the headwise gate with chunked MRoPE
    (textproj); head dim 72."""
    from transformers import AutoModel

    from genlip_fast.speak import VisionEncoder

    model = random_model(preset)
    hf_export.write_hf(model, ImageTransform(), tmp_path / preset)
    tower = AutoModel.from_pretrained(tmp_path / preset, trust_remote_code=True).eval()
    enc = VisionEncoder(model)
    ims = images()[:3]
    batch = enc.pack(ims)
    with torch.no_grad():
        got = tower(pixel_values=batch.patches, image_grid_thw=torch.nn.functional.pad(batch.grid_hw, (1, 0), value=1))
        torch.testing.assert_close(got.last_hidden_state, enc.features(batch), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients(hf):
    """Under both names of the switch (4.x's ``gradient_checkpointing_enable``, 5.x's
    ``activation_checkpointing_enable`` with ``every_n_layers``) the blocks run again in the backward and the
    gradients do not change; reentrant checkpointing with a frozen patch embedding reaches the blocks once
    ``enable_input_require_grads`` (PEFT's call) hooks the patch embedding."""
    model, proc = hf["native"]
    batch = proc(images()[:2], return_tensors="pt")
    calls = []
    # a recompute calls the block's forward (5.x) or __call__ (4.x): only its children's hooks see it in both
    hooks = [b.attn.register_forward_hook(lambda *_: calls.append(1)) for b in model.blocks]

    def run(enable=None, **kwargs):
        calls.clear()
        model.train().zero_grad(set_to_none=True)
        if enable is not None:
            getattr(model, enable)(**kwargs)
        try:
            model(**batch).pooler_output.square().sum().backward()
        finally:
            model.gradient_checkpointing_disable()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()], len(calls)

    n = len(model.blocks)
    try:
        plain, count = run()
        assert count == n
        switches = [("gradient_checkpointing_enable", {}, 2 * n)]
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            switches += [("activation_checkpointing_enable", {}, 2 * n),
                         ("activation_checkpointing_enable", {"every_n_layers": 2}, n + (n + 1) // 2)]
        for name, kwargs, want in switches:
            grads, count = run(name, **kwargs)
            assert count == want, (name, kwargs, count)  # each checkpointed block ran again in the backward
            for a, b in zip(plain, grads):
                torch.testing.assert_close(a, b)
        model.patch_embed.requires_grad_(False)
        model.enable_input_require_grads()
        grads, count = run("gradient_checkpointing_enable",
                           gradient_checkpointing_kwargs={"use_reentrant": True})
        assert count == 2 * n
        blocks = [i for i, (name, _) in enumerate(model.named_parameters()) if name.startswith("blocks.")]
        for i in blocks:
            torch.testing.assert_close(grads[i], plain[i])
    finally:
        for h in hooks + getattr(model, "_require_grads_hooks", [model.__dict__.get("_require_grads_hook")]):
            if h is not None:
                h.remove()
        model.patch_embed.requires_grad_(True)
        model.eval().zero_grad(set_to_none=True)


def test_save_pretrained_round_trips(hf, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    model, proc = hf["native"]
    model.save_pretrained(tmp_path / "again")
    proc.save_pretrained(tmp_path / "again")
    model2 = AutoModel.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    proc2 = AutoImageProcessor.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in model.state_dict().items())
    ims = images()[:3]
    b1, b2 = proc(ims, return_tensors="pt"), proc2(ims, return_tensors="pt")
    assert torch.equal(b1["pixel_values"], b2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**b1).last_hidden_state, model2(**b2).last_hidden_state)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "genlip_fast_vision" and config["genlip_fast"]["source"] == str(hf["src"])


def test_readme_transformers_lines_run_as_written(hf):
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(from transformers import AutoImageProcessor, AutoModel\n.*?)```", readme,
                      re.S).group(1)
    scope = {"images": images()[:2]}
    with torch.no_grad():
        exec(block.replace('"genlip-so16-hf"', repr(str(hf["root"] / "native"))), scope)
    assert len(scope["out"].hidden_states) == 3 and scope["out"].pooler_output.shape == (2, 128)


def test_folder_contents_and_the_code_imports_nothing_else(hf):
    root = hf["root"] / "native"
    config = json.loads((root / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_genlip_fast.GenLIPVisionConfig",
                                  "AutoModel": "modeling_genlip_fast.GenLIPVisionModel"}
    assert (config["hidden_size"], config["patch_size"], config["image_size"]) == (128, 16, 512)
    prov = config["genlip_fast"]
    assert prov["source"] == str(hf["src"]) and prov["step"] is None  # the authors' layout records no step
    assert "commit" in prov and prov["model_config"]["dim"] == 128
    pre = json.loads((root / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "GenLIPImageProcessor" and pre["resize_rule"] == "genlip_fast"
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "PIL"}
    for f in hf_export.CODE_FILES:
        tree = ast.parse((root / f).read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert names <= allowed, (f, names - allowed)


def test_unsupported_configs_and_bad_folders_are_refused_by_name(hf, tmp_path, capsys):
    from transformers import AutoConfig

    with pytest.raises(HFExportError, match="in_channels=1"):
        hf_config(get_preset("tiny", in_channels=1), ImageTransform())
    cfg_cls = type(AutoConfig.from_pretrained(hf["root"] / "native", trust_remote_code=True))
    with pytest.raises(ValueError, match="GenLIPVisionConfig.gate must be one of"):
        cfg_cls(gate="sideways")
    with pytest.raises(ValueError, match="GenLIPVisionConfig.mrope_section"):
        cfg_cls(hidden_size=128, num_attention_heads=4, mrope_section=[4, 6, 4], mrope_interleaved=False)
    with pytest.raises(ValueError, match="GenLIPVisionConfig.num_key_value_heads"):
        cfg_cls(num_attention_heads=4, num_key_value_heads=3)
    assert convert_main(["export-hf", str(hf["src"]), str(hf["root"] / "native")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_sharded_bf16_export_loads(hf, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "bf16"
    assert convert_main(["export-hf", str(hf["src"]), str(out), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    ref, proc = hf["native"]
    batch = proc(images()[:2], return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
        got = model(**batch).last_hidden_state.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


# --- the authors' checkpoints: their processors, as they configure them ----------------------------------------


def authors_folder(root: Path, preprocessor: dict | None) -> Path:
    """A tiny model in the authors' layout with their processor config (as their runs save it), no genlip_fast keys."""
    model = random_model("tiny", mlp_bias=True)
    config = config_to_official(model.cfg)
    del config["genlip_fast_model_config"]
    write_official(root, config, to_official(model.state_dict(), model.cfg))
    if preprocessor is not None:
        (root / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return root


SIGLIP2 = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
"""google/siglip2-base-patch16-224's processor, which the authors' stage-1 YAMLs name."""
NAVIT = {"image_processor_type": "GenLIPNaViTImageProcessor", "min_pixels": 4096, "max_pixels": 262144,
         "patch_size": 16, "temporal_patch_size": 1, "merge_size": 1, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5]}
"""The authors' stage-2 ``mm_configs`` (their Qwen2-VL-style processor)."""


LAST = {"input_data_format": "channels_last"}
"""As the authors call their processors (``process_sample`` in their training tasks): without it transformers
takes a 3 x 5 image for channels-first."""


def stock_processors():
    """transformers' own SigLIP and Qwen2-VL processors on the PIL path, configured as the authors configure them
    (transformers 5 names the PIL classes apart; 4.x's classes are the PIL ones)."""
    try:
        from transformers import Qwen2VLImageProcessorPil as Qwen2VL
        from transformers import SiglipImageProcessorPil as Siglip
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Qwen2VL
        from transformers import SiglipImageProcessor as Siglip
    siglip = Siglip(**{k: v for k, v in SIGLIP2.items() if k != "image_processor_type"})
    qwen = Qwen2VL(min_pixels=4096, max_pixels=262144, patch_size=16, temporal_patch_size=1, merge_size=1,
                   resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return siglip, qwen


def test_authors_checkpoints_preprocess_as_their_processors(tmp_path):
    from genlip_fast.checkpoint.load import load_model

    siglip, qwen = stock_processors()
    from PIL import Image

    odd = [Image.fromarray(im) for im in images(1) if max(im.shape[:2]) / min(im.shape[:2]) <= 200]
    _, stage1 = load_model(authors_folder(tmp_path / "s1", SIGLIP2), need_text=False)
    _, navit = load_model(authors_folder(tmp_path / "s2", NAVIT), need_text=False)
    assert (stage1.image.resize_rule, stage1.image.image_size) == ("siglip_qwen2vl", 224)
    assert (navit.image.resize_rule, navit.image.image_size) == ("siglip_qwen2vl", None)
    for im in odd:
        p, grid = stage1.image(im)
        want = siglip(im, return_tensors="pt", **LAST)["pixel_values"][0]  # (3, 224, 224)
        assert grid == (14, 14)
        assert torch.equal(p, want.reshape(3, 14, 16, 14, 16).permute(1, 3, 0, 2, 4).reshape(196, 768))
        p, grid = navit.image(im)
        want = qwen(im, return_tensors="pt", **LAST)
        assert torch.equal(p, want["pixel_values"]) and [1, *grid] == want["image_grid_thw"][0].tolist()
    with pytest.raises(ValueError, match="aspect ratio"):
        navit.image(Image.fromarray(images(1)[3]))  # 1 x 2000, as Qwen2-VL's smart_resize refuses it
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen(Image.fromarray(images(1)[3]), **LAST)
    # no processor config: the native-aspect rule; an unsupported resample is refused by name
    _, bare = load_model(authors_folder(tmp_path / "s0", None), need_text=False)
    assert (bare.image.resize_rule, bare.image.image_size) == ("siglip_qwen2vl", None)
    with pytest.raises(ValueError, match="resample"):
        load_model(authors_folder(tmp_path / "s3", {**NAVIT, "resample": 3}), need_text=False)


def test_exported_authors_checkpoint_names_the_stock_processor(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    siglip, qwen = stock_processors()
    for name, pre, stock in (("s1", SIGLIP2, siglip), ("s2", NAVIT, qwen)):
        src = authors_folder(tmp_path / name, pre)
        assert convert_main(["export-hf", str(src), str(tmp_path / f"{name}-hf")]) == 0
        plain = AutoImageProcessor.from_pretrained(tmp_path / f"{name}-hf")  # as LLaVA-NeXT loads it
        ours = AutoImageProcessor.from_pretrained(tmp_path / f"{name}-hf", trust_remote_code=True)
        assert type(plain).__name__.startswith(type(stock).__name__.removesuffix("Pil"))
        assert type(ours).__name__ == "GenLIPImageProcessor"
        for im in images(2)[:3]:
            a, b = plain(Image.fromarray(im), return_tensors="pt"), ours(im, return_tensors="pt")
            assert torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.slow
def test_transformers_4x_loads_the_export_too():
    """The same tests under transformers 4.x, in the interpreter named by GENLIP_TRANSFORMERS4_PYTHON: a venv made
    with ``python3 -m venv /tmp/t4 && /tmp/t4/bin/pip install torch==2.13.0 'transformers>=4.57,<5' pillow pytest``
    (the README's tests paragraph)."""
    python = os.environ.get("GENLIP_TRANSFORMERS4_PYTHON")
    if not python:
        pytest.skip("set GENLIP_TRANSFORMERS4_PYTHON to a python with transformers 4.x")
    version = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("4."), version
    r = subprocess.run([python, "-m", "pytest", __file__, "-q", "-k", "not transformers_4x", "-p", "no:cacheprovider"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

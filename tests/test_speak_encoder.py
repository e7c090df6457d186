"""The vision-encoder module and image inputs: the data pipeline's transforms reused exactly, other pixel
statistics, DALI decode, packing invariance, torch.compile without graph breaks, no host syncs on a GPU."""

import io

import numpy as np
import pytest
import torch

from genlip_fast.data.dali import dali_available
from genlip_fast.data.inputs import AUTHORS_PIXEL_MEAN, AUTHORS_PIXEL_STD, ImageTransform, open_image
from genlip_fast.data.transforms import decode_native, decode_resize_crop
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.speak.encoder import VisionEncoder


def png_bytes(h, w, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tiny_encoder(backend="reference", n_layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny", attn_backend=backend, ce_backend="reference", n_layers=n_layers)
    return VisionEncoder(GenLIP(cfg).eval())


@pytest.mark.parametrize("h,w", [(75, 300), (301, 97), (20, 20)])
def test_transform_gives_the_data_pipelines_patches(h, w):
    data = png_bytes(h, w)
    img = open_image(data)
    patches, grid = ImageTransform()(img)
    want, want_grid = decode_native(data)  # the host decode path of training (stage 2)
    assert grid == want_grid and torch.equal(patches, want)
    patches, grid = ImageTransform(image_size=64)(img)
    want, want_grid = decode_resize_crop(data, 64)  # stage 1
    assert grid == want_grid == (4, 4) and torch.equal(patches, want)
    # uint8 arrays and tensors are the same image
    arr = np.array(img)
    assert torch.equal(ImageTransform()(arr)[0], ImageTransform()(torch.from_numpy(arr))[0])


def test_other_pixel_statistics():
    img = open_image(png_bytes(48, 80, seed=1))
    t = ImageTransform(pixel_mean=AUTHORS_PIXEL_MEAN, pixel_std=AUTHORS_PIXEL_STD)
    patches, (gh, gw) = t(img)
    raw = torch.from_numpy(np.asarray(t.resize(img)).copy()).float().div(255).permute(2, 0, 1)  # (3, H, W)
    want = ((raw - 0.5) / 0.5).reshape(3, gh, 16, gw, 16).permute(1, 3, 0, 2, 4).reshape(gh * gw, 768)
    torch.testing.assert_close(patches, want, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        t(np.zeros((8, 8, 3), dtype=np.float32))


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported")
def test_dali_decode_is_close_to_pillow():
    files = [png_bytes(70, 130, seed=2), png_bytes(200, 90, seed=3)]
    t = ImageTransform(pixel_mean=AUTHORS_PIXEL_MEAN, pixel_std=AUTHORS_PIXEL_STD)
    for (a, ga), (b, gb) in zip(t.decode(files, "pillow"), t.decode(files, "dali")):
        assert ga == gb
        # DALI's bicubic vs Pillow's on the same pixel grid: the data pipeline tests' bound (mean 0.01, max 0.5 in
        # CLIP units, std ~0.27) in units of std 0.5
        diff = (a - b).abs()
        assert diff.mean() < 0.0054 and diff.max() < 0.27, (diff.mean(), diff.max())


def test_encoder_packs_images_without_mixing_them():
    enc = tiny_encoder()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (40, 100), (130, 50)]]
    with torch.no_grad():
        together = enc(images)
        alone = [enc([im])[0] for im in images]
    assert [tuple(f.shape) for f in together] == [(16, 128), (18, 128), (24, 128)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 grids"):
        enc([torch.zeros(4, 768)] * 2, grid_hw=[(2, 2)])


def test_layer_features_and_pooled_output():
    """timm's forward_intermediates indices: block outputs as forward hooks see them, -1 through the final norm is
    the final features, pooled = the mean over each image's patches."""
    enc = tiny_encoder(n_layers=3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 64), (40, 100)]]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in enc.model.blocks]
    with torch.no_grad():
        final = enc(images)
        for h in hooks:
            h.remove()
        out = enc.encode(images, layers=[0, -1, 1])
        normed = enc(images, layers=[-1], norm=True)
    counts = [16, 18]
    assert [tuple(p.shape) for p in out.patches] == [(3, 16, 128), (3, 18, 128)] and out.pooled.shape == (3, 2, 128)
    for j, block in enumerate([0, 2, 1]):
        torch.testing.assert_close(torch.cat([p[j] for p in out.patches]), seen[block], atol=0, rtol=0)
        want = torch.stack([x.mean(0) for x in seen[block].split(counts)])
        torch.testing.assert_close(out.pooled[j], want, atol=1e-6, rtol=1e-6)
    for a, b in zip(normed, final):
        assert torch.equal(a[0], b)
    with pytest.raises(IndexError, match=r"layers \[3, -4\] out of range for 3 blocks"):
        enc(images, layers=[3, -4])
    with pytest.raises(ValueError, match="layers is empty"):
        enc(images, layers=[])


def test_encoder_features_compile_in_one_graph():
    """fullgraph=True fails on any graph break, which a host sync (``.item()``, ``.tolist()``) would cause; the
    fused attention (Triton, in the interpreter here) is one custom op to the compiler. Block outputs and pooling
    compile alike."""
    enc = tiny_encoder(backend="triton", n_layers=1)
    rng = np.random.default_rng(0)
    batch = enc.pack([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 48), (32, 96)]])

    def both(b):
        layers = enc.features(b, [0], norm=True)
        return enc.features(b), layers, enc.pool(b, layers)

    with torch.no_grad():
        eager = both(batch)
        compiled = torch.compile(both, fullgraph=True, backend="aot_eager")(batch)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_encoder_module_compiles_with_inductor():
    enc = tiny_encoder(backend="triton", n_layers=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(64, 48), (32, 96)]]
    with torch.no_grad():
        eager = enc(images)
        compiled = torch.compile(enc)(images)  # host packing stays eager (torch.compiler.disable)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_encoder_bf16_on_gpu_has_no_host_syncs():
    enc = tiny_encoder(backend="auto").to("cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    batch = enc.pack([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(224, 224), (160, 320)]])
    batch = batch.to("cuda")
    enc.features(batch)  # warm-up: Triton compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = enc.features(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.dtype == torch.bfloat16 and out.shape == (196 + 200, 128)

"""Let ViT Speak, timed: captions per second with the KV cache vs recomputing every token, and encoder images/s.

    pytest benchmarks/bench_speak.py --benchmark-only -s      # CPU: the tiny model; GPU: So/16 as well

Captioning: 64 images x 32 new tokens (no stop token, so every path writes exactly 32), greedy, random weights
(speed does not depend on what the weights say). ``kv`` is ``genlip_fast.speak.generate`` (packed prefill + one
token per sample per step); ``recompute`` is ``GenLIP.generate`` (the oracle: the whole ``[image | caption]`` again
for every token). Encoder: ``VisionEncoder`` on uint8 images (host resize + patchify + pack included) and its device
part alone (``features`` on an already packed batch). Results: benchmarks/results/speak.md.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import pytest
import torch

from _utils import environment
from genlip_fast.model import GenLIP, get_preset
from genlip_fast.speak import generate
from genlip_fast.speak.encoder import VisionEncoder

IMAGES, NEW_TOKENS = 64, 32
ON_GPU = torch.cuda.is_available()
cpu_ok = pytest.mark.cpu_ok

# (preset, grid per image, dtype): tiny at the demo's 64x64 images (4x4 patches); So/16 at 224x224 (14x14)
CAPTION_CASES = [
    pytest.param("tiny", (4, 4), torch.float32, marks=cpu_ok, id="tiny-64px"),
    pytest.param("So/16", (14, 14), torch.bfloat16, id="So16-224px"),
]


def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def build(preset: str, dtype: torch.dtype) -> GenLIP:
    torch.manual_seed(0)
    cfg = get_preset(preset, attn_backend="auto", ce_backend="auto", vocab_size=512 if preset == "tiny" else 151936)
    return GenLIP(cfg).to(device=device(), dtype=dtype).eval()


def where() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)"


@pytest.mark.parametrize("path", ["kv", "recompute"])
@pytest.mark.parametrize("preset,grid,dtype", CAPTION_CASES)
def test_caption_throughput(benchmark, preset, grid, dtype, path):
    model = build(preset, dtype)
    g = torch.Generator().manual_seed(1)
    patches = [torch.randn(grid[0] * grid[1], model.cfg.patch_dim, generator=g) for _ in range(IMAGES)]
    grids = [grid] * IMAGES

    def run():
        if path == "kv":
            out = generate(model, patches, grids, stop_ids=(), max_new_tokens=NEW_TOKENS)
        else:
            out = model.generate(patches, grids, eot_id=-1, max_new_tokens=NEW_TOKENS)
        sync()
        assert all(len(o) == NEW_TOKENS for o in out)

    run()  # warm-up (Triton compiles on a GPU)
    rounds = 3 if path == "recompute" and not ON_GPU else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(device=where(), path=path, preset=preset, images=IMAGES, new_tokens=NEW_TOKENS,
                                median_s=median, captions_per_s=IMAGES / median,
                                new_tokens_per_s=IMAGES * NEW_TOKENS / median)
    print(f"\n{preset} {path}: {median:.3f} s for {IMAGES} x {NEW_TOKENS} tokens = {IMAGES / median:.1f} captions/s, "
          f"{IMAGES * NEW_TOKENS / median:.0f} new tokens/s on {where()}")


# (preset, image sizes, dtype): tiny on the demo's images; So/16 at 224x224 and at native aspect ratio
ENCODER_CASES = [
    pytest.param("tiny", [(64, 64)] * 64, torch.float32, marks=cpu_ok, id="tiny-64px"),
    pytest.param("So/16", [(224, 224)] * 64, torch.bfloat16, id="So16-224px"),
    pytest.param("So/16", [(480, 640), (640, 480), (375, 500), (1024, 768)] * 16, torch.bfloat16, id="So16-native"),
]


@pytest.mark.parametrize("part", ["end-to-end", "features"])
@pytest.mark.parametrize("preset,sizes,dtype", ENCODER_CASES)
def test_encoder_throughput(benchmark, preset, sizes, dtype, part):
    enc = VisionEncoder(build(preset, dtype))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    batch = enc.pack(images).to(device())
    patches = batch.patches.shape[0]

    def run():
        with torch.no_grad():
            enc(images) if part == "end-to-end" else enc.features(batch)
        sync()

    run()
    t = time.perf_counter()
    run()
    rounds = max(3, min(20, int(2.0 / max(1e-3, time.perf_counter() - t))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info.update(device=where(), part=part, preset=preset, images=len(images), patches=patches,
                                median_s=median, images_per_s=len(images) / median, patches_per_s=patches / median)
    print(f"\n{preset} encoder {part}: {len(images) / median:.1f} images/s ({patches} patches per call) on {where()}")

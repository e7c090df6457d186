"""Data pipeline throughput: images/s and packs/s from shards of photo-sized JPEGs, stage 1 and stage 2.

Runs on a CPU machine too (DALI's CPU mode), unlike the other benchmarks; on a GPU machine the DALI decode runs
there (nvJPEG). The rate to beat is the model's appetite: ~560 images/s per GPU in stage 1 (150K tokens/s at ~270
tokens per sample). ::

    pytest benchmarks/bench_data.py --benchmark-only -s               # GPU machine
    pytest benchmarks/bench_data.py --noconftest --benchmark-only -s  # CPU machine (see below)
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest

from genlip_fast.data.config import DataConfig
from genlip_fast.data.dali import dali_available, gpu_count
from genlip_fast.data.pipeline import build_data_loader
from genlip_fast.data.synthetic import generate_photo_shards
from genlip_fast.data.tokenizer import load_tokenizer

MODEL_IMAGES_PER_S = 560  # per GPU, stage 1
SIZES = {"500x375": [(500, 375), (375, 500)], "1024x768": [(1024, 768), (768, 1024)]}
NUM = int(os.environ.get("BENCH_DATA_IMAGES", "256"))
CACHE = Path(os.environ.get("BENCH_DATA_DIR", "/tmp/genlip_bench_data"))


# benchmarks/conftest.py skips every benchmark on a machine without a GPU; this one also measures DALI's CPU mode,
# so on such a machine run it with --noconftest (nothing here needs the conftest) or mark-aware conftest logic:
#   pytest benchmarks/bench_data.py --noconftest --benchmark-only -s
pytestmark = pytest.mark.cpu_ok


def shards(name: str) -> str:
    root = CACHE / f"{name}-{NUM}"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)  # an interrupted earlier run's partial cache (generators never overwrite)
        generate_photo_shards(root, SIZES[name], num=NUM, per_shard=64, prefix="photo")
        (root / "done").write_text("ok")
    return str(root / "photo-*.tar")


BACKENDS = (["dali"] if dali_available() else []) + ["host"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("size", list(SIZES))
def test_data_throughput(benchmark, size, stage, backend):
    """Steady state of an endless loader (as in training), one pack prefetched: images/s over two rounds of 4
    (stage 1) or 16 (stage 2) packs after one warm-up pack."""
    import torch

    tok = load_tokenizer("demo")
    cfg = DataConfig(train_shards=shards(size), backend=backend, stage=stage, image_size=224, pack_tokens=16384,
                     lookahead=1 if stage == 1 else 64, batch_size=64, num_threads=os.cpu_count() or 2, prefetch=1)
    loader = build_data_loader(cfg, tok)
    next(loader)
    per_round = 4 if stage == 1 else 16
    counts = []

    def take():
        counts.append(sum(next(loader).num_samples for _ in range(per_round)))

    benchmark.pedantic(take, rounds=2, iterations=1, warmup_rounds=0)
    dt = benchmark.stats.stats.median
    ips = sum(counts) / sum(benchmark.stats.stats.data)
    stats = loader.stats
    loader.close()
    benchmark.extra_info.update(
        device=("GPU" if gpu_count() else f"CPU ({os.cpu_count()} cores, {platform.processor() or 'x86_64'})"),
        backend=stats["backend"], torch_threads=torch.get_num_threads(), images_per_s=ips,
        packs_per_s=per_round / dt, producer_images_per_s=stats["images_per_s"], fill_ratio=stats["fill_ratio"],
        model_images_per_s=MODEL_IMAGES_PER_S,
        tokens_per_pack=16384,
    )
    print(f"\n{size} stage {stage} {stats['backend']}: {ips:.0f} images/s, {per_round / dt:.2f} packs/s, "
          f"fill {stats['fill_ratio']:.3f}, producer {stats['images_per_s']:.0f} images/s, "
          f"skipped {stats['skipped_total']} (model needs ~{MODEL_IMAGES_PER_S}/s)")


STARTUP_SHARDS = int(os.environ.get("BENCH_STARTUP_SHARDS", "100000"))


def many_shards(n: int) -> Path:
    """``n`` shard files listed in a manifest (empty files: start-up must not open them, so their content is moot)."""
    from genlip_fast.data.manifest import update_manifest

    root = CACHE / f"startup-{n}"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for s in range(n):
            (root / f"s-{s:06d}.tar").touch()
        update_manifest(root, {f"s-{s:06d}.tar": {"samples": 10_000, "bytes": 0} for s in range(n)})
        (root / "done").write_text("ok")
    return root


def test_loader_startup(benchmark):
    """What a run does at start for its data with STARTUP_SHARDS shards of 10K samples in one folder: list them,
    read the folder's manifest for the dataset size, build one stream's loader (no shard or index is opened)."""
    from genlip_fast.data.manifest import describe_dataset
    from genlip_fast.data.specs import expand_spec

    pattern = str(many_shards(STARTUP_SHARDS) / "*.tar")
    tok = load_tokenizer("demo")
    times = {}

    def start():
        import time

        t0 = time.perf_counter()
        describe_dataset(expand_spec(pattern))
        t1 = time.perf_counter()
        build_data_loader(DataConfig(train_shards=pattern, backend="host"), tok, rank=3, world_size=8).close()
        times.update(manifest_s=t1 - t0, loader_s=time.perf_counter() - t1)

    benchmark.pedantic(start, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(shards=STARTUP_SHARDS, samples=STARTUP_SHARDS * 10_000, **times,
                                device=f"CPU ({os.cpu_count()} cores)")
    print(f"\n{STARTUP_SHARDS} shards: start-up {benchmark.stats.stats.median:.2f} s (last round: manifest "
          f"{times['manifest_s']:.2f} s, loader {times['loader_s']:.2f} s)")

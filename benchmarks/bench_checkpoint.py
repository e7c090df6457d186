"""What the checkpoint manifest costs: xxh3_64 of every file of a checkpoint against the DCP save that wrote it.

The manifest reads back what the save just wrote (from the page cache, as in training: each rank checksums its
share right after the save) and hashes it. The rule this checks: under ~5% of the save. Runs on a CPU machine too::

    pytest benchmarks/bench_checkpoint.py --benchmark-only -s
    BENCH_CKPT_GB=4 BENCH_CKPT_DIR=/scratch pytest benchmarks/bench_checkpoint.py --benchmark-only -s

``BENCH_CKPT_DIR`` should be on the file system checkpoints go to (default: the system temp folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _utils import environment

from genlip_fast.checkpoint.manifest import check_files, describe

GB = float(os.environ.get("BENCH_CKPT_GB", "1"))
ROOT = os.environ.get("BENCH_CKPT_DIR") or tempfile.gettempdir()

pytestmark = pytest.mark.cpu_ok


def test_manifest_cost_vs_save(benchmark):
    """A state of GB gigabytes in 64 MB fp32 tensors (about how an optimizer state is laid out), saved with DCP
    (fsync on, as the trainer saves); then the manifest of the folder (timed by pytest-benchmark, 3 rounds) and a
    full check of it against the files."""
    n = max(1, round(GB * 1e9 / (64 << 20)))
    state = {f"t{i}": torch.randn(16 << 20) for i in range(n)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    folder = Path(tempfile.mkdtemp(prefix="genlip-bench-ckpt-", dir=ROOT))
    try:
        saves = []
        for i in range(2):
            shutil.rmtree(folder / "c", ignore_errors=True)
            t = time.perf_counter()
            dcp.save(state, checkpoint_id=str(folder / "c"), no_dist=True)
            saves.append(time.perf_counter() - t)
        save = min(saves)
        names = sorted(os.listdir(folder / "c"))
        entries = benchmark.pedantic(lambda: describe(folder / "c", names), rounds=3, iterations=1)
        manifest = benchmark.stats.stats.median
        t = time.perf_counter()
        assert check_files(folder / "c", entries) == []
        check = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gb = nbytes / 1e9
    info = {"bytes": nbytes, "save_s_per_gb": save / gb, "manifest_s_per_gb": manifest / gb,
            "check_s_per_gb": check / gb, "manifest_share_of_save": manifest / save, "dir": ROOT, **environment()}
    benchmark.extra_info.update(info)
    print(f"\n{gb:.2f} GB in {n} tensors on {ROOT}: save {save / gb:.3f} s/GB, manifest {manifest / gb:.3f} s/GB "
          f"({100 * manifest / save:.1f}% of the save), check {check / gb:.3f} s/GB")

"""``pytest benchmarks/ --benchmark-only`` ends with one table per benchmark file of derived figures (issue 17):
the figures on hand-made runs, then a real, small run of the CPU data benchmark."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from summarize import derived_rows, markdown, terminal_tables  # noqa: E402


def bench(file, test, params, median_s, **extra):
    return {"name": f"{test}[{'-'.join(map(str, params.values()))}]", "fullname": f"benchmarks/{file}::{test}",
            "params": params, "stats": {"median": median_s}, "extra_info": extra}


def test_speed_up_over_the_baseline_of_the_same_shape_and_mode():
    runs = [
        bench("bench_attention.py", "test_attention", {"stage": "stage1", "impl": "fused", "mode": "fwd"}, 0.002,
              name="attention/stage1/fused/fwd", median_ms=2.0, tflops=100.0, peak_mem_gib=0.5, gpu="H100"),
        bench("bench_attention.py", "test_attention", {"stage": "stage1", "impl": "reference", "mode": "fwd"}, 0.010,
              name="attention/stage1/reference/fwd", median_ms=10.0, tflops=20.0, peak_mem_gib=4.0, gpu="H100"),
        bench("bench_attention.py", "test_attention", {"stage": "stage1", "impl": "fused", "mode": "bwd"}, 0.004,
              name="attention/stage1/fused/bwd", median_ms=4.0, tflops=125.0, peak_mem_gib=1.0, gpu="H100"),
        bench("bench_data.py", "test_data_throughput", {"size": "500x375", "stage": 1, "backend": "dali"}, 0.5,
              images_per_s=600.0, packs_per_s=8.0),
        bench("bench_data.py", "test_data_throughput", {"size": "500x375", "stage": 1, "backend": "host"}, 2.0,
              images_per_s=150.0, packs_per_s=2.0),
        bench("bench_other.py", "test_x", {"n": 1}, 0.001),
        bench("bench_speak.py", "test_caption_throughput", {"preset": "tiny", "path": "kv"}, 0.5, captions_per_s=16.0),
        bench("bench_speak.py", "test_caption_throughput", {"preset": "tiny", "path": "recompute"}, 2.0,
              captions_per_s=4.0),
    ]
    rows = derived_rows(runs)
    assert list(rows) == ["bench_attention", "bench_data", "bench_other", "bench_speak"]
    assert [r["speedup"] for r in rows["bench_speak"]] == [4.0, 1.0]  # KV cache over recomputing, captions/s
    att = {r["label"]: r for r in rows["bench_attention"]}
    assert att["attention/stage1/fused/fwd"]["speedup"] == 5.0  # 10 ms / 2 ms, same stage and mode
    assert att["attention/stage1/reference/fwd"]["speedup"] == 1.0
    assert att["attention/stage1/fused/bwd"]["speedup"] is None  # no reference bwd in this run
    data = rows["bench_data"]
    assert [r["speedup"] for r in data] == [4.0, 1.0]  # images/s, not time per round
    assert data[0]["rate"] == 600.0 and data[0]["rate_unit"] == "images/s" and data[0]["extra"] == "packs_per_s=8.0"
    assert rows["bench_other"][0]["speedup"] is None and rows["bench_other"][0]["ms"] == 1.0

    text = "\n".join(terminal_tables(runs))
    assert "bench_attention: speed-up over impl=reference" in text and "5.00x" in text and "600 images/s" in text
    md = "\n".join(markdown(runs, "pytest benchmarks/"))
    assert "- device: H100" in md and "| attention/stage1/fused/fwd | 2.000 | 100.0 | — | 0.50 | 5.00x |" in md


def test_a_real_benchmark_run_ends_with_the_table(tmp_path):
    env = {**os.environ, "BENCH_DATA_IMAGES": "16", "BENCH_DATA_DIR": str(tmp_path), "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_data.py::test_data_throughput[500x375-1-host]",
           "--benchmark-only", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    tail = res.stdout[res.stdout.index("derived figures"):]
    assert "bench_data: speed-up over backend=host" in tail
    (row,) = [line for line in tail.splitlines() if line.startswith("test_data_throughput[500x375-1-host]")]
    assert row.split()[-1] == "1.00x" and "images/s" in row

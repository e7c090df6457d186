"""scripts/gpu_check.sh, the one call a GPU session makes, runs its steps on CPU too, so it cannot rot between the
rare sessions that have a GPU: the trainer step end to end (tiny preset, photo-sized shards, its summary), the
budget that skips a step rather than lose the call, and a wrong step name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from summarize import loss_comparison, markdown, train_summary  # noqa: E402


def _run(tmp_path, *steps, **env):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "TRITON_CACHE_DIR": str(tmp_path / "triton"), **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh", *steps], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_train_step_runs_the_trainer_and_summarises_it(tmp_path):
    res = _run(tmp_path, "train", TRAIN_CONFIG="tiny", TRAIN_DATA=str(tmp_path / "photos"), TRAIN_IMAGES="24",
               TRAIN_STEPS="4", TRAIN_BATCH="8", TRAIN_WARMUP="1", TRAIN_BACKEND="host",
               TRAIN_ARGS="--parallel.compile=false --data.val_shards= --eval.every=0 --eval.probe_train= "
                          "--eval.probe_val= --train.caption_samples=0 --parallel.backend=gloo")
    out = tmp_path / "out"
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:] + (out / "train.txt").read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    summary = (out / "train_summary.md").read_text()
    assert "steps 2-4" in summary and "data.backend=host" in summary and "| tokens/s |" in summary
    assert len(list((tmp_path / "photos").glob("photos-*.tar"))) == 1   # 24 images, 128 per shard


def test_budget_skips_a_step_instead_of_losing_the_call(tmp_path):
    res = _run(tmp_path, "tests", "bench:attention", BUDGET="5")
    assert res.returncode == 0, res.stdout + res.stderr
    skipped = (tmp_path / "out" / "skipped.txt").read_text()
    assert "skipped tests" in skipped and "skipped bench:attention" in skipped
    assert not list((tmp_path / "out").glob("bench_*.json"))


def test_unknown_step_is_named(tmp_path):
    res = _run(tmp_path, "benchmarks")
    assert res.returncode == 2 and "unknown step 'benchmarks'" in res.stderr


def test_summaries_of_several_files_and_of_a_training_run():
    def bench(file, impl, ms):
        return {"fullname": f"benchmarks/{file}.py::t[{impl}]", "name": f"t[{impl}]", "params": {"impl": impl},
                "stats": {"median": ms / 1e3}, "extra_info": {"median_ms": ms, "gpu": "H100"}}
    md = "\n".join(markdown([bench("bench_attention", "reference", 4.0), bench("bench_attention", "triton", 1.0),
                             bench("bench_linear_cross_entropy", "eager", 2.0)], "cmd"))
    assert "### bench_attention" in md and "### bench_linear_cross_entropy" in md and "4.00x" in md
    rows = [{"step": s, "loss": 3.0 - s, "tokens_per_s": 1000.0 * s, "samples_per_s": 4.0, "mfu": 0.25,
             "tflops_per_rank": 50.0, "step_time_s": 0.5, "data_wait_s": 0.01, "peak_mem_gib": 10.0 + s}
            for s in range(1, 6)]
    text = "\n".join(train_summary(rows, 2, "cmd"))
    assert "steps 3-5" in text and "| 4,000 | 4.0 | 25.0% | 50.0 | 0.500 | 0.010 | 15.00 |" in text
    assert "no training step after step 9" in "\n".join(train_summary(rows, 9, "cmd"))


@pytest.mark.slow
def test_float8_step_trains_each_variant_and_compares_their_losses(tmp_path):
    res = _run(tmp_path, "float8", TRAIN_CONFIG="tiny", TRAIN_DATA=str(tmp_path / "photos"), TRAIN_IMAGES="24",
               FLOAT8_STEPS="3", FLOAT8_BATCH="8", FLOAT8_WARMUP="1", FLOAT8_VARIANTS="off tensorwise:mlp",
               TRAIN_BACKEND="host",
               TRAIN_ARGS="--parallel.compile=false --data.val_shards= --eval.every=0 --eval.probe_train= "
                          "--eval.probe_val= --train.caption_samples=0 --parallel.backend=gloo")
    out = tmp_path / "out"
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "float8 tensorwise: 12 of 28 block linears converted" in (out / "float8_tensorwise_mlp.txt").read_text()
    assert "train.float8=tensorwise --train.float8_filter=mlp" in (out / "float8_tensorwise_mlp_summary.md").read_text()
    table = (out / "float8_loss.md").read_text()
    assert "| steps | float8_off_all | float8_tensorwise_mlp |" in table and "| 1-1 |" in table
    assert (out / "bench_float8.txt").exists()  # its benchmarks are skipped without a GPU


def test_loss_comparison_of_runs():
    runs = {"bf16": [{"step": s, "loss": 4.0 - 0.1 * s} for s in range(1, 11)],
            "f8": [{"step": s, "loss": (4.0 - 0.1 * s) * 1.01} for s in range(1, 11)] + [{"step": 11, "loss": 1.0}],
            "short": [{"step": s, "loss": 4.0 - 0.1 * s} for s in range(1, 9)] + [{"step": 9, "val_loss": 2.0}]}
    lines = loss_comparison(runs, windows=4)
    assert lines[2] == "| steps | bf16 | f8 | short |"
    assert lines[4] == "| 1-2 | 3.8500 | 3.8885 (+1.00%) | 3.8500 (+0.00%) |"  # steps all three logged: 1-8
    assert lines[-1].startswith("| 7-8 |") and len(lines) == 8
    assert loss_comparison({"a": [{"step": 1, "loss": 1.0}], "b": [{"step": 2, "loss": 1.0}]}) == [
        "- no step that every run logged a loss for"]

"""The GPU sweep (benchmarks/sweep_attention.py) in its --dry-run mode: CPU, Triton interpreter, tiny packs. It
must run every variant on every shape, write the JSON and markdown as it goes and name a winner per shape, so the
one GPU call it exists for does not find it broken."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sweep_attention
    finally:
        sys.path.pop(0)
    return sweep_attention


def test_sweep_dry_run_measures_every_variant_and_shape(tmp_path, sweep):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_attention.py"), "--dry-run",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "sweep.json").read_text())
    rows = result["rows"]
    fused = {(r["variant"], r["shape"], r["mode"]): r for r in rows if r["impl"] == "fused"}
    assert set(fused) == {(v, s, m) for v in sweep.VARIANTS for s in sweep.SHAPES for m in sweep.MODES}
    for key, r in fused.items():
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["tflops"] > 0, (key, r)
        # fp16 in the interpreter: every variant gives the default's output and gradients to rounding
        assert r["max_abs_vs_default"] < 2e-2, (key, r)
    assert all(r["rerun"] == "bitwise equal" for r in fused.values() if r.get("rerun"))
    assert {r["impl"] for r in rows} == {"fused", *sweep.BASELINES}
    assert all(r["status"].startswith("skipped") for r in rows if r["impl"] != "fused")
    assert {(w["shape"], w["mode"]) for w in result["winners"]} == {(s, m) for s in sweep.SHAPES for m in sweep.MODES}
    md = (tmp_path / "sweep.md").read_text()
    assert md.count("| fused |") == len(fused) and "## Winner per shape" in md
    assert "winner so16_stage1 fwd_bwd" in proc.stdout
    assert result["meta"]["device"].startswith("CPU") and result["meta"]["stopped"] == "no"


def test_sweep_refuses_without_a_gpu_unless_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sweep_attention.py"), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_precompile_job_warms_every_candidate_of_its_launch(monkeypatch, sweep):
    # On the GPU each job compiles one captured launch's autotune candidates; here (interpreter) warmup compiles
    # nothing, but the capture, the launch index and the arguments handed to warmup are the real ones.
    real_pack = sweep._pack
    monkeypatch.setattr(sweep, "_pack", lambda shape, dry_run: real_pack(shape, True))
    counts = [sweep._precompile_job(("so16_stage1", "hd80+rope_once+onepass", i))[1]
              for i in range(sweep._MAX_LAUNCHES)]
    # q and k rotated, fwd, pre, onepass, dq and dk un-rotated: one interpreter config each, nothing past them
    assert counts == [1] * 7 + [0] * (sweep._MAX_LAUNCHES - 7)

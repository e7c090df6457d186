"""The README's first command: the tiny run trains on generated shapes and speaks (foundation)."""

import json
import os
import subprocess
import sys


def test_tiny_run_lowers_the_loss_and_captions(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "genlip_fast.train", "--train.steps=60", f"--train.out_dir={tmp_path}/run",
           f"--data.train_shards={tmp_path}/shapes/train-*.tar", f"--data.val_shards={tmp_path}/shapes/val-*.tar",
           "--train.caption_samples=2", "--train.max_new_tokens=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]  # step 0 is an evaluation only
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    assert "Let ViT Speak" in res.stdout and res.stdout.count("generated:") == 2
    # the demo evaluates before training and at the end: validation loss, captioning metrics, probe accuracy
    assert [r["step"] for r in rows if "probe_top1" in r] == [0, 60] and rows[-1]["val_loss"] < rows[0]["val_loss"]

"""Data no sample of which can be used (issue 28): the issue's command on shards whose captions no default rule finds
(Recap's re_caption; the issue's stage-2 layout is read since issue 25) ends in seconds with one line and exit 2, in
bounded memory (resident set measured); so do shards whose every image is corrupt and a single unreadable .tar
(before: a 30-line traceback)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from genlip_fast.data.synthetic import photo_jpeg
from genlip_fast.data.webdataset import write_shard
from tiny_run import one_line, recap_layout_shard, run_cli

REPO = Path(__file__).resolve().parent.parent


def test_the_issues_command_on_data_with_no_usable_sample_ends_in_seconds_in_bounded_memory(shapes, tmp_path):
    """Before: nothing after the start-up lines, 100% CPU, 18 GB resident after 10 minutes, SIGTERM ignored."""
    data = tmp_path / "recap"
    recap_layout_shard(data / "s2-000000.tar")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes").symlink_to(shapes)  # the demo's held-out shards, where the default config looks
    cmd = [sys.executable, "-m", "genlip_fast.train", "--no-progress", "--train.steps=3", "--eval.every=0",
           "--data.generate_demo_data=false", f"--data.train_shards={data}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None and time.monotonic() - t0 < 60:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    # 30 s is the issue's bound, generous on the loaded 2-core CI machine (about 6 s there, most of it imports)
    assert proc.returncode == 2 and elapsed < 30, (proc.returncode, elapsed, err[-3000:])
    line = one_line(err, "genlip-train: data error: data.train_shards: no usable sample in a whole pass over the "
                         f"data: 1 shard of 48 samples ({data / 's2-000000.tar'}), ")
    assert ("missing caption (looked for txt, json conversations (last assistant turn), json caption, json text; "
            "data.caption says where)") in line
    assert peak < 1.5 * 2**30, f"peak resident set {peak / 2**20:.0f} MiB"  # ~0.5 GiB: torch and the tiny model
    log = (tmp_path / "runs" / "tiny" / "logs" / "rank0.log").read_text()  # the run's log lines, then the traceback
    assert "global batch:" in log and "NoUsableSampleError: no usable sample" in log


@pytest.mark.parametrize("kind", ["every image corrupt", "one unreadable tar"])
def test_unusable_shards_end_in_one_line_and_exit_2(tmp_path, capsys, kind):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "every image corrupt":
        write_shard(data / "bad-000000.tar", [(f"k{i}", {"jpg": photo_jpeg(80, 64, i)[:200], "txt": b"a cross ."})
                                              for i in range(24)])
        want = ("no usable sample in a whole pass over the data: 1 shard of 24 samples "
                f"({data / 'bad-000000.tar'}), ")
    else:  # D4 of the issue: before, a 30-line EmptyDatasetError traceback
        (data / "bad-000000.tar").write_bytes(b"this was never a tar file\n" * 40)
        want = f"none of the 1 shards holds a readable sample: 1 cannot be read ({data / 'bad-000000.tar'}"
    rc, err = run_cli(capsys, data, tmp_path / "run", steps=3, data__train_shards=str(data))
    line = one_line(err, f"genlip-train: data error: data.train_shards: {want}")
    assert rc == 2, line
    if kind == "every image corrupt":
        assert "truncated image" in line or "corrupt image" in line, line

"""Faults under torchrun (2 workers, gloo, loopback): the ranks agree on every way a run ends — a stop signal to
torchrun or to one rank, bad input found at start, a data stream with no usable sample — each rank exiting with the
same status and one line said once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from genlip_fast.checkpoint import list_checkpoints, verify_checkpoint
from tiny_run import stage2_layout_shard, tiny_overrides

REPO = Path(__file__).resolve().parent.parent

WRAPPER = """
import os, signal, sys
from pathlib import Path
import genlip_fast.train.trainer as trainer
from genlip_fast.train.__main__ import main

attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
if attempt == "0" and rank == os.environ.get("SIGNAL_RANK"):  # only this rank gets a SIGUSR1, as step 3 begins
    real = trainer.warmup_cosine

    def signalled(step, **kw):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(step, **kw)

    trainer.warmup_cosine = signalled
Path(f"pid_{attempt}_{rank}").write_text(str(os.getpid()))
rc = main(sys.argv[1:])
Path(f"rc_{attempt}_{rank}").write_text(str(rc))
sys.exit(rc)
"""


@contextlib.contextmanager
def _torchrun(tmp_path: Path, args: list[str], *, max_restarts: int = 0, **env):
    """torchrun with 2 workers running WRAPPER; on the way out, whatever it started that still runs is ended (the
    workers run in their own sessions, so by the pids they wrote)."""
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", str(script), "--no-progress", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid_file in tmp_path.glob("pid_*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _exit_codes(tmp_path: Path, attempt: int) -> list[int]:
    return [int((tmp_path / f"rc_{attempt}_{r}").read_text()) for r in range(2)]


def test_preemption_recipe_under_torchrun(shapes, tmp_path):
    """Attempt 0: only rank 1 gets SIGUSR1 -> both ranks save step 3 and exit 138 (before: rank 0 crashed with a
    TypeError). torchrun restarts them; they resume; then the README's recipe, SIGTERM to torchrun, gives a
    checkpoint from both ranks and exit 143 on both, with no SIGKILL from torchrun."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    with _torchrun(tmp_path, tiny_overrides(shapes, out, steps=200, parallel__data_streams=2), max_restarts=1,
                   SIGNAL_RANK="1") as proc:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (tmp_path / "rc_0_0").exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGTERM)  # the recipe: SIGTERM to torchrun, nothing to the workers
        log = proc.communicate(timeout=120)[0]
    assert _exit_codes(tmp_path, 0) == [138, 138], log[-4000:]
    assert _exit_codes(tmp_path, 1) == [143, 143], log[-4000:]
    assert "forcefully exiting" not in log and "resuming from" in log
    root = out / "checkpoints"
    saved = [p.name for p in list_checkpoints(root)]
    last = len(metrics.read_text().splitlines())
    assert saved == ["step_00000003", f"step_{last:08d}"] and last > 3
    for name in saved:
        assert verify_checkpoint(root / name) == []
        assert {"rank_00000.pt", "rank_00001.pt"} <= set(os.listdir(root / name))


def test_bad_input_under_torchrun_exits_2_on_every_rank(shapes, tmp_path):
    with _torchrun(tmp_path, tiny_overrides(shapes, tmp_path / "run", steps=2,
                                            data__val_shards=str(tmp_path / "nowhere" / "val-*.tar"))) as proc:
        log = proc.communicate(timeout=240)[0]
    assert _exit_codes(tmp_path, 0) == [2, 2], log[-4000:]
    assert log.count("genlip-train: config error: data.val_shards") == 1, log[-4000:]


def test_a_stream_with_no_usable_sample_stops_every_rank_with_one_line(shapes, tmp_path):
    """Rank 1's stream is dealt the unusable shard in epoch 0 (seed 0, one open shard per stream): it pads its
    micro-steps and votes, so rank 0 — which has samples — stops too, and both exit 2 with one line said once.
    Before: rank 1 hung in its data wait and rank 0 in the step's collectives."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shapes / "train-000000.tar", data / "s-000000.tar")
    stage2_layout_shard(data / "s-000001.tar", 6)
    with _torchrun(tmp_path, tiny_overrides(shapes, tmp_path / "run", steps=4, parallel__data_streams=2,
                                            data__shuffle_shards=1, data__train_shards=str(data))) as proc:
        log = proc.communicate(timeout=240)[0]
    assert _exit_codes(tmp_path, 0) == [2, 2], log[-4000:]
    lines = [line for line in log.splitlines() if "genlip-train:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "genlip-train: data error: rank 1: data.train_shards: no usable sample in a whole pass over data stream 1 "
        f"of 2: 1 shard of 6 samples ({data / 's-000001.tar'}), "), log[-4000:]
